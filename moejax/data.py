"""Byte-level corpora, a deterministic document split, packing and grain pipelines.

Sources (config `data.source`):
  'stdlib'      the running interpreter's standard library, every `*.py` file under the
                stdlib directory (site-packages excluded), sorted by relative path;
  'text:GLOB'   your own files (recursive `**` allowed), sorted by path;
  'tfds:NAME'   a TensorFlow-Datasets dataset read with `tfds.data_source` (no TensorFlow
                needed), one document per example, text from `data.tfds_text_key`.

Tokens are bytes 0..255; SEPARATOR (256) starts every document. The corpus
fingerprint is the sha256 of every (key, document) pair in order; it is recorded in
every result, because the stdlib differs across Python versions.

Split: documents are walked in sha256(key) order; each one that still fits is taken into
the held-out set, whose size is capped at min(`data.heldout_bytes`, `data.heldout_max_fraction`
x corpus bytes); the rest is training data. The split depends only on the keys, the sizes and
those two numbers, so it is deterministic and disjoint by construction, and one large
document can never become the whole held-out set.

Binary files: a document with a NUL byte, or with more than 5% control bytes (other than
whitespace, backspace and escape), looks binary; `data.binary_documents` says whether that is an error (default), the
document is skipped, or kept.

Packing: each split is one token stream; a window i covers tokens [i*L, i*L + L] (L+1
tokens: inputs are the first L, targets the last L), so every token is a target once.
Training draws windows in a seeded grain shuffle (`data.seed`): equal seeds give the same
data order across configurations (paired runs). The iterator state is checkpointable.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import logging
import os
import sysconfig
import time
from typing import Iterator

import grain
import numpy as np

from moejax.errors import DataError

SEPARATOR = 256
BINARY_SHARE = 0.05  # a document with more control bytes than this share looks binary (random bytes: ~10%)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A tokenized, split corpus."""
  name: str
  fingerprint: str
  train_tokens: np.ndarray  # uint16 stream
  heldout_tokens: np.ndarray  # uint16 stream
  num_train_docs: int
  num_heldout_docs: int

  def metadata(self) -> dict:
    return {'name': self.name, 'fingerprint': self.fingerprint, 'train_tokens': int(self.train_tokens.size),
            'heldout_tokens': int(self.heldout_tokens.size), 'train_docs': self.num_train_docs,
            'heldout_docs': self.num_heldout_docs}


def stdlib_files() -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the interpreter's stdlib `*.py` files."""
  root = sysconfig.get_paths()['stdlib']
  rels = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ('site-packages', 'dist-packages', '__pycache__')]
    rels += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith('.py')]
  return root, sorted(r.replace(os.sep, '/') for r in rels)


def _read_files(root: str, rels: list[str]) -> list[tuple[str, bytes]]:
  docs = []
  for rel in rels:
    path = os.path.join(root, rel)
    try:
      with open(path, 'rb') as f:
        docs.append((rel, f.read()))
    except OSError as e:
      raise DataError(f'corpus file {path} cannot be read: {e.strerror or e}') from None
  return docs


_TEXT_CONTROLS = np.array([ord(c) for c in '\t\n\r\f\v\b\x1b'], np.uint8)


def non_text_share(data: bytes) -> float:
  """Share of bytes that are control characters other than whitespace, backspace and escape.

  Bytes >= 128 count as text: they are UTF-8 or a legacy 8-bit encoding (the stdlib itself
  ships KOI8-R and Latin-1 test modules).
  """
  if not data:
    return 0.0
  arr = np.frombuffer(data, np.uint8)
  return int(np.count_nonzero(((arr < 32) & ~np.isin(arr, _TEXT_CONTROLS)) | (arr == 127))) / len(data)


def looks_binary(data: bytes) -> bool:
  """A NUL byte, or more than BINARY_SHARE of the bytes control characters (see `non_text_share`)."""
  return b'\0' in data or non_text_share(data) > BINARY_SHARE


def _screen_binary(docs, source: str, policy: str):
  binary = [k for k, d in docs if looks_binary(d)]
  if not binary:
    return docs
  if policy == 'error':
    raise DataError(f'data.source={source!r}: {len(binary)} document(s) look binary, e.g. {binary[0]!r} (NUL bytes '
                    f"or >{BINARY_SHARE:.0%} control bytes); set data.binary_documents='skip' to leave them out or 'keep'")
  if policy == 'skip':
    log.warning('data.source=%r: skipped %d binary-looking document(s), e.g. %r', source, len(binary), binary[0])
    dropped = set(binary)
    return [(k, d) for k, d in docs if k not in dropped]
  return docs


def _tfds_documents(name: str, split: str, text_key: str, data_dir: str | None) -> list[tuple[str, bytes]]:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError(f"data.source='tfds:{name}' needs tensorflow-datasets: pip install -e '.[tfds]' ({e})") from None
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # tfds raises many types for a missing dataset
    raise DataError(f"data.source='tfds:{name}' split {split!r} cannot be read: {str(e).splitlines()[0]}") from None
  docs = []
  for i in range(len(source)):
    example = source[i]
    if text_key not in example:
      raise DataError(f'data.tfds_text_key={text_key!r} is not a feature of tfds:{name} ({sorted(example)})')
    text = example[text_key]
    docs.append((f'{i:010d}', text.encode('utf-8') if isinstance(text, str) else bytes(text)))
  return docs


def read_documents(source: str, tfds_split: str = 'train', tfds_text_key: str = 'text',
                   tfds_data_dir: str | None = None) -> list[tuple[str, bytes]]:
  """Reads (key, bytes) documents of a source, sorted by key; raises DataError if none or all empty."""
  if source == 'stdlib':
    root, rels = stdlib_files()
    docs = _read_files(root, rels)
  elif source.startswith('text:'):
    pattern = os.path.expanduser(source[len('text:'):])
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
      raise DataError(f'data.source={source!r} matches no files')
    docs = _read_files('', paths)
  elif source.startswith('tfds:'):
    docs = _tfds_documents(source[len('tfds:'):], tfds_split, tfds_text_key, tfds_data_dir)
  else:
    raise DataError(f'data.source={source!r} is not stdlib, text:GLOB or tfds:NAME')
  docs = [(k, d) for k, d in docs if d]
  if not docs:
    raise DataError(f'data.source={source!r} has no non-empty documents')
  return docs


def fingerprint(docs: list[tuple[str, bytes]]) -> str:
  """sha256 over every (key, length, bytes) in order."""
  h = hashlib.sha256()
  for key, data in docs:
    h.update(key.encode() + b'\0' + str(len(data)).encode() + b'\0')
    h.update(data)
  return h.hexdigest()


def split_documents(docs, heldout_bytes: int, max_fraction: float = 1.0):
  """(train, heldout) document lists.

  Documents are walked in sha256(key) order and each one that still fits under
  cap = min(heldout_bytes, max_fraction * total bytes) joins the held-out split.
  """
  total = sum(len(d) for _, d in docs)
  cap = min(heldout_bytes, int(max_fraction * total))
  ranked = sorted(docs, key=lambda kd: hashlib.sha256(kd[0].encode()).hexdigest())
  held, size = set(), 0
  for key, data in ranked:
    if size + len(data) <= cap:
      held.add(key)
      size += len(data)
  train = [(k, d) for k, d in docs if k not in held]
  heldout = [(k, d) for k, d in docs if k in held]
  return train, heldout


def pack(docs) -> np.ndarray:
  """One uint16 token stream: SEPARATOR, doc bytes, SEPARATOR, doc bytes, ..."""
  parts = []
  for _, data in docs:
    parts.append(np.array([SEPARATOR], np.uint16))
    parts.append(np.frombuffer(data, np.uint8).astype(np.uint16))
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint16)


@functools.lru_cache(maxsize=4)
def load_corpus(source: str, heldout_bytes: int, tfds_split: str = 'train', tfds_text_key: str = 'text',
                tfds_data_dir: str | None = None, heldout_max_fraction: float = 1.0,
                binary_documents: str = 'error') -> Corpus:
  """Reads, fingerprints, splits and packs a corpus (cached per process)."""
  t0 = time.time()
  docs = _screen_binary(read_documents(source, tfds_split, tfds_text_key, tfds_data_dir), source, binary_documents)
  total = sum(len(d) for _, d in docs)
  train, heldout = split_documents(docs, heldout_bytes, heldout_max_fraction)
  held = sum(len(d) for _, d in heldout)
  if not heldout:
    raise DataError(f'data.source={source!r}: no document fits a held-out split of at most {heldout_bytes:,} bytes '
                    f'({heldout_max_fraction:.0%} of {total:,}); raise data.heldout_bytes or add smaller documents')
  if not train:
    raise DataError(f'data.heldout_bytes={heldout_bytes} takes every document of {source!r}; none left to train on')
  if heldout_max_fraction * total < heldout_bytes:
    log.warning('data.heldout_bytes=%d is more than data.heldout_max_fraction=%g of the corpus (%d bytes): the '
                'held-out split holds %d bytes', heldout_bytes, heldout_max_fraction, total, held)
  elif held < heldout_bytes // 2:
    log.warning('the held-out split holds only %d of data.heldout_bytes=%d bytes (its documents are larger than '
                'what was left)', held, heldout_bytes)
  corpus = Corpus(source, fingerprint(docs), pack(train), pack(heldout), len(train), len(heldout))
  log.info('corpus %s: %d documents, %.1f MB, read in %.1f s; train %d tokens (%d docs), held-out %d tokens (%d docs)',
           source, len(docs), total / 1e6, time.time() - t0, corpus.train_tokens.size, len(train),
           corpus.heldout_tokens.size, len(heldout))
  return corpus


def corpus_from_config(data_cfg) -> Corpus:
  """`load_corpus` with the arguments of a `data` config section."""
  return load_corpus(data_cfg.source, data_cfg.heldout_bytes, data_cfg.tfds_split, data_cfg.tfds_text_key,
                     data_cfg.tfds_data_dir, data_cfg.heldout_max_fraction, data_cfg.binary_documents)


class Windows:
  """Random-access windows of L+1 tokens (stride L) over a token stream; a grain source."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len
    self.count = (tokens.size - 1) // seq_len

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.seq_len
    return self.tokens[start:start + self.seq_len + 1].astype(np.int32)


def train_dataset(corpus: Corpus, seq_len: int, batch_size: int, seed: int,
                  rows: tuple[int, int] | None = None) -> grain.IterDataset:
  """Endless shuffled global batches [batch_size, L+1] of training windows.

  rows=(start, stop): only those rows of every global batch (this process's share, from
  `mesh.process_rows`). Every process walks the same seeded order, so the global batch is
  the same for any number of processes, and each reads only its own windows.
  """
  windows = Windows(corpus.train_tokens, seq_len)
  if len(windows) < batch_size:
    raise DataError(f'training split has {len(windows)} windows of {seq_len + 1} tokens; '
                    f'train.batch_size={batch_size} needs at least that many')
  ordered = grain.MapDataset.source(windows).shuffle(seed=seed).repeat(None)
  if rows is None or tuple(rows) == (0, batch_size):
    return ordered.batch(batch_size, drop_remainder=True).to_iter_dataset()
  start, stop = rows
  local = stop - start
  mine = grain.MapDataset.range(len(ordered) // batch_size * local).map(
      lambda j: ordered[(j // local) * batch_size + start + j % local])
  return mine.batch(local, drop_remainder=True).to_iter_dataset()


def heldout_batches(corpus: Corpus, seq_len: int, batch_size: int,
                    max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Fixed held-out batches {'inputs', 'targets', 'weights'} [B, L]; the tail is padded with weight 0."""
  stream = corpus.heldout_tokens.astype(np.int32)
  n_targets = stream.size - 1
  if n_targets < 1:
    raise DataError('held-out split is empty; raise data.heldout_bytes')
  n_windows = -(-n_targets // seq_len)
  pad = n_windows * seq_len + 1 - stream.size
  padded = np.concatenate([stream, np.zeros((pad,), np.int32)])
  weights = np.concatenate([np.ones((n_targets,), np.float32), np.zeros((pad,), np.float32)])
  n_batches = -(-n_windows // batch_size)
  if max_batches is not None:
    n_batches = min(n_batches, max_batches)
  for b in range(n_batches):
    idx = np.arange(b * batch_size, (b + 1) * batch_size)
    valid = idx < n_windows
    starts = np.where(valid, idx, 0) * seq_len
    rows = starts[:, None] + np.arange(seq_len)[None, :]
    yield {'inputs': padded[rows], 'targets': padded[rows + 1],
           'weights': weights[rows] * valid[:, None].astype(np.float32)}

"""A tokenized, split corpus: fingerprint, the document-level held-out split, and packing.

Tokens are bytes 0..255; SEPARATOR (256) starts every document. The corpus fingerprint is
the sha256 of every (key, document) pair in order; it is recorded in every result, because
the stdlib differs across Python versions.

Split: documents are walked in sha256(key) order; each one that still fits is taken into
the held-out set, whose size is capped at min(`data.heldout_bytes`, `data.heldout_max_fraction`
x corpus bytes); the rest is training data. The split depends only on the keys, the sizes and
those two numbers, so it is deterministic and disjoint by construction, and one large
document can never become the whole held-out set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time

import numpy as np

from moejax.data.sources import read_documents, screen_binary
from moejax.errors import DataError

SEPARATOR = 256

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
  docs = screen_binary(read_documents(source, tfds_split, tfds_text_key, tfds_data_dir), source, binary_documents)
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

"""The on-disk token store: its format, and reading it as token streams.

A store is a directory written by `python -m moejax.prepare` (see `preparation.py`):

  manifest.json            written last, atomically: a store without it is never read
  plan.json                what the preparation decided (chunks, held-out keys, tokenizer)
  tokenizer.json|.model    the tokenizer (a copy of the file, or the one trained here)
  train/NNNNNN.bin         training tokens of chunk NNNNNN: headerless little-endian
  heldout/NNNNNN.bin       uint16 (vocabulary <= 65536) or uint32, readable with np.memmap
  chunks/NNNNNN.json       per-chunk counts and sha256 (the resume bookkeeping)

A split's stream is its shards concatenated in chunk order, which is the document order of
the source: [separator, doc tokens..., separator, doc tokens, ...], exactly what packing the
same documents in memory gives. Windows of L+1 tokens may span shards.

Why raw arrays and not ArrayRecord: training reads windows at arbitrary token offsets that
cross document and shard boundaries; a flat array answers that with one positional read
(O(1), no decompression, no record index), and any tool (numpy, MaxText's and OLMo's
readers) opens it. The reader uses positional reads (`os.pread`) rather than mapping the
files, so resident memory stays at the batch however much of a large store a run touches
(mapped pages would count in the process's RSS); the page cache does the caching.

Opening checks the manifest's format version, that every shard exists with the recorded
size, and (`verify='full'`, the default) every shard's sha256 and that every token is
below the vocabulary; `verify='size'` skips the hash pass (about 1 s per GB). Every read
checks its tokens against the vocabulary too. A damaged shard's error ends with the command
that made the store (`prepare_command`): rerunning it re-makes missing and damaged shards.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import threading
from typing import Sequence

import numpy as np

from moejax import files
from moejax.errors import DataError

FORMAT = 'moejax-token-store'
VERSION = 1
SPLITS = ('train', 'heldout')
MANIFEST = 'manifest.json'
VERIFY = ('full', 'size')


class TokenStream:
  """A split's token stream over its shard files: `size`, `dtype`, `stream[a:b]` -> np.ndarray.

  With `vocab_size`, every read checks its tokens are below it (a max over the few thousand
  tokens of a window: nothing next to a step), so a damaged shard that the opening's size
  check let through stops the run with the shard's name, not with a NaN loss.
  """

  def __init__(self, paths: Sequence[str], counts: Sequence[int], dtype, vocab_size: int | None = None,
               advice: str = ''):
    self.dtype = np.dtype(dtype)
    self.vocab_size, self.advice = vocab_size, advice
    keep = [(p, int(n)) for p, n in zip(paths, counts) if n > 0]
    self.paths = [p for p, _ in keep]
    self.counts = np.array([n for _, n in keep], np.int64)
    self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
    self.size = int(self.starts[-1])
    self._fds = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self.size

  def _fd(self, i: int) -> int:
    fd = self._fds.get(i)
    if fd is None:
      with self._lock:
        fd = self._fds.get(i)
        if fd is None:
          try:
            fd = self._fds[i] = os.open(self.paths[i], os.O_RDONLY)
          except OSError as e:
            raise DataError(f'token shard {self.paths[i]} cannot be opened: {e.strerror or e}') from None
    return fd

  def __getitem__(self, index) -> np.ndarray:
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError('a TokenStream reads contiguous slices only')
    start, stop, _ = index.indices(self.size)
    out = np.empty((max(stop - start, 0),), self.dtype)
    pos = start
    shard = int(np.searchsorted(self.starts, start, side='right')) - 1
    item = self.dtype.itemsize
    while pos < stop:
      end = min(stop, int(self.starts[shard + 1]))
      want = (end - pos) * item
      got = os.pread(self._fd(shard), want, (pos - int(self.starts[shard])) * item)
      if len(got) != want:
        raise DataError(f'token shard {self.paths[shard]} is shorter than its manifest says (truncated?)')
      out[pos - start:end - start] = np.frombuffer(got, self.dtype)
      if self.vocab_size is not None and end > pos and int(out[pos - start:end - start].max()) >= self.vocab_size:
        top = int(out[pos - start:end - start].max())
        raise DataError(f'token shard {self.paths[shard]} holds token {top} >= the vocabulary {self.vocab_size} '
                        '(a damaged shard; data.verify_store=\'full\' checks every shard when the store is opened)' +
                        (f'; {self.advice}' if self.advice else ''))
      pos, shard = end, shard + 1
    return out

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds = {}

  def __getstate__(self):  # (grain worker processes reopen the files)
    state = dict(self.__dict__)
    state['_fds'], state['_lock'] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


def shard_problem(path: str, entry: dict, dtype: np.dtype, vocab_size: int, full: bool) -> str | None:
  """What is wrong with a shard file against its manifest entry (size; with `full` sha256 and token range), or None."""
  try:
    size = os.path.getsize(path)
  except OSError:
    return f'token shard {path} is missing'
  want = int(entry['tokens']) * dtype.itemsize
  if size != want:
    return f'token shard {path} has {size} bytes, the manifest says {want} (truncated or damaged shard)'
  if not full:
    return None
  h, top = hashlib.sha256(), 0
  try:
    with open(path, 'rb') as f:
      for block in iter(lambda: f.read(1 << 24), b''):
        h.update(block)
        top = max(top, int(np.frombuffer(block, dtype).max()))
  except OSError as e:
    return f'token shard {path} cannot be read: {e.strerror or e}'
  if h.hexdigest() != entry['sha256']:
    return f'token shard {path} does not match its sha256 in the manifest (corrupt shard)'
  if top >= vocab_size:
    return f'token shard {path} holds token {top} >= the vocabulary {vocab_size} (corrupt shard)'
  return None


# Flags of `python -m moejax.prepare` and their defaults, for the command that re-makes a store.
_PREPARE_FLAGS = (('source', None), ('tokenizer', 'bytes'), ('text_field', 'text'), ('tfds_split', 'train'),
                  ('tfds_text_key', 'text'), ('heldout_bytes', 131072), ('heldout_max_fraction', 0.1),
                  ('binary_documents', 'error'), ('chunk_bytes', 16 << 20), ('dtype', 'auto'),
                  ('separator_token', None), ('tokenizer_train_bytes', 200 << 20))


def prepare_command(directory: str, settings: dict) -> str:
  """The `python -m moejax.prepare` command that made (and re-makes) the store in `directory`."""
  settings = dict(settings)
  tokenizer = settings['tokenizer']
  if ':sha256:' in tokenizer:  # a user's file, recorded by hash: the store's own copy is that file
    kind = tokenizer.split(':', 1)[0]
    copy = 'tokenizer.json' if kind == 'hf' else 'tokenizer.model'
    settings['tokenizer'] = f'{kind}:' + os.path.join(directory, copy)
  parts = ['python -m moejax.prepare', f'--out={shlex.quote(directory)}']
  for name, default in _PREPARE_FLAGS:
    if settings.get(name) is not None and settings.get(name) != default:
      parts.append(shlex.quote(f'--{name}={settings[name]}'))
  return ' '.join(parts)


def repair_advice(directory: str, settings: dict) -> str:
  return (f'rerun the command that made it, which re-makes missing and damaged shards: '
          f'{prepare_command(directory, settings)}')


def _verify_shard(path: str, entry: dict, dtype: np.dtype, vocab_size: int, full: bool, directory: str,
                  settings: dict) -> None:
  problem = shard_problem(path, entry, dtype, vocab_size, full)
  if problem is not None:
    raise DataError(f'{problem}: the store is damaged; {repair_advice(directory, settings)}')


def read_manifest(directory: str) -> dict:
  """The manifest of a complete store (DataError naming the file if missing, foreign or of another version)."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise DataError(f'token store {directory} does not exist (build it with python -m moejax.prepare)')
  if not os.path.exists(path):
    partial = os.path.exists(os.path.join(directory, 'plan.json'))
    raise DataError(f'{path} is missing: ' + (
        'the preparation of this store has not finished (rerun the same moejax.prepare command to resume)'
        if partial else 'not a token store (build one with python -m moejax.prepare)'))
  manifest = files.read_json(path, 'token-store manifest')
  if manifest.get('format') != FORMAT:
    raise DataError(f'{path} is not a moejax token-store manifest')
  if manifest.get('version') != VERSION:
    raise DataError(f'{path} has format version {manifest.get("version")}; this moejax reads version {VERSION} '
                    '(prepare the store again)')
  return manifest


def open_streams(directory: str, verify: str = 'full',
                 manifest: dict | None = None) -> tuple[dict, dict[str, TokenStream]]:
  """(manifest, {'train': TokenStream, 'heldout': TokenStream}) of a complete store (`manifest`: already read)."""
  manifest = manifest or read_manifest(directory)
  dtype = np.dtype(manifest['dtype'])
  vocab = int(manifest['tokenizer']['vocab_size'])
  streams = {}
  for split in SPLITS:
    shards = manifest['splits'][split]['shards']
    paths = [os.path.join(directory, s['file']) for s in shards]
    for path, entry in zip(paths, shards):
      _verify_shard(path, entry, dtype, vocab, verify == 'full', directory, manifest['settings'])
    streams[split] = TokenStream(paths, [s['tokens'] for s in shards], dtype, vocab,
                                 repair_advice(directory, manifest['settings']))
    if streams[split].size == 0:
      raise DataError(f'token store {directory}: the {split} split is empty')
  return manifest, streams

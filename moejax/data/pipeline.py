"""grain pipelines over a corpus's token streams: shuffled training windows and fixed held-out batches.

Packing: each split is one token stream (in memory, or a store's shards read on demand); a
window i covers tokens [i*L, i*L + L] (L+1 tokens: inputs are the first L, targets the last
L), so every token is a target once and windows span document and shard boundaries.
Training draws windows in a seeded grain shuffle (`data.seed`): equal seeds give the same
data order across configurations (paired runs) and across corpora of equal streams. The
iterator state is checkpointable; grain's thread prefetch (`data.read_threads`,
`data.prefetch_batches`) reads ahead of the step.

Hand-written on purpose: the per-process row selection (grain's sharding splits records
between processes, which would change the global batch with the process count) and the
window source itself (grain has no random-access source over a flat token array).
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from moejax.data.corpus import Corpus
from moejax.errors import DataError


class Windows:
  """Random-access windows of L+1 tokens (stride L) over a token stream; a grain source."""

  def __init__(self, tokens, seq_len: int):
    self.tokens, self.seq_len = tokens, seq_len
    self.count = max((tokens.size - 1) // seq_len, 0)

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.seq_len
    return self.tokens[start:start + self.seq_len + 1].astype(np.int32)


def _read_options(read_threads: int, prefetch_batches: int):
  import grain  # pylint: disable=import-outside-toplevel  (grain takes ~1 s to import)
  return grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)


def train_dataset(corpus: Corpus, seq_len: int, batch_size: int, seed: int, rows: tuple[int, int] | None = None,
                  read_threads: int = 2, prefetch_batches: int = 4):
  """Endless shuffled global batches [batch_size, L+1] of training windows (a grain IterDataset).

  rows=(start, stop): only those rows of every global batch (this process's share, from
  `mesh.process_rows`). Every process walks the same seeded order, so the global batch is
  the same for any number of processes, and each reads only its own windows.
  """
  import grain  # pylint: disable=import-outside-toplevel
  windows = Windows(corpus.train_tokens, seq_len)
  if len(windows) < batch_size:
    raise DataError(f'training split has {len(windows)} windows of {seq_len + 1} tokens; '
                    f'train.batch_size={batch_size} needs at least that many')
  options = _read_options(read_threads, prefetch_batches)
  ordered = grain.MapDataset.source(windows).shuffle(seed=seed).repeat(None)
  if rows is None or tuple(rows) == (0, batch_size):
    return ordered.batch(batch_size, drop_remainder=True).to_iter_dataset(options)
  start, stop = rows
  local = stop - start
  mine = grain.MapDataset.range(len(ordered) // batch_size * local).map(
      lambda j: ordered[(j // local) * batch_size + start + j % local])
  return mine.batch(local, drop_remainder=True).to_iter_dataset(options)


class _HeldoutWindows:
  """Held-out windows as {'inputs', 'targets', 'weights'} (the stream's zero-padded tail has weight 0)."""

  def __init__(self, stream: np.ndarray, seq_len: int):
    self.stream, self.seq_len = stream, seq_len
    self.n_targets = stream.size - 1
    self.count = -(-self.n_targets // seq_len)

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    start = int(i) * self.seq_len
    chunk = self.stream[start:start + self.seq_len + 1]
    pad = self.seq_len + 1 - chunk.size
    tokens = np.concatenate([chunk, np.zeros((pad,), np.int32)]) if pad else chunk
    weights = (np.arange(start, start + self.seq_len) < self.n_targets).astype(np.float32)
    return {'inputs': tokens[:-1], 'targets': tokens[1:], 'weights': weights}


def heldout_stream(corpus: Corpus) -> np.ndarray:
  stream = np.asarray(corpus.heldout_tokens[0:corpus.heldout_tokens.size], np.int32)
  if stream.size < 2:
    raise DataError(f'held-out split of {corpus.name} is empty; raise data.heldout_bytes')
  return stream


def heldout_batches(corpus: Corpus, seq_len: int, batch_size: int,
                    max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Fixed held-out batches {'inputs', 'targets', 'weights'} [B, L]; the last one padded with weight-0 rows."""
  import grain  # pylint: disable=import-outside-toplevel
  windows = _HeldoutWindows(heldout_stream(corpus), seq_len)
  batched = grain.MapDataset.source(windows).batch(
      batch_size, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size))
  n = len(batched) if max_batches is None else min(len(batched), max_batches)
  for b in range(n):
    yield batched[b]


def scored_bytes(corpus: Corpus, seq_len: int, batch_size: int, max_batches: int | None = None) -> int:
  """UTF-8 bytes of the held-out text whose tokens `heldout_batches` scores: the bits-per-byte denominator.

  The scored targets are a prefix of the held-out stream (all of it unless `max_batches`
  cuts it); each document's scored tokens are decoded with the corpus's tokenizer and their
  bytes counted, so the number is exact for any tokenizer (for bytes: the non-separator targets).
  """
  stream = heldout_stream(corpus)
  n_windows = -(-(stream.size - 1) // seq_len)
  if max_batches is not None:
    n_windows = min(n_windows, max_batches * batch_size)
  targets = stream[1:1 + n_windows * seq_len]
  separator = corpus.tokenizer.separator
  if corpus.tokenizer.kind == 'bytes':
    return int(np.count_nonzero(targets != separator))
  cuts = np.flatnonzero(targets == separator)
  total, start = 0, 0
  for stop in [*cuts.tolist(), targets.size]:
    if stop > start:
      total += len(corpus.tokenizer.decode(targets[start:stop]))
    start = stop + 1
  return total

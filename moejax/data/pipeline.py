"""grain pipelines over a corpus's token streams: shuffled training windows and fixed held-out batches.

Packing: each split is one token stream; a window i covers tokens [i*L, i*L + L] (L+1
tokens: inputs are the first L, targets the last L), so every token is a target once.
Training draws windows in a seeded grain shuffle (`data.seed`): equal seeds give the same
data order across configurations (paired runs). The iterator state is checkpointable.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

from moejax.data.corpus import Corpus
from moejax.errors import DataError


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

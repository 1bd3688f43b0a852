"""Safetensors checkpoints as HuggingFace shards them, read and written with the `safetensors` package.

One `model.safetensors`, or (above a size) `model-0000i-of-0000n.safetensors` files plus
`model.safetensors.index.json` whose `weight_map` names the file of each tensor. Writes use
`safetensors.numpy.save_file`; reads use `safe_open(..., framework='numpy')`, which
memory-maps a shard and reads a header's shapes without touching the tensor bytes, so a large
checkpoint is read one tensor at a time. Errors are `DataError`s naming the file and key; a
full disk is an `OSError` (ENOSPC), which the writer of the directory turns into one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import Iterable, Iterator

import numpy as np

from moejax.errors import DataError

INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'


def _safetensors():
  try:
    import safetensors  # pylint: disable=import-outside-toplevel
    import safetensors.numpy  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:  # declared in setup.cfg; only a broken environment lacks it
    raise DataError('the safetensors package is missing: pip install safetensors') from None
  return safetensors


def save(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
  """Writes `tensors` (numpy arrays, ml_dtypes bfloat16 included) to one safetensors file."""
  st = _safetensors()
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  try:
    st.numpy.save_file(tensors, path, metadata=metadata)
  except st.SafetensorError as e:  # the Rust writer reports I/O errors as text
    if 'os error 28' in str(e):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
    raise OSError(errno.EIO, str(e), path) from None


def save_sharded(tensors: dict[str, np.ndarray], directory: str, max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> list[str]:
  """`model.safetensors`, or (above `max_shard_bytes`) numbered shards and the index; returns the file names."""
  total = sum(v.nbytes for v in tensors.values())
  if total <= max_shard_bytes:
    save(tensors, os.path.join(directory, SINGLE), metadata)
    return [SINGLE]
  shards, current, size = [], {}, 0
  for name, array in tensors.items():
    if current and size + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = array
    size += array.nbytes
  shards.append(current)
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    fname = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save(shard, os.path.join(directory, fname), metadata)
    files.append(fname)
    weight_map.update({name: fname for name in shard})
  with open(os.path.join(directory, INDEX), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return files + [INDEX]


@contextlib.contextmanager
def open_file(path: str) -> Iterator:
  """`safe_open(path, framework='numpy')` (memory-mapped), with a DataError naming the file if it is not one."""
  st = _safetensors()
  try:
    handle = st.safe_open(path, framework='numpy')
  except (st.SafetensorError, OSError) as e:
    raise DataError(f'{path} is not a readable safetensors file: {str(e).splitlines()[0]}') from None
  with handle as f:
    yield f


def shapes(path: str) -> dict[str, list[int]]:
  """{tensor name: shape} of one safetensors file, from its header only."""
  with open_file(path) as f:
    return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}


def load(path: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """The tensors of one safetensors file (or only `names`), as numpy arrays in their stored dtype."""
  st = _safetensors()
  with open_file(path) as f:
    have = set(f.keys())
    out = {}
    for name in (names if names is not None else sorted(have)):
      if name not in have:
        raise DataError(f'{path} has no tensor {name}')
      try:
        out[name] = f.get_tensor(name)
      except st.SafetensorError as e:
        raise DataError(f'{path}: tensor {name} cannot be read: {str(e).splitlines()[0]}') from None
  return out


def weight_files(directory: str) -> dict[str, str]:
  """{tensor name: file path} of a checkpoint directory (sharded with an index, or one model.safetensors)."""
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
      weight_map = {str(k): str(v) for k, v in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise DataError(f'{index} is not a safetensors index (a JSON object with a weight_map): {e}') from None
    for fname in set(weight_map.values()):
      if not os.path.exists(os.path.join(directory, fname)):
        raise DataError(f'{index} names {fname}, which is missing from {directory}')
    return {name: os.path.join(directory, fname) for name, fname in weight_map.items()}
  single = os.path.join(directory, SINGLE)
  if not os.path.exists(single):
    raise DataError(f'{directory} holds no weights: neither {SINGLE} nor {INDEX}')
  return {name: single for name in shapes(single)}


def load_dir(directory: str, names: Iterable[str]) -> dict[str, np.ndarray]:
  """The named tensors of a checkpoint directory; a missing one is a DataError naming it."""
  files = weight_files(directory)
  by_file: dict[str, list[str]] = {}
  for name in names:
    if name not in files:
      raise DataError(f'{directory}: the checkpoint has no tensor {name}')
    by_file.setdefault(files[name], []).append(name)
  out = {}
  for path, wanted in by_file.items():
    out.update(load(path, wanted))
  return out

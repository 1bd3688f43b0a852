"""A small reader and writer of the safetensors format, with HuggingFace's sharded index.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length
N, N bytes of JSON {name: {'dtype', 'shape', 'data_offsets': [begin, end]}, '__metadata__':
{str: str}}, then the raw little-endian tensor bytes (offsets relative to the end of the
header). BF16 arrays use ml_dtypes' bfloat16 (shipped with jax). Sharded checkpoints are
`model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json` whose
`weight_map` names the file of each tensor. Errors are `DataError`s naming the file and key.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

from moejax.errors import DataError

DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16, 'I64': np.int64,
          'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'


def _header(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
  header, offset = {}, 0
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  for name, array in tensors.items():
    if array.dtype not in NAMES:
      raise DataError(f'tensor {name}: dtype {array.dtype} has no safetensors name')
    header[name] = {'dtype': NAMES[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + array.nbytes]}
    offset += array.nbytes
  text = json.dumps(header, separators=(',', ':')).encode()
  return text + b' ' * (-len(text) % 8)  # pad to 8 bytes, as the reference writer does


def save(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
  """Writes `tensors` (numpy arrays, any supported dtype) to one safetensors file."""
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  header = _header(tensors, metadata)
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(header)))
    f.write(header)
    for array in tensors.values():
      f.write(array.astype(array.dtype.newbyteorder('<'), copy=False).tobytes())


def read_header(path: str) -> dict:
  """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets; '__metadata__')."""
  try:
    with open(path, 'rb') as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise DataError(f'{path} is not a safetensors file (shorter than its 8-byte header length)')
      (n,) = struct.unpack('<Q', raw)
      if n > os.path.getsize(path) - 8:
        raise DataError(f'{path} is not a safetensors file (header length {n} exceeds the file)')
      return json.loads(f.read(n))
  except (OSError, ValueError) as e:
    raise DataError(f'cannot read the safetensors header of {path}: {e}') from None


def load(path: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
  """The tensors of one safetensors file (or only `names`), as numpy arrays in their stored dtype."""
  header = read_header(path)
  start = 8 + struct.unpack('<Q', open(path, 'rb').read(8))[0]
  data = np.memmap(path, dtype=np.uint8, mode='r')
  out = {}
  for name in (names if names is not None else [k for k in header if k != '__metadata__']):
    entry = header.get(name)
    if entry is None:
      raise DataError(f'{path} has no tensor {name}')
    if entry.get('dtype') not in DTYPES:
      raise DataError(f'{path}: tensor {name} has unsupported dtype {entry.get("dtype")!r}')
    begin, end = entry['data_offsets']
    dtype = np.dtype(DTYPES[entry['dtype']]).newbyteorder('<')
    if end - begin != int(np.prod(entry['shape'], dtype=np.int64)) * dtype.itemsize or start + end > data.size:
      raise DataError(f'{path}: tensor {name} has data_offsets {entry["data_offsets"]} that do not fit its '
                      f'shape {entry["shape"]} and dtype {entry["dtype"]}')
    out[name] = np.array(data[start + begin:start + end].view(dtype).reshape(entry['shape']))
  return out


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


def weight_files(directory: str) -> dict[str, str]:
  """{tensor name: file path} of a checkpoint directory (sharded with an index, or one model.safetensors)."""
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f'{index} is not a safetensors index (a JSON object with a weight_map): {e}') from None
    for fname in set(weight_map.values()):
      if not os.path.exists(os.path.join(directory, fname)):
        raise DataError(f'{index} names {fname}, which is missing from {directory}')
    return {name: os.path.join(directory, fname) for name, fname in weight_map.items()}
  single = os.path.join(directory, SINGLE)
  if not os.path.exists(single):
    raise DataError(f'{directory} holds no weights: neither {SINGLE} nor {INDEX}')
  return {name: single for name in read_header(single) if name != '__metadata__'}


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

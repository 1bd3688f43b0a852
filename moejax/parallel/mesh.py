"""Device mesh construction and the ONLY logical-axis rules table.

Every parameter carries `logical_axes` metadata (for example `('embed', 'mlp')`);
`LOGICAL_AXIS_RULES` maps each logical name to mesh axes. Nothing else in
moejax writes a `PartitionSpec` by hand outside `shard_map` regions.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')

# logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: dict[str, Any] = {
    'batch': ('data', 'fsdp', 'expert'),  # tokens span every axis but tensor: expert devices hold different tokens
    'length': None,
    'vocab': None,  # byte vocabularies (257) divide no mesh axis; the embed dim is sharded instead
    'embed': 'fsdp',  # FSDP shards parameters along the model dim
    'mlp': 'tensor',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'expert': 'expert',
    'expert_mlp': 'tensor',
    'router_experts': None,  # router output columns stay whole: routing needs all scores
    'layers': None,  # a scanned model's stacked layers (model/stack.py): each device holds every layer's shard
}


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec via LOGICAL_AXIS_RULES; raises on unknown or reused axes."""
  spec, used = [], set()
  for name in names:
    if name is None:
      spec.append(None)
      continue
    if name not in LOGICAL_AXIS_RULES:
      raise ConfigError(f'unknown logical axis name {name!r}; known: {sorted(LOGICAL_AXIS_RULES)}')
    axes = LOGICAL_AXIS_RULES[name]
    axes_tuple = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    clash = used.intersection(axes_tuple)
    if clash:
      raise ConfigError(f'logical axes {tuple(names)} map mesh axis {sorted(clash)} twice')
    used.update(axes_tuple)
    spec.append(axes)
  return PartitionSpec(*spec)


def resolve_sizes(mesh_cfg, device_count: int) -> dict[str, int]:
  """Mesh axis sizes with a -1 axis (at most one) filled by the remaining devices; checks the device count.

  In a multi-process run the mesh must use every device (each process feeds its own).
  A single process may use a subset (a warning says so), never more than it sees.
  """
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  fill = [a for a, n in sizes.items() if n == -1]
  bad = [f'{a}={n}' for a, n in sizes.items() if n == 0 or n < -1]
  if bad or len(fill) > 1:
    raise ConfigError(f'mesh sizes must be >= 1 with at most one -1 (fill): got {", ".join(bad or fill)}')
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if fill:
    if device_count % fixed:
      raise ConfigError(f'mesh.{fill[0]}=-1: {device_count} devices are not divisible by the other axes ({fixed})')
    sizes[fill[0]] = device_count // fixed
  need = math.prod(sizes.values())
  if need > device_count:
    raise ConfigError(f'mesh {sizes} needs {need} devices but only {device_count} are visible')
  if need < device_count:
    if jax.process_count() > 1:
      raise ConfigError(f'mesh {sizes} uses {need} of {device_count} devices; a multi-process run must use all '
                        '(set one mesh axis to -1)')
    log.warning('mesh %s uses %d of the %d visible devices', sizes, need, device_count)
  return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, expert, tensor) mesh (sizes from `resolve_sizes`).

  Axis types are Auto so jit propagates shardings (jax.make_mesh defaults to Explicit,
  which rejects mixing differently sharded operands). Devices keep `jax.devices()` order:
  process-major, so each process's devices hold a contiguous range of the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_sizes(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  grid = np.array(devices[:math.prod(shape)]).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch dim is split (the product of the 'batch' rule's axes)."""
  axes = LOGICAL_AXIS_RULES['batch']
  return math.prod(mesh.shape[a] for a in axes)


def check_batch(batch_size: int, mesh: Mesh, what: str) -> None:
  """Raises ConfigError unless `batch_size` splits evenly over the mesh's batch axes."""
  ways = batch_shards(mesh)
  if batch_size % ways:
    axes = '*'.join(f'{a}={mesh.shape[a]}' for a in LOGICAL_AXIS_RULES['batch'])
    raise ConfigError(f'{what}={batch_size} must be divisible by the batch axes {axes} ({ways})')


def logical_axes_tree(state: nnx.State) -> Any:
  """A pure-dict tree of logical axis tuples, parallel to `nnx.to_pure_dict(state)`."""
  def axes(var):
    names = getattr(var, 'logical_axes', None)
    if names is None:
      raise ConfigError(f'parameter of shape {var.shape} has no logical_axes metadata')
    return names
  tree = jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def canonical_spec(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """`spec` without size-1 mesh axes and trailing Nones: the form jit gives its outputs.

  Placing inputs in that form lets step n+1 hit step n's compiled executable (a spec that
  only differs by a size-1 axis is a different cache key).
  """
  dims = []
  for axes in spec:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept = tuple(a for a in axes if mesh.shape[a] > 1)
    dims.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  while dims and dims[-1] is None:
    dims.pop()
  return PartitionSpec(*dims)


def param_shardings(state: nnx.State, mesh: Mesh) -> Any:
  """NamedShardings for every parameter; a dim that its mesh axes do not divide raises ConfigError."""
  axes_tree = logical_axes_tree(state)
  shapes = nnx.to_pure_dict(jax.tree.map(lambda v: v.shape, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))

  def sharding(path, names):
    spec = logical_to_spec(names)
    shape = _leaf_at(shapes, path)
    for dim, (size, axes) in enumerate(zip(shape, spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        name = '.'.join(str(getattr(k, 'key', k)) for k in path)
        raise ConfigError(f'parameter {name} dim {dim} ({names[dim]}={size}) is not divisible by mesh axes '
                          f'{"*".join(axes)}={ways}')
    return NamedSharding(mesh, canonical_spec(spec, mesh))

  return jax.tree_util.tree_map_with_path(sharding, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def _leaf_at(tree: Any, path) -> Any:
  for key in path:
    tree = tree[getattr(key, 'key', getattr(key, 'idx', key))]
  return tree


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole value."""
  return NamedSharding(mesh, PartitionSpec())


def under_mesh(fn, mesh: Mesh | None):
  """`fn` called (and so traced) under `jax.set_mesh(mesh)`; `fn` itself when mesh is None.

  The MoE layer reads the context mesh to decide on expert parallelism. The wrapper keeps
  the jitted function's `lower` and `_cache_size` reachable.
  """
  if mesh is None:
    return fn

  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  def lower(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn.lower(*args, **kwargs)
  call.lower, call._cache_size = lower, fn._cache_size  # pylint: disable=protected-access
  return call


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a [B, ...] input batch: the batch dim across the 'batch' rule's axes."""
  return NamedSharding(mesh, canonical_spec(logical_to_spec(('batch',) + (None,) * (ndim - 1)), mesh))


def process_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """[start, stop) of the global batch rows this process's devices hold (one contiguous range).

  The data pipeline reads exactly these rows of every global batch, so the global batch
  is the same for any number of processes.
  """
  index_map = sharding.addressable_devices_indices_map((batch_size, 1))
  starts = sorted({idx[0].indices(batch_size)[:2] for idx in index_map.values()})
  start, stop = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in starts)
  if covered != stop - start:
    raise ConfigError(f'this process holds batch rows {starts}, not one contiguous range; '
                      'keep the mesh in jax.devices() order')
  return start, stop


def global_batch(local_rows: np.ndarray, sharding: NamedSharding, batch_size: int) -> jax.Array:
  """The global [B, ...] array from this process's rows (`process_rows`)."""
  return jax.make_array_from_process_local_data(sharding, local_rows, (batch_size,) + local_rows.shape[1:])

"""Device mesh construction and the ONLY logical-axis rules table.

Every parameter carries `logical_axes` metadata (for example `('embed', 'mlp')`);
`LOGICAL_AXIS_RULES` maps each logical name to mesh axes. Nothing else in
moejax writes a `PartitionSpec` by hand outside `shard_map` regions.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')

# logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: dict[str, Any] = {
    'batch': ('data', 'fsdp'),  # activations' batch dim spans every data-like axis
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


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, expert, tensor) mesh over the first prod(sizes) devices.

  Axis types are Auto so jit propagates shardings (jax.make_mesh defaults to
  Explicit, which rejects mixing differently sharded operands).
  """
  shape = tuple(int(mesh_cfg[a]) for a in MESH_AXES)
  devices = list(jax.devices() if devices is None else devices)
  need = math.prod(shape)
  if need > len(devices):
    raise ConfigError(f'mesh {dict(zip(MESH_AXES, shape))} needs {need} devices but only {len(devices)} are visible')
  grid = np.array(devices[:need]).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


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


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a [B, ...] input batch: the batch dim across data-like axes."""
  return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1)))

"""The logical-axis rules table and mesh construction."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax import config as config_lib
from moejax.parallel import mesh as mesh_lib
from moejax.errors import ConfigError


def test_logical_to_spec_uses_rules_table():
  assert mesh_lib.logical_to_spec(('embed', 'mlp')) == P('fsdp', 'tensor')
  assert mesh_lib.logical_to_spec(('batch', None)) == P(('data', 'fsdp', 'expert'), None)
  assert mesh_lib.logical_to_spec(('expert', 'embed', 'expert_mlp')) == P('expert', 'fsdp', 'tensor')


def test_logical_to_spec_rejects_unknown_and_conflicting_names():
  with pytest.raises(ConfigError, match='unknown logical axis name'):
    mesh_lib.logical_to_spec(('embd',))
  with pytest.raises(ConfigError, match='twice'):
    mesh_lib.logical_to_spec(('mlp', 'heads'))


def test_make_mesh_sizes_and_too_many_devices(tiny_cfg):
  assert jax.device_count() == 8
  cfg = config_lib.apply_overrides(tiny_cfg, {'mesh.data': 2, 'mesh.expert': 2})
  mesh = mesh_lib.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 1, 'expert': 2, 'tensor': 1}
  with pytest.raises(ConfigError, match='needs 16 devices'):
    mesh_lib.make_mesh(config_lib.apply_overrides(tiny_cfg, {'mesh.data': 16}).mesh)


def test_every_parameter_has_logical_axes(tiny_cfg):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.model import transformer as model_lib  # pylint: disable=import-outside-toplevel
  state = nnx.state(model_lib.build(tiny_cfg), nnx.Param)
  axes = mesh_lib.logical_axes_tree(state)
  params = nnx.to_pure_dict(state)
  for names, p in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(params)):
    assert len(names) == p.ndim


def test_param_shardings_reject_indivisible_dims(tiny_cfg):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.model import transformer as model_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.apply_overrides(tiny_cfg, {'mesh.tensor': 2})  # tiny has num_kv_heads=1
  state = nnx.state(model_lib.build(cfg), nnx.Param)
  with pytest.raises(ConfigError, match=r'parameter blocks.0.attn.wk dim 1 \(kv_heads=1\) is not divisible by mesh axes tensor=2'):
    mesh_lib.param_shardings(state, mesh_lib.make_mesh(cfg.mesh))


def test_resolve_sizes_fills_one_axis_and_checks_devices(tiny_cfg):
  sizes = lambda **kw: mesh_lib.resolve_sizes(config_lib.apply_overrides(
      tiny_cfg, {f'mesh.{k}': v for k, v in kw.items()}).mesh, 8)
  assert sizes(data=-1) == {'data': 8, 'fsdp': 1, 'expert': 1, 'tensor': 1}
  assert sizes(data=2, expert=-1) == {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}
  with pytest.raises(ConfigError, match='not divisible by the other axes'):
    sizes(data=-1, tensor=3)
  with pytest.raises(ConfigError, match='at most one -1'):
    sizes(data=-1, fsdp=-1)


def test_process_rows_and_global_batch(tiny_cfg):
  """One process holds the whole batch; the global array is the local rows on the batch sharding."""
  mesh = mesh_lib.make_mesh(config_lib.apply_overrides(tiny_cfg, {'mesh.data': 2, 'mesh.expert': 4}).mesh)
  sharding = mesh_lib.batch_sharding(mesh, 2)
  assert mesh_lib.process_rows(sharding, 16) == (0, 16)
  rows = np.arange(16 * 3).reshape(16, 3)
  x = mesh_lib.global_batch(rows, sharding, 16)
  np.testing.assert_array_equal(np.asarray(x), rows)
  assert len(x.sharding.device_set) == 8 and x.addressable_shards[0].data.shape == (2, 3)

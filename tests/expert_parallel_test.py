"""Expert parallelism (shard_map all-to-all) against the single-device model: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib, expert_parallel, mesh as mesh_lib, model as model_lib


def _loss_and_grads(cfg, tokens):
  """(loss, aux, grads) of a fixed loss of the model built from `cfg`, run on cfg's mesh."""
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, params, buffers = model_lib.split(model_lib.build(cfg))
  shardings = mesh_lib.param_shardings(params, mesh)
  params = jax.device_put(nnx.to_pure_dict(params), shardings)
  buffers = nnx.to_pure_dict(buffers)

  def loss(p, tokens):
    logits, aux = nnx.merge(graphdef, p, buffers)(tokens, train=True, rng=jax.random.key(1))
    return jnp.mean(logits ** 2) + aux['aux_loss'] + aux['z_loss'], aux
  with jax.set_mesh(mesh):
    tokens = jax.device_put(tokens, mesh_lib.batch_sharding(mesh, 2))
    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, tokens)
  return value, aux, grads


@pytest.fixture(scope='module')
def ep_cfg(corpus_glob):
  from testdata import tiny  # pylint: disable=import-outside-toplevel
  cfg = tiny.get_config(corpus_glob)
  return config_lib.apply_overrides(cfg, {'moe.num_experts': 8, 'train.batch_size': 8,
                                          'moe.load_balancing': 'global_batch'})


@pytest.fixture(scope='module')
def single(ep_cfg):
  tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 256)
  return tokens, _loss_and_grads(ep_cfg, tokens)


@pytest.mark.parametrize('data,expert', [(1, 8), (2, 4), (8, 1)])
def test_expert_parallel_matches_single_device(ep_cfg, single, data, expert):
  """Meshes (data x expert) 1x8, 2x4, 8x1: same loss, global-batch balance loss, counts and every gradient."""
  tokens, (value, aux, grads) = single
  cfg = config_lib.apply_overrides(ep_cfg, {'mesh.data': data, 'mesh.expert': expert})
  got_value, got_aux, got_grads = _loss_and_grads(cfg, tokens)
  np.testing.assert_allclose(got_value, value, rtol=2e-5)
  np.testing.assert_allclose(got_aux['aux_loss'], aux['aux_loss'], rtol=2e-5)
  np.testing.assert_array_equal(got_aux['expert_counts'], aux['expert_counts'])
  if expert > 1:
    assert float(jnp.max(got_aux['ep_drop_fraction'])) == 0.0  # the default buffer never drops
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_expert_parallel_capacity_buffer_drops_and_reports(ep_cfg, single):
  """A small per-destination buffer drops assignments, reports the fraction, and changes the output."""
  tokens, (value, _, _) = single
  cfg = config_lib.apply_overrides(ep_cfg, {'mesh.expert': 4, 'moe.expert_parallel_capacity_factor': 0.25})
  got_value, aux, _ = _loss_and_grads(cfg, tokens)
  drop = np.asarray(aux['ep_drop_fraction'])
  assert (drop > 0.2).all() and (drop < 1).all(), drop
  assert abs(float(got_value) - float(value)) > 1e-6


def test_capacity_rows():
  assert expert_parallel.capacity_rows(64, 4, None) == 64
  assert expert_parallel.capacity_rows(64, 4, 1.0) == 16
  assert expert_parallel.capacity_rows(64, 4, 1.1) == 24  # rounded up to a multiple of 8
  assert expert_parallel.capacity_rows(64, 4, 100.0) == 64

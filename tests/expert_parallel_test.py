"""Expert parallelism (shard_map all-to-all) against the single-device model: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.parallel import expert as expert_parallel
from moejax.parallel import mesh as mesh_lib
from moejax.model import transformer as model_lib


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


@pytest.mark.parametrize('data,expert,exchange', [  # the default suite keeps one mesh per exchange
    pytest.param(1, 8, 'all_to_all', marks=pytest.mark.slow), (2, 4, 'all_to_all'),
    pytest.param(8, 1, 'all_to_all', marks=pytest.mark.slow), (1, 8, 'ragged'),
    pytest.param(2, 4, 'ragged', marks=pytest.mark.slow)])
def test_expert_parallel_matches_single_device(ep_cfg, single, data, expert, exchange):
  """Meshes (data x expert) 1x8, 2x4, 8x1, both exchanges (ragged emulated on CPU): same loss, global-batch
  balance loss, counts and every gradient."""
  tokens, (value, aux, grads) = single
  cfg = config_lib.apply_overrides(ep_cfg, {'mesh.data': data, 'mesh.expert': expert,
                                            'moe.expert_parallel_exchange': exchange})
  got_value, got_aux, got_grads = _loss_and_grads(cfg, tokens)
  np.testing.assert_allclose(got_value, value, rtol=2e-5)
  np.testing.assert_allclose(got_aux['aux_loss'], aux['aux_loss'], rtol=2e-5)
  np.testing.assert_array_equal(got_aux['expert_counts'], aux['expert_counts'])
  if expert > 1:
    assert float(jnp.max(got_aux['ep_drop_fraction'])) == 0.0  # the default buffer never drops
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('exchange', ['all_to_all', 'ragged'])
def test_expert_parallel_capacity_buffer_drops_and_reports(ep_cfg, single, exchange):
  """A small buffer drops assignments, reports the fraction, and changes the output."""
  tokens, (value, _, _) = single
  cfg = config_lib.apply_overrides(ep_cfg, {'mesh.expert': 4, 'moe.expert_parallel_capacity_factor': 0.25,
                                            'moe.expert_parallel_exchange': exchange})
  got_value, aux, _ = _loss_and_grads(cfg, tokens)
  drop = np.asarray(aux['ep_drop_fraction'])
  assert (drop > 0.2).all() and (drop < 1).all(), drop
  assert abs(float(got_value) - float(value)) > 1e-6


def test_a_capacity_factor_drops_nothing_without_an_expert_axis(ep_cfg, single):
  """data 8 x expert 1: nothing is exchanged, so even a tiny factor keeps every assignment."""
  tokens, (value, _, _) = single
  cfg = config_lib.apply_overrides(ep_cfg, {'mesh.data': 8, 'moe.expert_parallel_capacity_factor': 0.25})
  got_value, aux, _ = _loss_and_grads(cfg, tokens)
  assert float(jnp.max(aux['ep_drop_fraction'])) == 0.0
  np.testing.assert_allclose(got_value, value, rtol=2e-5)


def test_capacity_rows():
  assert expert_parallel.capacity_rows(64, 4, None) == 64
  assert expert_parallel.capacity_rows(64, 4, 1.0) == 16
  assert expert_parallel.capacity_rows(64, 4, 1.1) == 24  # rounded up to a multiple of 8
  assert expert_parallel.capacity_rows(64, 4, 100.0) == 64


def test_receive_rows():
  assert expert_parallel.receive_rows(64, 4, None) == 256
  assert expert_parallel.receive_rows(64, 4, 1.25) == 80
  assert expert_parallel.receive_rows(64, 4, 100.0) == 256


def test_emulated_ragged_all_to_all_follows_the_documented_semantics():
  """The example of jax.lax.ragged_all_to_all's docstring, on 2 devices: emulation == the documented result."""
  mesh = jax.make_mesh((2,), ('expert',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
  operand = jnp.array([[1, 2, 2], [3, 4, 0]], jnp.float32)  # per device
  output = jnp.zeros((2, 4), jnp.float32)
  input_offsets = jnp.array([[0, 1], [0, 1]], jnp.int32)
  send_sizes = jnp.array([[1, 2], [1, 1]], jnp.int32)
  output_offsets = jnp.array([[0, 0], [1, 2]], jnp.int32)
  recv_sizes = jnp.array([[1, 1], [2, 1]], jnp.int32)
  spec = jax.sharding.PartitionSpec('expert')
  f = jax.shard_map(lambda *a: expert_parallel.emulated_ragged_all_to_all(*(x[0] for x in a))[None], mesh=mesh,
                    in_specs=(spec,) * 6, out_specs=spec)
  got = f(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
  np.testing.assert_array_equal(got, [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_ragged_exchange_lowers_for_gpu(ep_cfg):
  """With the GPU target, the ragged path lowers to XLA's ragged-all-to-all (running it needs a GPU or TPU)."""
  from moejax import kernels  # pylint: disable=import-outside-toplevel
  cfg = config_lib.apply_overrides(ep_cfg, {'mesh.expert': 8, 'moe.expert_parallel_exchange': 'auto'})
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, params, buffers = model_lib.split(model_lib.build(cfg))
  params = jax.device_put(nnx.to_pure_dict(params), mesh_lib.param_shardings(params, mesh))
  buffers = nnx.to_pure_dict(buffers)
  tokens = jax.device_put(jnp.zeros((8, 16), jnp.int32), mesh_lib.batch_sharding(mesh, 2))

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, buffers)(tokens, train=True, rng=jax.random.key(1))
    return jnp.mean(logits ** 2)
  with kernels.target('gpu'), jax.set_mesh(mesh):
    exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=['cuda'], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call('ragged_all_to_all')])(params)
  text = exported.mlir_module()
  # per layer: x, expert ids and y forward; the transposes of the two float exchanges backward
  assert text.count('custom_call @ragged_all_to_all') == 2 * (3 + 2)

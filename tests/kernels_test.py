"""Kernels against their reference twins (Pallas in interpret mode on CPU): outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config as config_lib, routing
from moejax.model import transformer as model_lib
from moejax.kernels import gmm, permute, router

TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _plan(T, K, E, block, skew, key):
  """Random assignments; skewed: 70% on expert 0 and expert E-2 never chosen (an empty group)."""
  if skew:
    p = np.full(E, 0.3 / (E - 2))
    p[0], p[E - 2] = 0.7, 0.0
    experts = jax.random.choice(key, E, (T, K), p=jnp.asarray(p))
  else:
    experts = jax.random.randint(key, (T, K), 0, E)
  return experts, routing.block_plan(experts, E, block)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('T,K,E,D,F,block,tile,skew', [
    (40, 2, 5, 16, 24, 8, 8, True),     # skewed, one empty expert, F tiled by 8
    (33, 3, 7, 8, 20, 16, 128, False),  # T*K not a block multiple; F not a tile multiple (whole-width tile)
    pytest.param(16, 1, 3, 32, 16, 8, 16, True, marks=pytest.mark.slow),  # (the two above cover its paths)
])
def test_block_gmm_matches_reference(dtype, T, K, E, D, F, block, tile, skew):
  _, plan = _plan(T, K, E, block, skew, jax.random.key(T))
  R = plan.row_token_R.shape[0]
  x = jax.random.normal(jax.random.key(1), (R, D), dtype)
  x = jnp.where((plan.row_token_R < T)[:, None], x, 0).astype(dtype)  # padding rows are zeros, as in dispatch
  w = (jax.random.normal(jax.random.key(2), (E, D, F)) / np.sqrt(D)).astype(dtype)
  be = plan.block_expert_N

  def loss(impl):
    return lambda x, w: jnp.sum(jnp.sin(gmm.block_gmm(x, w, be, block, impl, tile=tile).astype(jnp.float32)))
  ref, got = gmm.block_gmm(x, w, be, block, 'reference'), gmm.block_gmm(x, w, be, block, 'pallas', tile=tile)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), **TOL[dtype])
  for a, b in zip(jax.grad(loss('reference'), (0, 1))(x, w), jax.grad(loss('pallas'), (0, 1))(x, w)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), **TOL[dtype])
  if skew:  # the empty expert (no block: never written by the kernel) gets exactly zero weight gradient
    assert not (be == E - 2).any() and not np.asarray(jax.grad(loss('pallas'), 1)(x, w)[E - 2], np.float32).any()


def test_block_gmm_agrees_with_the_megablox_kernel():
  """An independent oracle: jax's own megablox grouped matmul on the same layout, outputs and gradients."""
  _, plan = _plan(40, 2, 5, 8, True, jax.random.key(7))
  R = plan.row_token_R.shape[0]
  x = jax.random.normal(jax.random.key(1), (R, 16))
  w = jax.random.normal(jax.random.key(2), (5, 16, 24))
  be = plan.block_expert_N

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))
  ours = loss(lambda x, w: gmm.block_gmm(x, w, be, 8, 'pallas', tile=8))
  theirs = loss(lambda x, w: gmm.megablox_gmm(x, w, be, 8, tiling=(8, 16, 24)))
  np.testing.assert_allclose(ours(x, w), theirs(x, w), rtol=1e-5)
  for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(theirs, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_block_gmm_rejects_rows_off_the_block_grid():
  with pytest.raises(ValueError, match='not a multiple of block_size=8'):
    gmm.block_gmm(jnp.zeros((12, 4)), jnp.zeros((2, 4, 4)), jnp.zeros((1,), jnp.int32), 8, 'pallas')


@pytest.mark.parametrize('score,renormalize', [('softmax', False), ('softmax', True), ('sigmoid', True)])
def test_router_kernel_matches_reference(score, renormalize):
  z = jax.random.normal(jax.random.key(0), (37, 8)).at[3].set(0.0)  # 37 rows: not a block multiple; row 3 all ties
  bias = jax.random.normal(jax.random.key(1), (8,)) * 0.1
  ref = router.route(z, 3, score, bias, renormalize, 2.0, impl='reference')
  got = router.route(z, 3, score, bias, renormalize, 2.0, impl='pallas', block_rows=16)
  np.testing.assert_array_equal(got[1], ref[1])
  np.testing.assert_array_equal(got[3], ref[3])
  assert int(got[3].sum()) == 37 * 3
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got[2], ref[2], rtol=1e-6, atol=1e-7)

  def loss(impl):
    def f(z):
      scores, _, gates, _ = router.route(z, 3, score, bias, renormalize, 2.0, impl=impl, block_rows=16)
      return jnp.sum(jnp.sin(gates)) + jnp.sum(scores ** 2)
    return f
  np.testing.assert_allclose(jax.grad(loss('pallas'))(z), jax.grad(loss('reference'))(z), rtol=1e-5, atol=1e-7)


def test_gather_kernel(dtype=jnp.bfloat16):
  x = jax.random.normal(jax.random.key(0), (13, 24), dtype)
  for m in (16, 7):  # a multiple of rows_per_step, and not
    idx = jax.random.randint(jax.random.key(m), (m,), 0, 13)
    np.testing.assert_array_equal(permute.gather_rows(x, idx, 'pallas'), x[idx])


@pytest.mark.parametrize('skew', [False, True])
def test_gather_only_permutes_match_reference(skew):
  T, K, E, D, block = 24, 2, 4, 8, 8
  experts, plan = _plan(T, K, E + 1, block, skew, jax.random.key(3))  # id E plays the dropped/invalid group
  x = jax.random.normal(jax.random.key(4), (T, D))
  gates = jax.random.uniform(jax.random.key(5), (T, K))
  gates = jnp.where(experts == E, 0.0, gates)
  proj = jax.random.normal(jax.random.key(6), (D, D))

  def loss(impl):
    def f(x, gates):
      rows = permute.dispatch_rows(x, plan, impl)
      return jnp.sum(jnp.sin(permute.combine_rows(jnp.tanh(rows @ proj), gates, plan, impl)))
    return f
  for impl in ('xla', 'pallas'):
    assert np.allclose(loss(impl)(x, gates), loss('reference')(x, gates))
    for a, b in zip(jax.grad(loss('reference'), (0, 1))(x, gates), jax.grad(loss(impl), (0, 1))(x, gates)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  # The gather-only backward has no scatter in its HLO.
  hlo = jax.jit(jax.grad(loss('xla'), (0, 1))).lower(x, gates).as_text()
  assert 'scatter' not in hlo


@pytest.mark.parametrize('overrides', [  # the sigmoid case runs every default-suite code path; the rest are slow
    pytest.param({}, marks=pytest.mark.slow),
    pytest.param({'moe.router_score': 'sigmoid', 'moe.load_balancing': 'aux_free'}, marks=pytest.mark.slow),
    pytest.param({'moe.expert_size_classes': '2x16,2x48', 'moe.num_shared_experts': 1}, marks=pytest.mark.slow),
    pytest.param({'moe.num_expert_groups': 2, 'moe.topk_expert_groups': 1}, marks=pytest.mark.slow)])  # pallas falls back
def test_moe_layer_is_the_same_with_every_kernel_implementation(tiny_cfg, overrides):
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  results = {}
  for impl in ('reference', 'xla', 'pallas'):
    cfg = config_lib.apply_overrides(tiny_cfg, dict(overrides, **{'moe.kernels': impl}))
    graphdef, params, buffers = model_lib.split(model_lib.build(cfg))
    from flax import nnx  # pylint: disable=import-outside-toplevel
    params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)

    def loss(p):
      logits, aux = nnx.merge(graphdef, p, buffers)(tokens, train=True, rng=jax.random.key(1))
      return jnp.mean(logits ** 2) + aux['aux_loss'], aux['expert_counts']
    (value, counts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    results[impl] = (value, counts, grads)
  ref = results['reference']
  for impl in ('xla', 'pallas'):
    value, counts, grads = results[impl]
    np.testing.assert_allclose(value, ref[0], rtol=1e-5)
    np.testing.assert_array_equal(counts, ref[1])
    for a, b in zip(jax.tree.leaves(ref[2]), jax.tree.leaves(grads)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('T,K,E,D,F,block,skew,budget', [
    (60, 2, 5, 96, 80, 16, True, 232448),    # K chunked 32 (3 steps), N tiles of 16, an empty expert
    (33, 3, 4, 64, 256, 32, False, 232448),  # two N tiles of 128; T*K not a block multiple
    (33, 3, 4, 64, 256, 32, False, 24576),   # a small budget: dw sums its blocks in row chunks of 16
])
def test_triton_gmm_interpreted_matches_reference(dtype, T, K, E, D, F, block, skew, budget):
  """The GPU (Triton) kernels, run by the Pallas interpreter on CPU: y, dx (same kernel on w^T) and dw."""
  _, plan = _plan(T, K, E, block, skew, jax.random.key(T))
  R = plan.row_token_R.shape[0]
  be = plan.block_expert_N
  x = jax.random.normal(jax.random.key(1), (R, D), dtype)
  w = (jax.random.normal(jax.random.key(2), (E, D, F)) / np.sqrt(D)).astype(dtype)
  dy = jax.random.normal(jax.random.key(3), (R, F), dtype)
  y_ref, vjp = jax.vjp(lambda x, w: gmm.block_gmm_reference(x, w, be, block), x, w)
  dx_ref, dw_ref = vjp(dy)
  isz = jnp.dtype(dtype).itemsize
  fwd, back = gmm.triton_tiles(block, D, F, isz, 128, budget), gmm.triton_tiles(block, F, D, isz, 128, budget)
  grad = gmm.triton_tiles(block, D, F, isz, 128, budget, grad=True)
  if budget < 232448:
    assert grad[0] < block  # the row-chunk loop is exercised
  y = gmm._gmm_triton(x, w, be, block, *fwd[1:], interpret=True)
  dx = gmm._gmm_triton(dy, jnp.swapaxes(w, 1, 2), be, block, *back[1:], interpret=True)
  dw = gmm._tgmm_triton(x, dy, be, E, block, *grad, interpret=True)
  for got, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
    scale = float(np.abs(np.asarray(ref, np.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               rtol=TOL[dtype]['rtol'], atol=TOL[dtype]['atol'] * scale)
  if skew:
    assert not (be == E - 2).any() and not np.asarray(dw[E - 2]).any()


def _lowered_layer(tiny_cfg, platform, export_platform, **overrides):
  """StableHLO of the MoE model's loss and gradient lowered (not run) for another platform."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax import kernels  # pylint: disable=import-outside-toplevel
  cfg = config_lib.apply_overrides(tiny_cfg, {'moe.kernels': 'pallas', 'model.model_dim': 64, 'moe.expert_hidden': 64,
                                             'moe.num_experts': 8, 'moe.experts_per_token': 2,
                                             'moe.block_size': 16,
                                             **overrides})
  graphdef, params, buffers = model_lib.split(model_lib.build(cfg))
  params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
  tokens = jnp.zeros((2, 32), jnp.int32)

  def loss(p):
    logits, aux = nnx.merge(graphdef, p, buffers)(tokens, train=True, rng=jax.random.key(1))
    return jnp.mean(logits.astype(jnp.float32) ** 2) + aux['aux_loss']
  targets = {'cuda': '__gpu$xla.gpu.triton', 'tpu': 'tpu_custom_call'}
  with kernels.target(platform):
    exported = jax.export.export(
        jax.jit(jax.value_and_grad(loss)), platforms=[export_platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(targets[export_platform])])(params)
  return exported.mlir_module(), targets[export_platform]


@pytest.mark.parametrize('platform,export_platform', [('gpu', 'cuda'), ('tpu', 'tpu')])
def test_kernels_lower_for_gpu_and_tpu(tiny_cfg, platform, export_platform):
  """Lowering (Triton IR / Mosaic) runs on CPU: catches ops a backend's Pallas lowering lacks.

  Per MoE layer (2 layers): router 1 + counting sort 1 + grouped matmuls 3 forward + 6 backward
  (dx, dw), and on TPU the row-gather kernels too. Compiling and running them needs the hardware.
  """
  text, target = _lowered_layer(tiny_cfg, platform, export_platform)
  calls = text.count(f'custom_call @{target}')
  assert calls >= 2 * (1 + 1 + 3 + 6), calls
  for name in ('moejax_block_gmm', 'moejax_block_tgmm', 'moejax_router', 'moejax_expert_ranks'):
    assert name in text, name


def test_gpu_shapes_the_kernels_cannot_take_fall_back_to_xla(tiny_cfg, caplog):
  """Hidden 24 has no power-of-two tile >= 16; 6 experts are not a power of two: XLA path, warned once."""
  text, _ = _lowered_layer(tiny_cfg, 'gpu', 'cuda', **{'moe.expert_hidden': 24, 'moe.num_experts': 6})
  assert 'moejax_block_gmm' not in text and 'moejax_router' not in text
  assert 'moejax_expert_ranks' in text  # the counting sort pads its one-hot width: any E
  assert 'XLA path' in caplog.text


@pytest.mark.parametrize('A,E,skew', [(1000, 5, True), (300, 64, False), (128, 1, False), (37, 9, True)])
def test_counting_sort_ranks_match_the_stable_sort(A, E, skew):
  """Ranks within expert (the layout's counting sort): kernel == argsort reference, across chunk edges."""
  key = jax.random.key(A)
  flat = (jnp.where(jax.random.uniform(key, (A,)) < 0.7, 0, jax.random.randint(key, (A,), 0, E)) if skew
          else jax.random.randint(key, (A,), 0, E))
  ref = routing.expert_ranks(flat, E)
  np.testing.assert_array_equal(permute.expert_ranks(flat, E, 'pallas'), ref)
  # the definition: rank = number of earlier entries with the same expert
  f = np.asarray(flat)
  np.testing.assert_array_equal(ref, [(f[:i] == f[i]).sum() for i in range(A)])


@pytest.mark.parametrize('budget_blocks', [1, 3, 4])  # 3: the last chunk is padded
def test_chunked_xla_gmm_matches_one_shot(budget_blocks):
  """The xla path's chunked weight gather (remat'd lax.map) == the one-shot reference: outputs and gradients."""
  _, plan = _plan(40, 2, 5, 8, True, jax.random.key(3))
  R = plan.row_token_R.shape[0]
  x = jax.random.normal(jax.random.key(1), (R, 16))
  w = jax.random.normal(jax.random.key(2), (5, 16, 24))
  be = plan.block_expert_N
  assert be.shape[0] > budget_blocks
  budget = budget_blocks * 16 * 24 * 4

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))
  chunked = lambda x, w: gmm.block_gmm_chunked(x, w, be, 8, budget)
  one_shot = lambda x, w: gmm.block_gmm_reference(x, w, be, 8)
  np.testing.assert_allclose(chunked(x, w), one_shot(x, w), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.grad(loss(one_shot), (0, 1))(x, w), jax.grad(loss(chunked), (0, 1))(x, w)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  assert 'while' in jax.jit(chunked).lower(x, w).as_text()  # really chunked

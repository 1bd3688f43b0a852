"""The GPU (Triton) kernels compiled and run on a CUDA GPU, against their references.

Run on a GPU machine with `JAX_PLATFORMS=cuda python -m pytest -m gpu tests/gpu_test.py`
(conftest.py pins CPU otherwise). Skipped without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.kernels import gmm, router

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a CUDA GPU')]


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize('E,D,F,T,K,block', [(8, 256, 512, 2048, 2, 128), (64, 512, 192, 4096, 8, 64)])
def test_gpu_block_gmm_matches_reference(dtype, tol, E, D, F, T, K, block):
  p = np.full(E, 0.5 / (E - 2))
  p[0], p[E - 1] = 0.5, 0.0  # skewed, one empty expert
  experts = jax.random.choice(jax.random.key(0), E, (T, K), p=jnp.asarray(p))
  plan = routing.block_plan(experts, E, block)
  R = plan.row_token_R.shape[0]
  x = jax.random.normal(jax.random.key(1), (R, D), dtype)
  w = (jax.random.normal(jax.random.key(2), (E, D, F)) / np.sqrt(D)).astype(dtype)
  be = plan.block_expert_N

  def loss(impl):
    return lambda x, w: jnp.sum(jnp.sin(gmm.block_gmm(x, w, be, block, impl).astype(jnp.float32)))
  ref, got = gmm.block_gmm(x, w, be, block, 'reference'), gmm.block_gmm(x, w, be, block, 'pallas')
  scale = float(jnp.abs(ref.astype(jnp.float32)).max())
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol * scale)
  for a, b in zip(jax.grad(loss('reference'), (0, 1))(x, w), jax.grad(loss('pallas'), (0, 1))(x, w)):
    s = float(jnp.abs(a.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=tol, atol=tol * s)
  assert 'moejax_block_gmm_gpu' in jax.jit(gmm.block_gmm, static_argnums=(3, 4)).lower(
      x, w, be, block, 'pallas').as_text()


def test_gpu_router_matches_reference():
  z = jax.random.normal(jax.random.key(3), (3000, 64))
  ref = router.route(z, 8, renormalize=True, impl='reference')
  got = router.route(z, 8, renormalize=True, impl='pallas')
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[1], ref[1])
  np.testing.assert_allclose(got[2], ref[2], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[3], ref[3])


def _attention_loss(impl, q, k, v, seg):
  from moejax.model import attention  # pylint: disable=import-outside-toplevel

  def loss(q, k, v):
    o = attention.attend(q, k, v, impl, seg, 64, 64)
    return jnp.sum(jnp.sin(o.astype(jnp.float32))), o
  (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return o, grads


@pytest.mark.parametrize('segmented', [False, True])
def test_gpu_cudnn_and_blockwise_attention_match_xla(segmented):
  """'auto' on a GPU in bfloat16 is cuDNN's fused attention: its outputs and gradients (GQA, with and without the
  document mask) against XLA's attention and the blockwise core, in bfloat16."""
  B, L, H, G, K = 2, 256, 8, 2, 64
  q, k, v = (jax.random.normal(jax.random.key(i), (B, L, n, K), jnp.bfloat16) for i, n in enumerate((H, G, G)))
  seg = jnp.cumsum(jax.random.bernoulli(jax.random.key(9), 0.02, (B, L)), axis=1).astype(jnp.int32) + 1 \
      if segmented else None
  ref_o, ref_g = _attention_loss('xla', q, k, v, seg)
  for impl in ('cudnn', 'blockwise'):
    o, g = _attention_loss(impl, q, k, v, seg)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(ref_o, np.float32), atol=3e-2, rtol=3e-2)
    for a, b in zip(g, ref_g):
      s = float(jnp.abs(b.astype(jnp.float32)).max())
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=3e-2 * s, rtol=3e-2)

"""The transformer: causality, dropless dispatch vs the all-experts reference, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.model import transformer as model_lib
from moejax.model import dispatch as dispatch_lib


def _forward(cfg, params, graphdef, tokens):
  return nnx.merge(graphdef, params)(tokens)


@pytest.mark.parametrize('num_experts', [0, 4])
def test_model_is_causal(tiny_cfg, num_experts):
  cfg = config_lib.apply_overrides(tiny_cfg, {'moe.num_experts': num_experts})
  graphdef, state = nnx.split(model_lib.build(cfg))
  params = nnx.to_pure_dict(state)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 256)
  fwd = jax.jit(lambda p, t: _forward(cfg, p, graphdef, t)[0])
  a, b = fwd(params, tokens), fwd(params, changed)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert not np.allclose(a[:, 7:], b[:, 7:])


def _expert_weights(T, D, F, E, seed):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (T, D))
  logits = jax.random.normal(ks[1], (T, E)) * 3.0  # peaked router: skewed loads
  w = [jax.random.normal(k, s) / np.sqrt(s[1]) for k, s in zip(ks[2:], [(E, D, F), (E, D, F), (E, F, D)])]
  return x, logits, w


@pytest.mark.parametrize('T,D,F,E,k,bs', [(37, 16, 24, 5, 2, 8), pytest.param(64, 8, 16, 8, 1, 16, marks=pytest.mark.slow),
                                          pytest.param(20, 8, 8, 3, 3, 8, marks=pytest.mark.slow)])
def test_block_dispatch_matches_dense_reference(T, D, F, E, k, bs):
  x, logits, w = _expert_weights(T, D, F, E, T + E)

  def out(fn, x, w):
    gates, experts = jax.lax.top_k(jax.nn.softmax(logits), k)
    return fn(x, gates, experts, *w)

  dense = lambda x, w: out(dispatch_lib.dense_dispatch, x, w)
  block = lambda x, w: out(lambda *a: dispatch_lib.block_dispatch(*a, block_size=bs), x, w)
  np.testing.assert_allclose(block(x, w), dense(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  g_block = jax.grad(loss(block), argnums=(0, 1))(x, w)
  g_dense = jax.grad(loss(dense), argnums=(0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(g_block), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_model_dispatches_agree_on_loss_and_grads(tiny_cfg):
  def loss_and_grads(dispatch):
    cfg = config_lib.apply_overrides(tiny_cfg, {'moe.dispatch': dispatch})
    graphdef, state = nnx.split(model_lib.build(cfg))
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 257)

    def loss(p):
      logits, aux = _forward(cfg, p, graphdef, tokens)
      return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux['aux_loss'] + aux['z_loss']
    return jax.jit(jax.value_and_grad(loss))(nnx.to_pure_dict(state))

  (l_block, g_block), (l_dense, g_dense) = loss_and_grads('block'), loss_and_grads('dense')
  np.testing.assert_allclose(l_block, l_dense, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_block), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_close_to_float32(tiny_cfg):
  outs = []
  for dtype in ('float32', 'bfloat16'):
    cfg = config_lib.apply_overrides(tiny_cfg, {'model.compute_dtype': dtype})
    graphdef, state = nnx.split(model_lib.build(cfg))
    logits, _ = _forward(cfg, nnx.to_pure_dict(state), graphdef, jnp.arange(32).reshape(2, 16))
    assert logits.dtype == jnp.float32
    outs.append(logits)
  np.testing.assert_allclose(outs[0], outs[1], atol=0.05)


def test_layer_pattern_places_moe_layers(tiny_cfg):
  cfg = config_lib.apply_overrides(tiny_cfg, {'model.num_layers': 5, 'moe.first_dense_layers': 1,
                                              'moe.every_n_layers': 2})
  m = model_lib.build(cfg)
  assert [b.use_moe for b in m.blocks] == [False, True, False, True, False]
  assert config_lib.moe_layers(cfg.model, cfg.moe) == [1, 3]

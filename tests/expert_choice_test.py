"""Expert-choice routing: selection, the dispatch against a dense reference, causality, accounting, refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib, routing
from moejax.errors import ConfigError
from moejax.inference import decode
from moejax.interop import layouts
from moejax.model import accounting, dispatch as dispatch_lib
from moejax.model import transformer as model_lib
from moejax.model.layers import swiglu

EXPERT_CHOICE = {'moe.routing': 'expert_choice', 'moe.load_balancing': 'none'}


def _cfg(tiny_cfg, **overrides):
  return config_lib.validate(config_lib.apply_overrides(tiny_cfg, dict(EXPERT_CHOICE, **overrides)))


def test_expert_choice_takes_each_experts_top_tokens():
  scores_GNE = jnp.array([[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.5, 0.7]]])  # one group of 4 tokens, 2 experts
  tokens_GEC, gates_GEC = routing.expert_choice(scores_GNE, 2)
  np.testing.assert_array_equal(tokens_GEC[0], [[0, 2], [1, 3]])  # expert 0: 0.9, 0.5 (tie 0.5/0.5 -> token 2)
  np.testing.assert_allclose(gates_GEC[0], [[0.9, 0.5], [0.8, 0.7]])
  stats = routing.expert_choice_stats(scores_GNE, tokens_GEC)
  assert float(stats['drop_fraction']) == 0.0 and float(stats['load_max_over_mean']) == 1.0
  assert routing.expert_choice_capacity(8, 2, 4) == 4 and routing.expert_choice_capacity(3, 2, 4) == 2
  assert routing.expert_choice_capacity(2, 4, 4) == 2  # at most the group


def test_padding_goes_last_and_never_counts(tiny_cfg):
  """Document masking's padding (segment 0): an expert takes a padded token only when its position has fewer valid
  tokens than the capacity, with gate 0, and the statistics count valid tokens only (padding used to compete for
  the slots and count as dropped)."""
  scores_GNE = jnp.array([[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.5, 0.7]]])
  valid_GN = jnp.array([[True, False, True, True]])
  tokens_GEC, _ = routing.expert_choice(jnp.where(valid_GN[..., None], scores_GNE, -1.0), 2)
  assert 1 not in np.asarray(tokens_GEC)  # the padded token (expert 1's favourite) is not taken
  stats = routing.expert_choice_stats(scores_GNE, tokens_GEC, valid_GN)
  assert float(stats['drop_fraction']) == 0.0 and float(jnp.sum(stats['expert_counts'])) == 4
  model = model_lib.build(_cfg(tiny_cfg))
  moe = model.blocks[0].ffn
  x_BLD = jax.random.normal(jax.random.key(1), (4, 3, tiny_cfg.model.model_dim))
  valid_BL = jnp.array([[True] * 3, [True] * 3, [True, True, False], [True, False, False]])
  y, aux = moe(x_BLD, valid_BL=valid_BL)
  x_pad = x_BLD.at[~valid_BL].set(100.0)  # whatever the padding holds, the valid tokens' outputs are the same
  y2, aux2 = moe(x_pad, valid_BL=valid_BL)
  np.testing.assert_allclose(y2[valid_BL], y[valid_BL], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux2['router_entropy'], aux['router_entropy'], rtol=1e-5)


def test_expert_choice_dispatch_matches_a_dense_reference():
  G, N, D, E, F, C = 3, 5, 4, 4, 6, 2
  keys = jax.random.split(jax.random.key(0), 5)
  x_GND = jax.random.normal(keys[0], (G, N, D))
  w = [jax.random.normal(k, s) for k, s in zip(keys[1:4], [(E, D, F), (E, D, F), (E, F, D)])]
  tokens_GEC, gates_GEC = routing.expert_choice(jax.nn.softmax(jax.random.normal(keys[4], (G, N, E))), C)
  y = dispatch_lib.expert_choice_dispatch(x_GND, tokens_GEC, gates_GEC, *w)
  every_GNED = swiglu(x_GND, *w, 'gnd,edf->gnef;gnef,efd->gned')
  combine_GNE = np.zeros((G, N, E))
  for g in range(G):
    for e in range(E):
      for c in range(C):
        combine_GNE[g, tokens_GEC[g, e, c], e] += gates_GEC[g, e, c]
  np.testing.assert_allclose(y, np.einsum('gne,gned->gnd', combine_GNE, every_GNED), rtol=1e-5, atol=1e-6)


def test_expert_choice_scoring_cannot_see_future_tokens(tiny_cfg):
  """Changing a later token of one sequence changes no earlier position's logits, in any sequence of the batch."""
  cfg = _cfg(tiny_cfg, **{'moe.experts_per_token': 1})  # C = 1 of 4 tokens: selection is tight
  graphdef, state = nnx.split(model_lib.build(cfg))
  forward = jax.jit(lambda s, tokens: nnx.merge(graphdef, s)(tokens)[0])
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 257)
  base = forward(state, tokens)
  for j in (3, 9, 15):
    changed = tokens.at[0, j:].set((tokens[0, j:] + 101) % 257)
    out = forward(state, changed)
    np.testing.assert_array_equal(out[:, :j], base[:, :j])
    assert not np.allclose(out[0, j], base[0, j])  # (the change does reach its own position)


def test_grouping_a_whole_sequence_would_leak_the_future():
  """The leak the position groups avoid: with one sequence as the group, a later token's score decides
  whether an earlier token is taken (this is what the causality test above would catch)."""
  scores = jnp.array([[[0.5], [0.2], [0.1]]])  # one sequence of 3 tokens, 1 expert, C = 1
  taken_before = routing.expert_choice(scores, 1)[0]
  taken_after = routing.expert_choice(scores.at[0, 2, 0].set(0.9), 1)[0]  # only the last token changed
  assert int(taken_before[0, 0, 0]) == 0 and int(taken_after[0, 0, 0]) == 2  # token 0 lost its expert


@pytest.mark.slow
def test_expert_choice_trains_and_reports_statistics(tiny_cfg):
  cfg = _cfg(tiny_cfg)
  graphdef, params, buffers = model_lib.split(model_lib.build(cfg))
  tokens = jax.random.randint(jax.random.key(2), (4, 16), 0, 257)

  def loss(p):
    logits, aux = nnx.merge(graphdef, p, buffers)(tokens, train=True)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]) + aux['z_loss'], aux
  (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(nnx.to_pure_dict(params))
  assert np.isfinite(value) and float(aux['aux_loss']) == 0.0
  np.testing.assert_array_equal(aux['expert_counts'], np.full((2, 4), 16 * 2))  # L * C, C = ceil(2*4/4)
  assert np.all(aux['load_max_over_mean'] == 1.0) and np.all(aux['dead_experts'] == 0)
  router_grad = grads['blocks'][0]['ffn']['w_router']
  assert float(jnp.abs(router_grad).max()) > 0  # the router learns through the gates


def test_expert_choice_accounting_counts_the_mean_experts_per_token(tiny_cfg):
  acc = accounting.count(_cfg(tiny_cfg, **{'moe.experts_per_token': 1, 'train.batch_size': 6}))
  assert acc['routing'] == 'expert_choice'
  assert acc['experts_per_token'] == pytest.approx(4 * 2 / 6)  # C = ceil(6/4) = 2 per expert of 6 tokens
  same = accounting.count(_cfg(tiny_cfg))  # k*B/E whole: exactly k
  assert same['experts_per_token'] == 2
  assert same['n_active'] == accounting.count(tiny_cfg)['n_active']


def test_expert_choice_refusals(tiny_cfg):
  with pytest.raises(ConfigError, match="load_balancing='none'"):
    config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'moe.routing': 'expert_choice'}))
  with pytest.raises(ConfigError, match='capacity'):
    _cfg(tiny_cfg, **{'moe.train_capacity_factor': 1.0})
  with pytest.raises(ConfigError, match="'token_choice' or"):
    config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'moe.routing': 'choice'}))
  cfg = _cfg(tiny_cfg)
  with pytest.raises(ConfigError, match='cannot decode') as e:
    decode.check_decodable(cfg)
  assert '\n' not in str(e.value)
  with pytest.raises(ConfigError, match='expert-choice routing'):
    layouts.choose(cfg)

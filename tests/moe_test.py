"""The MoE design space: dispatch equivalence, load-balancing formulas, dropping, aux-free bias."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib, routing
from moejax.model import transformer as model_lib
from moejax.model import dispatch as dispatch_lib, moe
from moejax.train import loop as loop_lib
from moejax.train import state as state_lib


def _loss_and_grads(cfg, tokens, train_mode=False):
  graphdef, params, buffers = model_lib.split(model_lib.build(cfg))
  buffers = nnx.to_pure_dict(buffers)

  def loss(p):
    logits, aux = nnx.merge(graphdef, p, buffers)(tokens, train=train_mode)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]) + aux['aux_loss'] + aux['z_loss']
  # Jitted: one compilation is far cheaper on CPU than dispatching every op of the backward pass eagerly.
  return jax.jit(jax.value_and_grad(loss))(nnx.to_pure_dict(params))


DESIGNS = {
    'uniform': {},
    'heterogeneous+shared': {'moe.num_experts': 6, 'moe.expert_size_classes': '2x16,4x48',
                             'moe.num_shared_experts': 1, 'moe.shared_expert_hidden': 24,
                             'moe.use_shared_expert_gate': True},
    'sigmoid+groups': {'moe.num_experts': 8, 'moe.experts_per_token': 3, 'moe.router_score': 'sigmoid',
                       'moe.num_expert_groups': 4, 'moe.topk_expert_groups': 2, 'moe.routed_scaling_factor': 2.5},
}


@pytest.mark.parametrize('design', [  # heterogeneous+shared runs every code path of uniform; both are 20-35 s
    'heterogeneous+shared', pytest.param('sigmoid+groups', marks=pytest.mark.slow),
    pytest.param('uniform', marks=pytest.mark.slow)])
def test_dispatches_agree_on_outputs_and_gradients(tiny_cfg, design):
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 257)
  results = {}
  for dispatch in ('dense', 'block', 'ragged', 'capacity'):
    cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg, dict(DESIGNS[design], **{'moe.dispatch': dispatch})))
    results[dispatch] = _loss_and_grads(cfg, tokens)
  ref_loss, ref_grads = results.pop('dense')
  for dispatch, (loss, grads) in results.items():
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=dispatch)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=dispatch)


def test_capacity_dispatch_with_large_factor_equals_dropless(tiny_cfg):
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 257)
  drop = {'moe.train_capacity_factor': 4.0, 'moe.capacity_group_tokens': 16}  # C = 4*2*16/4 = 32 >= any load
  loss_cap, _ = _loss_and_grads(config_lib.apply_overrides(tiny_cfg, dict(drop, **{'moe.dispatch': 'capacity'})),
                                tokens, train_mode=True)
  loss_ref, _ = _loss_and_grads(config_lib.apply_overrides(tiny_cfg, {'moe.dispatch': 'dense'}), tokens)
  np.testing.assert_allclose(loss_cap, loss_ref, rtol=1e-6)


@pytest.mark.parametrize('dispatch', ['block', 'capacity', 'dense', 'ragged'])
def test_dropped_assignments_contribute_zero(tiny_cfg, dispatch):
  cfg = config_lib.apply_overrides(tiny_cfg, {'moe.train_capacity_factor': 0.25, 'moe.dispatch': dispatch})
  layer = moe.MoE(cfg.model, cfg.moe, 0.02, 0.02, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(5), (2, 8, cfg.model.model_dim))
  y, aux = layer(x, train=True)
  # Recompute with the kept assignments only, through the reference dispatch.
  _, scores, experts, gates = layer._route(x.reshape(16, -1), True, None)  # pylint: disable=protected-access
  keep, _ = routing.capacity_keep(experts, gates, 4, 0.25, 'position', 16)
  e = layer.experts[0]
  want = dispatch_lib.dense_dispatch(x.reshape(16, -1), jnp.where(keep, gates, 0), experts, e.w_gate[...], e.w_up[...],
                            e.w_down[...])
  np.testing.assert_allclose(y.reshape(16, -1), want, rtol=1e-5, atol=1e-6)
  assert float(aux['drop_fraction']) == pytest.approx(1 - float(keep.mean()))
  assert float(aux['drop_fraction']) > 0.5  # C = ceil(0.25*2*16/4) = 2 of 32 assignments per expert...
  fully_dropped = ~keep.any(axis=1)
  assert fully_dropped.any() and np.allclose(y.reshape(16, -1)[fully_dropped], 0)  # residual only
  del scores


def test_eval_is_dropless_by_default(tiny_cfg):
  cfg = config_lib.apply_overrides(tiny_cfg, {'moe.train_capacity_factor': 0.25})
  layer = moe.MoE(cfg.model, cfg.moe, 0.02, 0.02, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(6), (2, 8, cfg.model.model_dim))
  assert float(layer(x, train=False)[1]['drop_fraction']) == 0.0
  assert float(layer(x, train=True)[1]['drop_fraction']) > 0.0


def test_drop_policies_on_hand_made_routing():
  experts = jnp.array([[0, 1], [0, 2], [0, 1], [1, 0]])
  gates = jnp.array([[.5, .3], [.6, .2], [.9, .1], [.7, .3]])
  # C = ceil(0.75 * 2 * 4 / 3) = 2 per expert.
  assert routing.capacity(4, 2, 3, 0.75) == 2
  keep_pos, rank_pos = routing.capacity_keep(experts, gates, 3, 0.75, 'position')
  # expert 0 queue by position: first choices t0, t1, t2, then t3's second choice.
  np.testing.assert_array_equal(rank_pos, [[0, 1], [1, 0], [2, 2], [0, 3]])
  np.testing.assert_array_equal(keep_pos, [[True, True], [True, True], [False, False], [True, False]])
  keep_probs, rank_probs = routing.capacity_keep(experts, gates, 3, 0.75, 'probs')
  # expert 0 queue by gate: t2 (.9), t1 (.6), t0 (.5), t3 (.3); expert 1: t3 (.7), t0 (.3), t2 (.1).
  np.testing.assert_array_equal(rank_probs, [[2, 1], [1, 0], [0, 2], [0, 3]])
  np.testing.assert_array_equal(keep_probs, [[False, True], [True, True], [True, False], [True, False]])


def test_capacity_groups_are_independent():
  experts = jnp.array([[0], [0], [0], [0]])
  keep, rank = routing.capacity_keep(experts, jnp.ones((4, 1)), 2, 1.0, 'position', group_tokens=2)
  np.testing.assert_array_equal(rank[:, 0], [0, 1, 0, 1])  # C = ceil(1*1*2/2) = 1 per group
  np.testing.assert_array_equal(keep[:, 0], [True, False, True, False])


def test_sequence_and_micro_batch_losses_by_hand():
  # Two sequences of 2 tokens, E=2, k=1. Sequence 1 routes both tokens to expert 0, sequence 2 splits.
  scores = jnp.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
  experts = jnp.array([[0], [0], [1], [0]])
  # seq 1: f = (1, 0), P = (0.7, 0.3): 2 * 0.7 = 1.4; seq 2: f = (.5, .5), P = (.4, .6): 2 * .5 = 1.0.
  assert float(routing.load_balancing_loss(scores, experts, group_tokens=2)) == pytest.approx(1.2)
  # global batch: f = (.75, .25), P = (.55, .45): 2 * (.4125 + .1125) = 1.05.
  assert float(routing.load_balancing_loss(scores, experts)) == pytest.approx(1.05)


def test_sigmoid_scores_are_normalized_for_balance_loss():
  scores = jax.nn.sigmoid(jnp.array([[0.0, 0.0]]))  # 0.5 each -> s' = (0.5, 0.5)
  assert float(routing.load_balancing_loss(scores, jnp.array([[0]]))) == pytest.approx(1.0)


def test_sigmoid_gates_renormalized_and_scaled_bias_selects_only():
  scores = jnp.array([[0.9, 0.5, 0.1, 0.3]])
  bias = jnp.array([0.0, 0.0, 1.0, 0.0])
  experts = routing.select_experts(scores, 2, bias)
  np.testing.assert_array_equal(experts, [[2, 0]])  # expert 2 chosen only thanks to the bias
  gates = routing.gate_weights(scores, experts, renormalize=True, scale=2.5)
  np.testing.assert_allclose(gates, [[2.5 * 0.1, 2.5 * 0.9]], rtol=1e-6)  # the bias never enters the gate


def test_balance_coefficient_per_mode(tiny_cfg):
  coef = lambda mode, **kw: moe.balance_coefficient(config_lib.apply_overrides(
      tiny_cfg, dict({'moe.load_balancing': mode}, **kw)).moe)
  assert coef('none') == 0.0
  assert coef('global_batch') == coef('sequence') == coef('micro_batch') == 0.01
  assert coef('aux_free', **{'moe.aux_free_sequence_coef': 1e-4}) == 1e-4


def test_aux_free_bias_moves_load_toward_uniform():
  rng = np.random.default_rng(0)
  scores = jax.nn.softmax(jnp.asarray(rng.normal(size=(512, 8)) + np.linspace(0, 2, 8)))  # skewed to expert 7
  buffers = {'blocks': {0: {'ffn': {'expert_bias': jnp.zeros(8)}}}}
  loads = []
  for _ in range(300):
    experts = routing.select_experts(scores, 2, buffers['blocks'][0]['ffn']['expert_bias'])
    counts = routing.expert_counts(experts, 8)
    loads.append(float(counts.max() / counts.mean()))
    buffers = moe.update_expert_biases(buffers, counts[None], rate=1e-3)
  assert loads[0] > 2.0 and max(loads[-20:]) < 1.3
  bias = buffers['blocks'][0]['ffn']['expert_bias']
  assert float(bias[7]) < 0 < float(bias[0])  # overloaded experts pushed down, starved ones up


def test_aux_free_bias_trains_saves_and_gets_no_gradient(tiny_cfg, tmp_path):
  cfg = config_lib.apply_overrides(tiny_cfg, {'moe.load_balancing': 'aux_free', 'moe.bias_update_rate': 0.01,
                                              'train.steps': 3})
  out = loop_lib.run(cfg, str(tmp_path))
  state = out['setup'].state
  bias = state['buffers']['blocks'][0]['ffn']['expert_bias']
  assert float(jnp.abs(bias).sum()) > 0 and 'expert_bias' not in str(jax.tree.structure(state['params']))
  # |b| grows by exactly rate per step where the load is not at its mean.
  assert float(jnp.max(jnp.abs(bias))) <= 3 * 0.01 + 1e-7
  s = state_lib.setup(cfg)
  from moejax.train import checkpoint  # pylint: disable=import-outside-toplevel
  ck = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  _, restored, _ = ck.restore_latest(checkpoint.abstract(s.state))
  ck.close()
  np.testing.assert_array_equal(restored['buffers']['blocks'][0]['ffn']['expert_bias'], bias)


OPTION_RUNS = {
    'sigmoid-groups-auxfree-sharedgate': {'moe.router_score': 'sigmoid', 'moe.num_experts': 8,
                                          'moe.num_expert_groups': 2, 'moe.load_balancing': 'aux_free',
                                          'moe.aux_free_sequence_coef': 1e-4, 'moe.num_shared_experts': 1,
                                          'moe.use_shared_expert_gate': True},
    'capacity-probs-microbatch-jitter': {'moe.dispatch': 'capacity', 'moe.train_capacity_factor': 1.0,
                                         'moe.drop_policy': 'probs', 'moe.load_balancing': 'micro_batch',
                                         'moe.balance_group_sequences': 2, 'moe.router_jitter': 0.01,
                                         'moe.capacity_group_tokens': 32},
    'ragged-heterogeneous-sequence-bf16': {'moe.dispatch': 'ragged', 'moe.expert_size_classes': '2x16,2x48',
                                           'moe.load_balancing': 'sequence', 'model.compute_dtype': 'bfloat16',
                                           'moe.first_dense_layers': 1},
}


@pytest.mark.parametrize('name', sorted(OPTION_RUNS))
def test_major_options_train_without_nan(tiny_cfg, tmp_path, name):
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg, dict(OPTION_RUNS[name], **{'train.steps': 3})))
  out = loop_lib.run(cfg, str(tmp_path))
  import json  # pylint: disable=import-outside-toplevel
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert len(rows) == 3 and all(math.isfinite(r['loss']) for r in rows)
  n_moe = len(config_lib.moe_layers(cfg.model, cfg.moe))
  for key in ('load_max_over_mean', 'load_cv', 'dead_experts', 'drop_fraction', 'router_entropy', 'bias_abs_mean',
              'aux_loss_per_layer', 'z_loss_per_layer'):
    assert len(rows[-1][key]) == n_moe
  counts = np.asarray(rows[-1]['expert_counts'])
  assert counts.shape == (n_moe, cfg.moe.num_experts)
  assert (counts.sum(axis=1) == cfg.train.batch_size * cfg.data.seq_len * cfg.moe.experts_per_token).all()
  del out

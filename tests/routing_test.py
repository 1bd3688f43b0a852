"""Routing math against cases computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing


def test_top_k_selection_ties_pick_lower_expert():
  probs = jnp.array([[0.3, 0.3, 0.3, 0.1], [0.1, 0.2, 0.3, 0.4]])
  experts = routing.select_experts(probs, 2)
  gates = routing.gate_weights(probs, experts, renormalize=False)
  np.testing.assert_array_equal(experts, [[0, 1], [3, 2]])
  np.testing.assert_allclose(gates, [[0.3, 0.3], [0.4, 0.3]])


def test_renormalized_gates_sum_to_one():
  probs = jnp.array([[0.5, 0.3, 0.2]])
  gates = routing.gate_weights(probs, routing.select_experts(probs, 2), renormalize=True)
  np.testing.assert_allclose(gates, [[0.625, 0.375]], rtol=1e-6)


def test_switch_aux_loss_uniform_is_one():
  T, E, k = 8, 4, 2
  probs = jnp.full((T, E), 1.0 / E)
  experts = jnp.array([[t % E, (t + 1) % E] for t in range(T)])  # every expert gets 4 of 16
  assert float(routing.switch_aux_loss(probs, experts)) == pytest.approx(1.0)
  del k


def test_switch_aux_loss_hand_case():
  # T=2, E=2, k=1: both tokens pick expert 0, so f = (1, 0); P = mean probs = (0.7, 0.3).
  probs = jnp.array([[0.9, 0.1], [0.5, 0.5]])
  experts = jnp.array([[0], [0]])
  # E * sum f_i P_i = 2 * (1 * 0.7 + 0 * 0.3) = 1.4
  assert float(routing.switch_aux_loss(probs, experts)) == pytest.approx(1.4)


def test_switch_aux_loss_gradient_flows_through_probs_only():
  logits = jnp.array([[2.0, 0.0], [1.0, 0.0]])
  experts = jnp.array([[0], [0]])
  g = jax.grad(lambda z: routing.switch_aux_loss(jax.nn.softmax(z), experts))(logits)
  # d/dz of 2 * mean_t p_0(t): p0(1-p0) per token, times 2/2.
  p0 = jax.nn.softmax(logits)[:, 0]
  np.testing.assert_allclose(g[:, 0], p0 * (1 - p0), rtol=1e-5)


def test_router_z_loss_hand_case():
  logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
  # logsumexp = log 2 and log 4.
  expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
  assert float(routing.router_z_loss(logits)) == pytest.approx(expected, rel=1e-6)


def test_block_plan_layout_hand_case():
  # T=3, k=2, E=3, bs=2. Assignments (token, expert): (0,1) (0,0) (1,1) (2,1) (1,2) (2,0)
  experts = jnp.array([[1, 0], [1, 2], [1, 0]])
  plan = routing.block_plan(experts, 3, 2)
  # expert 0 gets tokens 0,2 -> rows 0,1; expert 1 gets tokens 0,1,2 -> rows 2,3,4 (+ pad row 5);
  # expert 2 gets token 1 -> row 6 (+ pad row 7). Blocks: (0), (1), (1), (2), then spare.
  assert routing.num_blocks(6, 3, 2) == 4
  np.testing.assert_array_equal(plan.row_token_R, [0, 2, 0, 1, 2, 3, 1, 3])
  np.testing.assert_array_equal(plan.assign_row_TK, [[2, 0], [3, 6], [4, 1]])
  np.testing.assert_array_equal(plan.block_expert_N, [0, 1, 1, 2])


@pytest.mark.parametrize('seed,T,k,E,bs', [(0, 37, 2, 5, 8), (1, 64, 1, 16, 8), (2, 50, 4, 4, 16)])
def test_block_plan_random_invariants(seed, T, k, E, bs):
  rng = np.random.default_rng(seed)
  skew = rng.dirichlet(np.full(E, 0.3))  # skewed loads, some experts empty
  experts = np.stack([rng.choice(E, size=k, replace=False, p=skew) for _ in range(T)])
  plan = routing.block_plan(jnp.asarray(experts, jnp.int32), E, bs)
  rows = np.asarray(plan.assign_row_TK)
  assert len(np.unique(rows)) == T * k  # every assignment gets its own row
  row_token = np.asarray(plan.row_token_R)
  np.testing.assert_array_equal(row_token[rows], np.repeat(np.arange(T)[:, None], k, axis=1))
  block_expert = np.asarray(plan.block_expert_N)
  np.testing.assert_array_equal(block_expert[rows // bs], experts)  # the row's block runs the right expert
  assert (row_token == T).sum() == row_token.size - T * k  # all other rows are padding


def test_auto_block_size_bounds_padding():
  assert routing.auto_block_size(8192, 64) == 32
  assert routing.auto_block_size(16, 64) == 8
  assert routing.auto_block_size(1 << 20, 8) == 256


def test_routing_stats_load_and_entropy():
  probs = jnp.full((4, 2), 0.5)
  stats = routing.routing_stats(probs, jnp.array([[0], [0], [0], [1]]))
  np.testing.assert_array_equal(stats['expert_counts'], [3, 1])
  assert float(stats['load_max_over_mean']) == pytest.approx(1.5)
  assert float(stats['router_entropy']) == pytest.approx(math.log(2))

"""Routing math as pure functions (docs/moe.md, "Load balancing"). All of it runs in float32.

Steps of one MoE layer, as `moejax.model.moe.MoE` calls them:
  1. `router_scores`: softmax over all E experts (Switch/OLMoE/Mixtral) or an independent
     sigmoid per expert (DeepSeek-V3).
  2. `select_experts`: top-k of score + bias (the aux-free bias steers selection only),
     optionally group-limited (keep the best `topk_groups` of `num_groups` expert groups,
     a group scored by the sum of its top-2 scores). Ties go to the lower expert id.
  3. `gate_weights`: the selected scores; renormalized over the k for sigmoid scoring
     (always) or softmax (optional); times the routed scaling factor.
  4. `capacity_keep`: with a capacity factor, keep at most C = ceil(CF*k*T_g/E) assignments
     per expert per group of T_g tokens, by the `position` or `probs` policy.
  5. Losses: `load_balancing_loss` (Switch form E*sum_i f_i*P_i over token groups: the
     global batch, micro-batches or single sequences) and `router_z_loss`.
  6. `block_plan` (dropless block-padded layout) and `routing_stats` (diagnostics).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np



def router_probs(logits_TE: jax.Array) -> jax.Array:
  """Softmax router probabilities in float32."""
  return jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)


def router_scores(logits_TE: jax.Array, score_function: str = 'softmax') -> jax.Array:
  """Per-expert scores in float32: softmax over experts, or sigmoid per expert."""
  if score_function == 'sigmoid':
    return jax.nn.sigmoid(logits_TE.astype(jnp.float32))
  return router_probs(logits_TE)


def normalized_scores(scores_TE: jax.Array) -> jax.Array:
  """s' = s / sum_j s_j (identity for softmax); the P_i of the load-balancing losses."""
  return scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)


def select_experts(scores_TE: jax.Array, k: int, bias_E: jax.Array | None = None, num_groups: int = 1,
                   topk_groups: int = 1) -> jax.Array:
  """experts_TK: top-k of scores (+ bias, selection only), optionally limited to the best expert groups."""
  T, E = scores_TE.shape
  select_TE = scores_TE if bias_E is None else scores_TE + bias_E.astype(jnp.float32)
  if num_groups > 1:
    grouped_TGE = select_TE.reshape(T, num_groups, E // num_groups)
    top2 = jax.lax.top_k(grouped_TGE, min(2, E // num_groups))[0]
    _, best_groups = jax.lax.top_k(jnp.sum(top2, axis=-1), topk_groups)
    keep_TG = jnp.sum(jax.nn.one_hot(best_groups, num_groups, dtype=jnp.bool_), axis=1) > 0
    select_TE = jnp.where(jnp.repeat(keep_TG, E // num_groups, axis=1), select_TE, -jnp.inf)
  return jax.lax.top_k(select_TE, k)[1].astype(jnp.int32)


def gate_weights(scores_TE: jax.Array, experts_TK: jax.Array, renormalize: bool, scale: float = 1.0) -> jax.Array:
  """gates_TK: the selected scores, optionally divided by their sum, times `scale`."""
  gates_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
  if renormalize:
    gates_TK = gates_TK / jnp.sum(gates_TK, axis=-1, keepdims=True)
  return gates_TK * scale


def expert_counts(experts_TK: jax.Array, num_experts: int, valid_T: jax.Array | None = None) -> jax.Array:
  """Assignments per expert [E] (pre-drop), as int32; with `valid_T`, of the valid tokens only."""
  if valid_T is None:
    return jnp.bincount(experts_TK.reshape(-1), length=num_experts).astype(jnp.int32)
  valid_A = jnp.broadcast_to(valid_T[:, None], experts_TK.shape).reshape(-1)
  return jnp.bincount(experts_TK.reshape(-1), valid_A.astype(jnp.int32), length=num_experts).astype(jnp.int32)


def masked_mean(x_T: jax.Array, valid_T: jax.Array | None, axis=0) -> jax.Array:
  """mean over axis 0 (the tokens), over the valid ones only when `valid_T` is given (0 when none is)."""
  if valid_T is None:
    return jnp.mean(x_T, axis=axis)
  w_T = valid_T.astype(jnp.float32).reshape(valid_T.shape + (1,) * (x_T.ndim - 1))
  return jnp.sum(x_T * w_T, axis=axis) / jnp.maximum(jnp.sum(w_T), 1.0)


def switch_aux_loss(probs_TE: jax.Array, experts_TK: jax.Array, valid_T: jax.Array | None = None) -> jax.Array:
  """Switch/GShard load-balancing loss E * sum_i f_i * P_i (docs/moe.md, "Load balancing").

  f_i = (1/(kT)) * #{tokens routed to i} (no gradient), P_i = mean_t p_i(t).
  Equals 1 under perfectly uniform routing.
  """
  T, E = probs_TE.shape
  k = experts_TK.shape[-1]
  if valid_T is not None:  # f and P over the valid tokens only (document masking's padding left out)
    n = jnp.maximum(jnp.sum(valid_T.astype(jnp.float32)), 1.0)
    f_E = jax.lax.stop_gradient(expert_counts(experts_TK, E, valid_T).astype(jnp.float32) / (k * n))
    return E * jnp.sum(f_E * masked_mean(probs_TE.astype(jnp.float32), valid_T))
  f_E = jax.lax.stop_gradient(expert_counts(experts_TK, E).astype(jnp.float32) / (k * T))
  P_E = jnp.mean(probs_TE.astype(jnp.float32), axis=0)
  return E * jnp.sum(f_E * P_E)


def load_balancing_loss(scores_TE: jax.Array, experts_TK: jax.Array, group_tokens: int | None = None,
                        valid_T: jax.Array | None = None) -> jax.Array:
  """Mean over token groups of E * sum_i f_i * P_i (docs/moe.md, "Load balancing"), f from pre-drop counts (no gradient).

  group_tokens=None: one group, the whole (global) batch: under jit with a data-sharded batch the
  counts are summed across data-parallel shards automatically. group_tokens=L: DeepSeek-V3's
  sequence-wise loss (with P from normalized scores). group_tokens=m*L: micro-batches of m sequences.
  valid_T: only those tokens count, and the mean is over groups holding one or more.
  """
  T, E = scores_TE.shape
  g = T if group_tokens is None else group_tokens
  P_GTE = normalized_scores(scores_TE).reshape(T // g, g, E)
  e_GTK = experts_TK.reshape(T // g, g, -1)
  if valid_T is None:
    return jnp.mean(jax.vmap(switch_aux_loss)(P_GTE, e_GTK))
  v_GT = valid_T.reshape(T // g, g)
  return masked_mean(jax.vmap(switch_aux_loss)(P_GTE, e_GTK, v_GT), jnp.any(v_GT, axis=1))


def capacity(group_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """C = ceil(CF * k * T_g / E) assignments per expert per group (Megatron get_capacity)."""
  return int(math.ceil(capacity_factor * k * group_tokens / num_experts))


def capacity_rank(experts_TK: jax.Array, gates_TK: jax.Array, num_experts: int, policy: str,
                  valid_T: jax.Array | None = None) -> jax.Array:
  """rank_TK: the position of each assignment in its expert's queue (0 = served first).

  position: all first choices in token order, then all second choices, ... (GShard/Switch).
  probs: highest gate first, ties by that same position order (Megatron's default).
  valid_T: invalid tokens (padding) queue after every valid one, so they never take a valid token's slot.
  """
  T, K = experts_TK.shape
  position_TK = (jnp.arange(K)[None, :] * T + jnp.arange(T)[:, None]).reshape(-1)
  expert_A = experts_TK.reshape(-1)
  keys = (position_TK, expert_A) if policy == 'position' else (position_TK, -gates_TK.reshape(-1), expert_A)
  if valid_T is not None:
    keys = keys[:-1] + (~jnp.broadcast_to(valid_T[:, None], (T, K)).reshape(-1), expert_A)
  order_A = jnp.lexsort(keys)
  counts_E = jnp.bincount(expert_A, length=num_experts)
  start_E = jnp.cumsum(counts_E) - counts_E
  rank_sorted_A = jnp.arange(T * K) - start_E[expert_A[order_A]]
  return jnp.zeros((T * K,), jnp.int32).at[order_A].set(rank_sorted_A.astype(jnp.int32)).reshape(T, K)


def capacity_keep(experts_TK: jax.Array, gates_TK: jax.Array, num_experts: int, capacity_factor: float | None,
                  policy: str, group_tokens: int | None = None,
                  valid_T: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(keep_TK, rank_TK): which assignments survive capacity, and their slot within their expert per group.

  capacity_factor=None is dropless: everything is kept (rank is still computed, for capacity dispatch).
  """
  T, K = experts_TK.shape
  g = T if group_tokens is None else group_tokens
  if valid_T is None:
    rank_TK = jax.vmap(lambda e, w: capacity_rank(e, w, num_experts, policy))(
        experts_TK.reshape(T // g, g, K), gates_TK.reshape(T // g, g, K)).reshape(T, K)
  else:
    rank_TK = jax.vmap(lambda e, w, v: capacity_rank(e, w, num_experts, policy, v))(
        experts_TK.reshape(T // g, g, K), gates_TK.reshape(T // g, g, K), valid_T.reshape(T // g, g)).reshape(T, K)
  if capacity_factor is None:
    return jnp.ones((T, K), jnp.bool_), rank_TK
  return rank_TK < capacity(g, K, num_experts, capacity_factor), rank_TK


def router_z_loss(logits_TE: jax.Array, valid_T: jax.Array | None = None) -> jax.Array:
  """ST-MoE router z-loss: mean_t logsumexp(z_t)^2 (over the `valid_T` tokens when given)."""
  lse_T = jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)
  return masked_mean(lse_T * lse_T, valid_T)


class BlockPlan(NamedTuple):
  """Dropless dispatch plan: assignments sorted by expert, each group padded to `block_size` rows.

  row_token_R:   token feeding each padded row (T marks a padding row -> a zero input)
  assign_row_TK: the padded row that computes assignment (t, j)
  block_expert_N: the expert whose weights block n uses
  row_assign_R:  the assignment t*k + j each padded row computes (T*k on padding rows)
  """
  row_token_R: jax.Array
  assign_row_TK: jax.Array
  block_expert_N: jax.Array
  row_assign_R: jax.Array


def num_blocks(num_assignments: int, num_experts: int, block_size: int) -> int:
  """Static bound on blocks: sum_e ceil(n_e / bs) <= (A + E*(bs-1)) / bs."""
  return (num_assignments + num_experts * (block_size - 1)) // block_size


def auto_block_size(num_assignments: int, num_experts: int) -> int:
  """Largest power of two <= A/(4E), clamped to [8, 256]: padding then adds at most ~25% rows.

  Measured on a 2-core CPU (quickstart, A=8192, E=64): bs 16/32/64/128 -> 1.63/1.31/1.38/1.44x the
  dense step; smaller blocks pad less but run more, smaller matmuls.
  """
  target = max(num_assignments // (4 * num_experts), 8)
  return int(min(256, 1 << (target.bit_length() - 1)))


def expert_ranks(flat_A: jax.Array, num_experts: int) -> jax.Array:
  """rank_A: how many earlier assignments chose the same expert (a stable counting sort's
  position within the expert's group). Reference twin of `kernels.permute.expert_ranks`."""
  A = flat_A.shape[0]
  order_A = jnp.argsort(flat_A, stable=True)
  sizes_E = jnp.bincount(flat_A, length=num_experts)
  start_E = jnp.cumsum(sizes_E) - sizes_E
  rank_sorted_A = jnp.arange(A) - start_E[flat_A[order_A]]
  return jnp.zeros((A,), jnp.int32).at[order_A].set(rank_sorted_A.astype(jnp.int32))


def block_plan(experts_TK: jax.Array, num_experts: int, block_size: int, ranks=expert_ranks) -> BlockPlan:
  """Builds the sorted, block-padded layout of T*k assignments (integer math, no gradient).

  Assignment a goes to row pad_start[e(a)] + rank(a): groups in expert order, token order
  within a group. `ranks` computes rank_A (`expert_ranks`, or the counting-sort kernel).
  """
  T, K = experts_TK.shape
  A = T * K
  flat_A = experts_TK.reshape(-1)
  sizes_E = jnp.bincount(flat_A, length=num_experts)
  padded_E = (sizes_E + block_size - 1) // block_size * block_size
  pad_end_E = jnp.cumsum(padded_E)
  assign_row_A = ((pad_end_E - padded_E)[flat_A] + ranks(flat_A, num_experts)).astype(jnp.int32)
  n_blocks = num_blocks(A, num_experts, block_size)
  row_assign_R = jnp.full((n_blocks * block_size,), A, jnp.int32).at[assign_row_A].set(jnp.arange(A, dtype=jnp.int32))
  block_start_N = jnp.arange(n_blocks) * block_size
  block_expert_N = jnp.searchsorted(pad_end_E, block_start_N, side='right')
  return BlockPlan(row_assign_R // K, assign_row_A.reshape(T, K),
                   jnp.minimum(block_expert_N, num_experts - 1).astype(jnp.int32), row_assign_R)


def routing_stats(probs_TE: jax.Array, experts_TK: jax.Array, valid_T: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-layer diagnostics from pre-drop routing: assignments per expert, max/mean load, coefficient of
  variation of the load, experts that got no token, and the mean router entropy (nats, of normalized scores);
  of the `valid_T` tokens only when given."""
  counts_E = expert_counts(experts_TK, probs_TE.shape[-1], valid_T).astype(jnp.float32)
  entropy_T = -jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-30)), axis=-1)
  return {'expert_counts': counts_E, **load_stats(counts_E), 'router_entropy': masked_mean(entropy_T, valid_T)}


def load_stats(counts_E):
  """max/mean load, coefficient of variation and dead experts of a load vector (jax or numpy array)."""
  mean = max(counts_E.mean(), 1e-9) if isinstance(counts_E, np.ndarray) else jnp.maximum(counts_E.mean(), 1e-9)
  return {'load_max_over_mean': counts_E.max() / mean, 'load_cv': counts_E.std() / mean,
          'dead_experts': (counts_E == 0).sum().astype(counts_E.dtype)}


def expert_choice_capacity(group_tokens: int, k: int, num_experts: int) -> int:
  """C = ceil(k * N / E) tokens per expert per group of N tokens (at most N): k experts per token on average."""
  return min(group_tokens, int(math.ceil(k * group_tokens / num_experts)))


def expert_choice(scores_GNE: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """(tokens_GEC, gates_GEC): in each group of N tokens, expert e takes the C tokens with its highest scores.

  Expert-choice routing (Zhou et al. 2022): every expert serves exactly C tokens per group; a
  token may be taken by several experts or by none. Ties go to the lower token index.
  Which tokens form a group decides what a token's routing can see (`moejax.model.moe`
  groups the batch's tokens at one position, so no token's routing depends on a later one).
  """
  gates_GEC, tokens_GEC = jax.lax.top_k(jnp.swapaxes(scores_GNE.astype(jnp.float32), 1, 2), capacity)
  return tokens_GEC.astype(jnp.int32), gates_GEC


def expert_choice_stats(scores_GNE: jax.Array, tokens_GEC: jax.Array,
                        valid_GN: jax.Array | None = None) -> dict[str, jax.Array]:
  """Expert-choice diagnostics in `routing_stats`' keys: loads (the valid tokens each expert took; C per group
  without padding), the share of valid tokens no expert took ('drop_fraction') and the mean router entropy of the
  normalized scores over valid tokens."""
  G, N, E = scores_GNE.shape
  if valid_GN is None:
    counts_E = jnp.full((E,), G * tokens_GEC.shape[-1], jnp.float32)
  else:
    counts_E = jnp.sum(valid_GN[jnp.arange(G)[:, None, None], tokens_GEC].astype(jnp.float32), axis=(0, 2))
  taken_GN = jnp.zeros((G, N), jnp.int32).at[jnp.arange(G)[:, None, None], tokens_GEC].add(1)
  probs = normalized_scores(scores_GNE.reshape(G * N, E).astype(jnp.float32))
  entropy_T = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  valid_T = None if valid_GN is None else valid_GN.reshape(G * N)
  return {'expert_counts': counts_E, **load_stats(counts_E), 'router_entropy': masked_mean(entropy_T, valid_T),
          'drop_fraction': masked_mean((taken_GN == 0).astype(jnp.float32).reshape(G * N), valid_T)}

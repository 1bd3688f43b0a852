"""Expert dispatches: how the routed tokens meet their experts' weights.

Many-token dispatches (`moe.dispatch`; training, scoring, prefill), each
f(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, **options) -> y_TD, agreeing on
outputs and gradients whenever nothing is dropped:
  'dense'    reference: every expert on every token, masked by the gates (E/k times the work);
  'block'    dropless: assignments sorted by expert, each group padded to a block multiple,
             experts run as block matmuls (`routing.block_plan`);
  'ragged'   assignments sorted by expert, three `jax.lax.ragged_dot` calls;
  'capacity' each expert gets a fixed [slots, D] buffer (C per capacity group; T when dropless).

Few-token dispatches (decode steps; `MoE.__call__(..., dispatch=...)`), each
f(x_TD, experts, local_TK, g_TK, count) -> float32 y_TD for one size class:
  'gather'   gathers the T*k selected experts' weights;
  'distinct' reads each distinct selected expert once, in place.
`pick_dispatch` chooses between them and the many-token one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax import routing
from moejax.errors import ConfigError
from moejax.kernels import gmm, permute
from moejax.model.layers import swiglu


def dense_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, **_):
  """Reference: all E experts on all T tokens; an out-of-range expert id contributes nothing."""
  y_TED = swiglu(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, 'td,edf->tef;tef,efd->ted')
  combine_TE = jnp.einsum('tk,tke->te', gates_TK, jax.nn.one_hot(experts_TK, w_gate_EDF.shape[0], dtype=gates_TK.dtype))
  return jnp.einsum('te,ted->td', combine_TE.astype(y_TED.dtype), y_TED)


def block_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, block_size: int,
                   kernels: str = 'reference', **_):
  """Dropless block-padded dispatch; expert id E (invalid) rows run on the last block's weights and get gate 0.

  `kernels` picks the row permutation and grouped-matmul implementation (moejax.kernels).
  """
  E = w_gate_EDF.shape[0]
  plan = routing.block_plan(experts_TK, E + 1, block_size,
                            ranks=functools.partial(permute.expert_ranks, impl=kernels))
  be = jnp.minimum(plan.block_expert_N, E - 1)
  x_RD = permute.dispatch_rows(x_TD, plan, kernels)
  h_RF = (jax.nn.silu(gmm.block_gmm(x_RD, w_gate_EDF, be, block_size, kernels))
          * gmm.block_gmm(x_RD, w_up_EDF, be, block_size, kernels))
  y_RD = gmm.block_gmm(h_RF, w_down_EFD, be, block_size, kernels)
  return permute.combine_rows(y_RD, gates_TK, plan, kernels)


def ragged_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, **_):
  """Sort assignments by expert and run `jax.lax.ragged_dot` (invalid id E sorts last, outside every group)."""
  T, K = experts_TK.shape
  E = w_gate_EDF.shape[0]
  flat_A = experts_TK.reshape(-1)
  order_A = jnp.argsort(flat_A, stable=True)
  sizes_E = jnp.bincount(flat_A, length=E + 1)[:E].astype(jnp.int32)
  x_AD = x_TD[order_A // K]
  h = jax.nn.silu(jax.lax.ragged_dot(x_AD, w_gate_EDF, sizes_E)) * jax.lax.ragged_dot(x_AD, w_up_EDF, sizes_E)
  y_AD = jax.lax.ragged_dot(h, w_down_EFD, sizes_E)
  y_AD = jnp.where((flat_A[order_A] < E)[:, None], y_AD, 0)  # rows outside every group: defined as zero
  y_TKD = y_AD[jnp.argsort(order_A)].reshape(T, K, -1)
  return jnp.einsum('tk,tkd->td', gates_TK.astype(y_TKD.dtype), y_TKD)


def capacity_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, rank_TK, group_tokens: int,
                      capacity: int, **_):
  """Each expert owns (T/T_g)*C slots; assignment (t, j) of group g = t // T_g goes to slot g*C + rank."""
  T, K = experts_TK.shape
  D = x_TD.shape[1]
  E = w_gate_EDF.shape[0]
  slots = (T // group_tokens) * capacity
  valid_TK = (experts_TK < E) & (rank_TK < capacity)
  slot_TK = experts_TK * slots + (jnp.arange(T) // group_tokens)[:, None] * capacity + rank_TK
  slot_TK = jnp.where(valid_TK, slot_TK, E * slots)  # invalid -> a spare row past the end
  row_token = jnp.full((E * slots + 1,), T, jnp.int32).at[slot_TK.reshape(-1)].set(
      jnp.repeat(jnp.arange(T, dtype=jnp.int32), K))
  x_pad = jnp.concatenate([x_TD, jnp.zeros((1, D), x_TD.dtype)], axis=0)
  x_ESD = x_pad[row_token[:-1]].reshape(E, slots, D)
  y_ESD = swiglu(x_ESD, w_gate_EDF, w_up_EDF, w_down_EFD, 'esd,edf->esf;esf,efd->esd')
  y_rows = jnp.concatenate([y_ESD.reshape(E * slots, D), jnp.zeros((1, D), y_ESD.dtype)], axis=0)
  return jnp.einsum('tk,tkd->td', gates_TK.astype(y_rows.dtype), y_rows[slot_TK])


def expert_choice_dispatch(x_GND, tokens_GEC, gates_GEC, w_gate_EDF, w_up_EDF, w_down_EFD) -> jax.Array:
  """Expert choice (`routing.expert_choice`): expert e runs on its C chosen tokens of each group; y_GND float32.

  Every expert computes exactly G*C rows (no padding, no drops); a token taken by several
  experts sums their gated outputs, a token taken by none gets zero (the residual carries it).
  """
  G, N, D = x_GND.shape
  g_GEC = jnp.arange(G)[:, None, None]
  x_GECD = x_GND[g_GEC, tokens_GEC]
  y_GECD = swiglu(x_GECD, w_gate_EDF, w_up_EDF, w_down_EFD, 'gecd,edf->gecf;gecf,efd->gecd').astype(jnp.float32)
  return jnp.zeros((G, N, D), jnp.float32).at[g_GEC, tokens_GEC].add(gates_GEC[..., None] * y_GECD)


MANY_TOKEN = {'dense': dense_dispatch, 'block': block_dispatch, 'ragged': ragged_dispatch, 'capacity': capacity_dispatch}


def gather_dispatch(x_TD, experts, local_TK, g_TK, count):
  """Few tokens, one size class: gathers the selected experts' weights ([T, k, D, F]).

  Reads the T*k selected experts (with repeats) and nothing else: the weights are gathered in
  their stored dtype and cast afterwards. The gather materializes a copy (a read and a write of
  T*k experts) before the matmuls read it again, which on a CPU costs several times the read
  alone (docs/inference.md); `distinct_dispatch` avoids it. local_TK holds the class's local
  expert ids (`count` for slots routed elsewhere) and g_TK their gates (zero there).
  """
  dt = x_TD.dtype
  idx_TK = jnp.minimum(local_TK, count - 1)
  w_gate, w_up, w_down = (w[...][idx_TK].astype(dt) for w in (experts.w_gate, experts.w_up, experts.w_down))
  out_TKD = swiglu(x_TD, w_gate, w_up, w_down, 'td,tkdf->tkf;tkf,tkfd->tkd').astype(jnp.float32)
  return jnp.sum(g_TK[..., None] * out_TKD, axis=1)


def distinct_dispatch(x_TD, experts, local_TK, g_TK, count):
  """Few tokens, one size class: reads each distinct selected expert once and copies nothing.

  A loop over the step's distinct experts (`jnp.unique` with a static bound of min(E, T*k)
  slots; the trip count is the number actually touched): each iteration indexes one expert's
  weights in place (a dynamic index on the leading axis, no gather copy), applies them to all
  T tokens and adds the result weighted by each token's gate for that expert (zero for tokens
  that did not pick it). Weight traffic is exactly the bandwidth model's
  (`moejax.inference.cost`: distinct experts x expert bytes); compute is T x distinct experts,
  so it suits T*k <= E.
  """
  dt = x_TD.dtype
  distinct = jnp.unique(local_TK.reshape(-1), size=min(count + 1, local_TK.size), fill_value=count)  # sorted
  weights = (experts.w_gate[...], experts.w_up[...], experts.w_down[...])

  def body(i, y_TD):
    e = distinct[i]
    g_T = jnp.sum(jnp.where(local_TK == e, g_TK, 0.0), axis=1)
    w_gate, w_up, w_down = (jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False).astype(dt) for w in weights)
    out_TD = swiglu(x_TD, w_gate, w_up, w_down, 'td,df->tf;tf,fd->td').astype(jnp.float32)
    return y_TD + g_T[:, None] * out_TD

  zeros = jnp.zeros((x_TD.shape[0], x_TD.shape[1]), jnp.float32)
  return jax.lax.fori_loop(0, jnp.sum(distinct < count), body, zeros)  # (`count` fills the unused slots)


FEW_TOKEN = {'distinct': distinct_dispatch, 'gather': gather_dispatch}
CHOICES = ('auto', 'distinct', 'gather', 'model')


def pick_dispatch(choice: str, tokens: int, topk: int, num_experts: int, backend: str | None = None) -> str:
  """'model' (the configured `moe.dispatch`), 'distinct' or 'gather' for a call on `tokens` tokens.

  'auto': a few-token dispatch while tokens * k <= E (it then reads no more expert weights than
  the model's dispatch, which reads every expert once), else 'model'. The few-token one is
  'distinct' on CPU (measured: docs/inference.md) and 'gather' on accelerators, where a loop of
  small matmuls pays a launch per expert (not yet measured there).
  """
  if choice not in CHOICES:
    raise ConfigError(f'moe_dispatch={choice!r} must be one of {CHOICES}')
  if choice != 'auto':
    return choice
  if tokens * topk > num_experts:
    return 'model'
  return 'distinct' if (backend or jax.default_backend()) == 'cpu' else 'gather'

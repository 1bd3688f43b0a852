"""Moving token rows into the expert-sorted, block-padded layout and back (`routing.BlockPlan`).

dispatch_rows(x_TD, plan) -> x_RD           row r holds token row_token_R[r] (padding rows: zeros)
combine_rows(y_RD, gates_TK, plan) -> y_TD  y[t] = sum_k gates[t, k] * y_RD[assign_row_TK[t, k]]

The 'reference' versions are plain indexing: their autodiff transposes are scatter-adds
(slow on GPU, PERF.md). The 'xla' versions have custom VJPs built from gathers only, using
that every real row belongs to exactly one assignment:
  d x[t]        = sum_k d x_RD[assign_row[t, k]]
  d y_RD[r]     = gates[a(r)] * d y[t(r)]          (0 on padding rows)
  d gates[t, k] = <d y[t], y_RD[assign_row[t, k]]>
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import BlockPlan


def _pad_row(x):
  return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)


def dispatch_rows_reference(x_TD, plan: BlockPlan):
  return _pad_row(x_TD)[plan.row_token_R]


def combine_rows_reference(y_RD, gates_TK, plan: BlockPlan):
  y_TKD = y_RD[plan.assign_row_TK]
  return jnp.einsum('tk,tkd->td', gates_TK.astype(y_TKD.dtype), y_TKD)


@jax.custom_vjp
def _dispatch(x_TD, row_token_R, assign_row_TK):
  return _pad_row(x_TD)[row_token_R]


def _dispatch_fwd(x_TD, row_token_R, assign_row_TK):
  return _dispatch(x_TD, row_token_R, assign_row_TK), assign_row_TK


def _dispatch_bwd(assign_row_TK, dx_RD):
  dx_TD = jnp.sum(dx_RD[assign_row_TK], axis=1)  # gather, then sum over the k copies
  return dx_TD, None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _combine(y_RD, gates_TK, assign_row_TK, row_assign_R):
  y_TKD = y_RD[assign_row_TK]
  return jnp.einsum('tk,tkd->td', gates_TK.astype(y_TKD.dtype), y_TKD)


def _combine_fwd(y_RD, gates_TK, assign_row_TK, row_assign_R):
  return _combine(y_RD, gates_TK, assign_row_TK, row_assign_R), (y_RD, gates_TK, assign_row_TK, row_assign_R)


def _combine_bwd(res, dy_TD):
  y_RD, gates_TK, assign_row_TK, row_assign_R = res
  T, K = gates_TK.shape
  gates_A = _pad_row(gates_TK.reshape(-1))  # index T*K = padding row -> gate 0
  dy_pad = _pad_row(dy_TD)
  dy_RD = (gates_A[row_assign_R][:, None] * dy_pad[jnp.minimum(row_assign_R // K, T)]).astype(y_RD.dtype)
  dgates_TK = jnp.einsum('td,tkd->tk', dy_TD.astype(jnp.float32), y_RD[assign_row_TK].astype(jnp.float32))
  return dy_RD, dgates_TK.astype(gates_TK.dtype), None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def dispatch_rows(x_TD, plan: BlockPlan, impl: str = 'xla'):
  """x_RD: token rows in the plan's padded, expert-sorted layout."""
  if impl == 'reference':
    return dispatch_rows_reference(x_TD, plan)
  return _dispatch(x_TD, plan.row_token_R, plan.assign_row_TK)


def combine_rows(y_RD, gates_TK, plan: BlockPlan, impl: str = 'xla'):
  """y_TD: the gate-weighted sum of each token's k expert rows."""
  if impl == 'reference':
    return combine_rows_reference(y_RD, gates_TK, plan)
  return _combine(y_RD, gates_TK, plan.assign_row_TK, plan.row_assign_R)

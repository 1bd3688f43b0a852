"""Expert parallelism: the routed experts of a MoE layer inside a `jax.shard_map` region.

The mesh's `expert` axis holds E/P experts per device (P = its size); tokens are split
over the 'batch' rule's axes (data, fsdp, expert), so every device routes its own tokens.
Per device, with A = T_local * k assignments:

  1. dest(a) = expert(a) // (E/P); rank(a) = earlier assignments to the same dest (the
     counting sort of `kernels.permute.expert_ranks`); assignment a takes row
     dest * C + rank of a send buffer of P*C rows (C: rows per destination), or is dropped
     when rank >= C;
  2. `all_to_all` over 'expert' (send chunk p to device p, receive one chunk per source);
  3. the received rows run through the local experts with the dropless block dispatch
     (`moe.block_dispatch`, which uses the `moe.kernels` implementation);
  4. `all_to_all` back, and the gate-weighted combine of each token's k rows.

Row moves use `kernels.permute` (gather-only custom VJPs); all_to_all is linear, so autodiff
sends cotangents back the same way. C = A (`moe.expert_parallel_capacity_factor = None`)
can hold every assignment of a device even if all go to one destination: nothing is ever
dropped and the layer equals the single-device one. A factor f gives C = ceil(f*A/P) rows
(less memory and padding compute), and assignments past it are dropped (counted in
`ep_drop_fraction`).

Router, capacity policy and load-balancing losses stay outside the region in the global
(GSPMD) view: their counts span the global batch, so XLA inserts the all-reduce over the
data shards that a global-batch balance loss needs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from moejax import kernels as kernels_lib, mesh as mesh_lib
from moejax.kernels import permute
from moejax.routing import BlockPlan

AXIS = 'expert'


def active_mesh():
  """The mesh set by `jax.set_mesh` if it splits the tokens (any batch axis > 1), else None.

  With an expert axis of 1 the region still pays off: each device sorts and dispatches its
  own tokens (the all-to-all is then a no-op), where the global-view dispatch would make
  XLA partition a sort over the whole batch.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.axis_names:
    return None
  ways = math.prod(mesh.shape[a] for a in mesh_lib.LOGICAL_AXIS_RULES['batch'])
  return mesh if ways > 1 else None


def capacity_rows(assignments: int, ways: int, factor: float | None) -> int:
  """Send-buffer rows per destination: every assignment (None) or ceil(factor * A / P), a multiple of 8."""
  if factor is None:
    return assignments
  return min(assignments, max(8, -(-math.ceil(factor * assignments / ways) // 8) * 8))


def send_plan(experts_TK: jax.Array, local_experts: int, ways: int, capacity: int, impl: str):
  """(BlockPlan over the P*C+1 send rows (the last one a trash row), local id per row, kept mask).

  experts_TK holds global ids of this class; ids >= local_experts * ways mean 'not sent'.
  """
  T, K = experts_TK.shape
  A = T * K
  flat_A = experts_TK.reshape(-1)
  valid_A = flat_A < local_experts * ways
  dest_A = jnp.where(valid_A, flat_A // local_experts, ways)
  rank_A = permute.expert_ranks(dest_A, ways + 1, impl)
  keep_A = valid_A & (rank_A < capacity)
  trash = ways * capacity
  row_A = jnp.where(keep_A, dest_A * capacity + rank_A, trash).astype(jnp.int32)
  row_assign_R = jnp.full((trash + 1,), A, jnp.int32).at[row_A].set(jnp.arange(A, dtype=jnp.int32))
  row_assign_R = row_assign_R.at[trash].set(A)  # dropped assignments all hit the trash row
  real_R = row_assign_R < A
  expert_R = jnp.concatenate([flat_A, jnp.zeros((1,), flat_A.dtype)])[row_assign_R]
  local_R = jnp.where(real_R, expert_R - (jnp.arange(trash + 1) // capacity) * local_experts, local_experts)
  plan = BlockPlan(row_assign_R // K, row_A.reshape(T, K), jnp.zeros((1,), jnp.int32), row_assign_R)
  return plan, local_R[:trash].astype(jnp.int32), keep_A.reshape(T, K)


def _local(x_TD, gates_TK, experts_TK, w_gate, w_up, w_down, *, capacity_factor, block_size, kernels, dispatch):
  """The per-device body of the region (see the module docstring)."""
  ways = jax.lax.axis_size(AXIS)
  T, K = experts_TK.shape
  E_loc = w_gate.shape[0]
  C = capacity_rows(T * K, ways, capacity_factor)
  plan, local_R, keep_TK = send_plan(experts_TK, E_loc, ways, C, kernels)
  x_RD = permute.dispatch_rows(x_TD, plan, kernels)[:-1]
  recv_x = jax.lax.all_to_all(x_RD, AXIS, 0, 0, tiled=True)
  recv_e = jax.lax.all_to_all(local_R, AXIS, 0, 0, tiled=True)
  real = (recv_e < E_loc).astype(recv_x.dtype)[:, None]
  bs = block_size(ways * C, E_loc)
  y_recv = dispatch(recv_x, real, recv_e[:, None], w_gate, w_up, w_down, block_size=bs, kernels=kernels)
  y_RD = jax.lax.all_to_all(y_recv.astype(x_TD.dtype), AXIS, 0, 0, tiled=True)
  y_RD = jnp.concatenate([y_RD, jnp.zeros((1,) + y_RD.shape[1:], y_RD.dtype)])  # the trash row
  y_TD = permute.combine_rows(y_RD, jnp.where(keep_TK, gates_TK, 0.0), plan, kernels)
  sent = jnp.sum((experts_TK < E_loc * ways).astype(jnp.float32))
  dropped = sent - jnp.sum(keep_TK.astype(jnp.float32))
  batch_axes = tuple(mesh_lib.LOGICAL_AXIS_RULES['batch'])
  return y_TD, jax.lax.psum(dropped, batch_axes) / jnp.maximum(jax.lax.psum(sent, batch_axes), 1.0)


def expert_parallel_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, mesh,
                             capacity_factor: float | None, block_size, kernels: str, dispatch):
  """(y_TD, ep_drop_fraction): one size class's routed experts, expert-parallel over `mesh`.

  Same contract as the single-device dispatches in `moe.py` (ids >= E contribute nothing);
  `block_size(rows, experts)` picks the local block size; `dispatch` is the local block dispatch.
  """
  if kernels == 'pallas' and kernels_lib.interpret():
    kernels_lib.warn_once('ep-interpret', 'moe.kernels=pallas: the Pallas CPU interpreter does not run inside '
                          'shard_map regions; the expert-parallel region uses the xla kernels on CPU')
    kernels = 'xla'
  tokens = mesh_lib.logical_to_spec(('batch', None))
  weights = mesh_lib.logical_to_spec(('expert', None, None))
  body = functools.partial(_local, capacity_factor=capacity_factor, block_size=block_size, kernels=kernels,
                           dispatch=dispatch)
  region = jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, weights, weights, weights),
                         out_specs=(tokens, jax.sharding.PartitionSpec()))
  return region(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD)

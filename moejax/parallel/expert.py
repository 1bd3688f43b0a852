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

Which assignments a capped buffer drops: with 'all_to_all', each (source, destination) pair
keeps its first C assignments in token order (t*k + j), so later tokens lose even their
first choice before earlier ones lose any; `moe.drop_policy` applies only to the layer's own
capacity (`moe.*_capacity_factor`), which is decided before the region. With 'ragged', a
full destination takes sources in device order, so the highest-index devices lose rows
first. The two exchanges therefore drop different assignments at the same factor (both
drop nothing without one). The factor applies in training and eval alike; eval reports
`ep_drop_fraction` per layer too.

`moe.dispatch` does not apply inside the region: the local experts always run the block
dispatch. That changes speed, not results: the dispatches agree (tests), and capacity
dropping is decided before the region.

`moe.expert_parallel_exchange` picks how rows travel: 'all_to_all' (above: fixed C rows
per destination, padded) or 'ragged' (`jax.lax.ragged_all_to_all`: each device sends only
its real rows, packed by destination, into a receive buffer of M rows; M = P*A with no
factor (never drops), else ceil(f*A); the per-pair counts are all-gathered first, so every
device agrees which rows fit). 'auto' = 'ragged' on GPU and TPU, 'all_to_all' on CPU, where
XLA has no ragged-all-to-all; there `emulated_ragged_all_to_all` (the same semantics from
all_to_all over padded chunks) stands in, so the ragged logic is tested on CPU.

Router, capacity policy and load-balancing losses stay outside the region in the global
(GSPMD) view: their counts span the global batch, so XLA inserts the all-reduce over the
data shards that a global-batch balance loss needs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from moejax import kernels as kernels_lib
from moejax.parallel import mesh as mesh_lib
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


def _buffer_rows(wanted: float, most: int) -> int:
  """ceil(wanted) rounded up to a multiple of 8 (at least 8), at most `most`."""
  return min(most, max(8, -(-math.ceil(wanted) // 8) * 8))


def capacity_rows(assignments: int, ways: int, factor: float | None) -> int:
  """Send-buffer rows per destination: every assignment (None) or ceil(factor * A / P) rounded up
  to a multiple of 8, at most A."""
  return assignments if factor is None else _buffer_rows(factor * assignments / ways, assignments)


def destinations(experts_TK: jax.Array, local_experts: int, ways: int, impl: str):
  """(dest_A, rank_A): each assignment's device (`ways` = not sent: an id past this class) and its
  rank among the assignments to that device (counting sort; `kernels.permute.expert_ranks`)."""
  flat_A = experts_TK.reshape(-1)
  dest_A = jnp.where(flat_A < local_experts * ways, flat_A // local_experts, ways)
  return dest_A, permute.expert_ranks(dest_A, ways + 1, impl)


def send_plan(experts_TK: jax.Array, dest_A, rank_A, start_P, limit_P, rows: int, local_experts: int):
  """(BlockPlan over `rows` send rows plus a trash row, local expert id per send row, kept mask [T, K]).

  Assignment a goes to row start_P[dest] + rank if rank < limit_P[dest], else it is dropped
  (the trash row). Rows no assignment takes hold expert id `local_experts` (none).
  """
  T, K = experts_TK.shape
  A, ways = T * K, start_P.shape[0]
  d = jnp.minimum(dest_A, ways - 1)
  keep_A = (dest_A < ways) & (rank_A < limit_P[d])
  row_A = jnp.where(keep_A, start_P[d] + rank_A, rows).astype(jnp.int32)
  row_assign_R = jnp.full((rows + 1,), A, jnp.int32).at[row_A].set(jnp.arange(A, dtype=jnp.int32))
  row_assign_R = row_assign_R.at[rows].set(A)  # dropped assignments all hit the trash row
  expert_R = jnp.concatenate([experts_TK.reshape(-1), jnp.zeros((1,), experts_TK.dtype)])[row_assign_R]
  local_R = jnp.where(row_assign_R < A, expert_R % local_experts, local_experts).astype(jnp.int32)
  plan = BlockPlan(row_assign_R // K, row_A.reshape(T, K), jnp.zeros((1,), jnp.int32), row_assign_R)
  return plan, local_R[:rows], keep_A.reshape(T, K)


EXCHANGES = ('auto', 'all_to_all', 'ragged')


def exchange_kind(setting: str) -> str:
  """'all_to_all' or 'ragged' for `moe.expert_parallel_exchange`."""
  if setting not in EXCHANGES:
    raise ValueError(f'moe.expert_parallel_exchange={setting!r} must be one of {EXCHANGES}')
  if setting == 'auto':
    return 'all_to_all' if kernels_lib.platform() == 'cpu' else 'ragged'
  return setting


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
  """`jax.lax.ragged_all_to_all` over AXIS, built from all_to_all of padded chunks (reference twin).

  Chunk q of the sender (operand[input_offsets[q]:][:send_sizes[q]]) is written into
  receiver q's `output` at the sender's output_offsets[q]; recv_sizes[s] rows arrive from s.
  """
  n, ways = operand.shape[0], input_offsets.shape[0]
  i = jnp.arange(n)
  src = jnp.clip(input_offsets[:, None] + i[None, :], 0, n - 1)
  mask = (i[None, :] < send_sizes[:, None]).reshape((ways, n) + (1,) * (operand.ndim - 1))
  chunks = jnp.where(mask, operand[src], jnp.zeros((), operand.dtype)).reshape((ways * n,) + operand.shape[1:])
  got = jax.lax.all_to_all(chunks, AXIS, 0, 0, tiled=True)  # block s: what s sent me
  where_from = jax.lax.all_to_all(output_offsets, AXIS, 0, 0, tiled=True)  # s's offset for its chunk to me
  dst = jnp.where(i[None, :] < recv_sizes[:, None], where_from[:, None] + i[None, :], output.shape[0])
  return output.at[dst.reshape(-1)].set(got, mode='drop')


def _exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
  # ragged_all_to_all types its result like `output`: make that buffer vary like the rows sent into it.
  operand, output = kernels_lib.same_vma(operand, output)
  if kernels_lib.platform() == 'cpu':  # XLA:CPU cannot run ragged-all-to-all
    return emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
  return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                   axis_name=AXIS)


def receive_rows(assignments: int, ways: int, factor: float | None) -> int:
  """Receive-buffer rows of the ragged exchange: P*A (never drops) or ceil(f*A) rounded up to a
  multiple of 8, at most P*A."""
  return ways * assignments if factor is None else _buffer_rows(factor * assignments, ways * assignments)


def _local_ragged(x_TD, gates_TK, experts_TK, w_gate, w_up, w_down, *, capacity_factor, block_size, kernels,
                  dispatch):
  """The per-device body with the ragged exchange (see the module docstring)."""
  ways, me = jax.lax.axis_size(AXIS), jax.lax.axis_index(AXIS)
  T, K = experts_TK.shape
  A, E_loc = T * K, w_gate.shape[0]
  M = receive_rows(A, ways, capacity_factor)
  dest_A, rank_A = destinations(experts_TK, E_loc, ways, kernels)
  sizes = jnp.bincount(dest_A, length=ways + 1)[:ways].astype(jnp.int32)
  offsets = (jnp.cumsum(sizes) - sizes).astype(jnp.int32)
  # Every device sees every (source, destination) count, so all agree which rows fit in M.
  all_sizes = jax.lax.all_gather(sizes, AXIS)  # [source, destination]
  fits = jnp.clip(M - (jnp.cumsum(all_sizes, 0) - all_sizes), 0, all_sizes).astype(jnp.int32)
  placed = (jnp.cumsum(fits, 0) - fits).astype(jnp.int32)  # where each source's rows start at a destination
  send = fits[me]
  plan, local_R, keep_TK = send_plan(experts_TK, dest_A, rank_A, offsets, send, A, E_loc)
  x_send = permute.dispatch_rows(x_TD, plan, kernels)[:A]
  recv_sizes, recv_at = fits[:, me], placed[:, me]
  recv_x = _exchange(x_send, jnp.zeros((M,) + x_send.shape[1:], x_send.dtype), offsets, send, placed[me], recv_sizes)
  recv_e = _exchange(local_R, jnp.full((M,), E_loc, jnp.int32), offsets, send, placed[me], recv_sizes)
  real = (recv_e < E_loc).astype(recv_x.dtype)[:, None]
  y_recv = dispatch(recv_x, real, recv_e[:, None], w_gate, w_up, w_down, block_size=block_size(M, E_loc),
                    kernels=kernels).astype(x_TD.dtype)
  # Back: my rows from source s (at recv_at[s]) return to s's send-buffer offset for me.
  back_to = jax.lax.all_gather(offsets, AXIS)[:, me]
  y_RD = _exchange(y_recv, jnp.zeros((A,) + y_recv.shape[1:], y_recv.dtype), recv_at, recv_sizes, back_to, send)
  y_RD = jnp.concatenate([y_RD, jnp.zeros((1,) + y_RD.shape[1:], y_RD.dtype)])
  y_TD = permute.combine_rows(y_RD, jnp.where(keep_TK, gates_TK, 0.0), plan, kernels)
  return y_TD, _drop_fraction(experts_TK < E_loc * ways, keep_TK)


def _drop_fraction(sent_TK, keep_TK):
  """Global fraction of sent assignments that found no room (psum over the batch axes)."""
  sent = jnp.sum(sent_TK.astype(jnp.float32))
  dropped = sent - jnp.sum(keep_TK.astype(jnp.float32))
  batch_axes = tuple(mesh_lib.LOGICAL_AXIS_RULES['batch'])
  return jax.lax.psum(dropped, batch_axes) / jnp.maximum(jax.lax.psum(sent, batch_axes), 1.0)


def _local(x_TD, gates_TK, experts_TK, w_gate, w_up, w_down, *, capacity_factor, block_size, kernels, dispatch):
  """The per-device body of the region with the all_to_all exchange (see the module docstring)."""
  ways = jax.lax.axis_size(AXIS)
  T, K = experts_TK.shape
  E_loc = w_gate.shape[0]
  C = capacity_rows(T * K, ways, capacity_factor)
  dest_A, rank_A = destinations(experts_TK, E_loc, ways, kernels)
  per_device = jnp.full((ways,), C, jnp.int32)
  plan, local_R, keep_TK = send_plan(experts_TK, dest_A, rank_A, jnp.arange(ways, dtype=jnp.int32) * C, per_device,
                                     ways * C, E_loc)
  x_RD = permute.dispatch_rows(x_TD, plan, kernels)[:-1]
  recv_x = jax.lax.all_to_all(x_RD, AXIS, 0, 0, tiled=True)
  recv_e = jax.lax.all_to_all(local_R, AXIS, 0, 0, tiled=True)
  real = (recv_e < E_loc).astype(recv_x.dtype)[:, None]
  bs = block_size(ways * C, E_loc)
  y_recv = dispatch(recv_x, real, recv_e[:, None], w_gate, w_up, w_down, block_size=bs, kernels=kernels)
  y_RD = jax.lax.all_to_all(y_recv.astype(x_TD.dtype), AXIS, 0, 0, tiled=True)
  y_RD = jnp.concatenate([y_RD, jnp.zeros((1,) + y_RD.shape[1:], y_RD.dtype)])  # the trash row
  y_TD = permute.combine_rows(y_RD, jnp.where(keep_TK, gates_TK, 0.0), plan, kernels)
  return y_TD, _drop_fraction(experts_TK < E_loc * ways, keep_TK)


def expert_parallel_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, mesh,
                             capacity_factor: float | None, block_size, kernels: str, dispatch,
                             exchange: str = 'auto'):
  """(y_TD, ep_drop_fraction): one size class's routed experts, expert-parallel over `mesh`.

  Same contract as the single-device dispatches in `moe.py` (ids >= E contribute nothing);
  `block_size(rows, experts)` picks the local block size; `dispatch` is the local block dispatch.
  """
  ways = mesh.shape[AXIS]
  if ways == 1:  # nothing is exchanged: every assignment stays on its device, whatever the factor
    capacity_factor = None
  elif capacity_factor is None:
    kernels_lib.warn_once('ep-dropless', f'expert parallelism over {ways} devices with the never-dropping buffer: '
                          f'every device runs {ways}x the balanced expert rows (padding included, with any '
                          'kernels); set moe.expert_parallel_capacity_factor (e.g. 2.0) to trade a few drops '
                          '(logged as ep_drop_fraction) for speed')
  if kernels == 'pallas' and kernels_lib.interpret():
    kernels_lib.warn_once('ep-interpret', 'moe.kernels=pallas: the Pallas CPU interpreter does not run inside '
                          'shard_map regions; the expert-parallel region uses the xla kernels on CPU')
    kernels = 'xla'
  tokens = mesh_lib.logical_to_spec(('batch', None))
  weights = mesh_lib.logical_to_spec(('expert', None, None))
  local = _local_ragged if exchange_kind(exchange) == 'ragged' else _local
  body = functools.partial(local, capacity_factor=capacity_factor, block_size=block_size, kernels=kernels,
                           dispatch=dispatch)
  region = jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, weights, weights, weights),
                         out_specs=(tokens, jax.sharding.PartitionSpec()))
  return region(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD)

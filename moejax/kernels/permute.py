"""Moving token rows into the expert-sorted, block-padded layout and back (`routing.BlockPlan`).

expert_ranks(flat_A, E) -> rank_A          the counting sort behind the layout: the number of
                                           earlier assignments to the same expert

dispatch_rows(x_TD, plan) -> x_RD           row r holds token row_token_R[r] (padding rows: zeros)
combine_rows(y_RD, gates_TK, plan) -> y_TD  y[t] = sum_k gates[t, k] * y_RD[assign_row_TK[t, k]]

With 'pallas' on TPU (and CPU, interpreted) every row gather, forward and backward, is
`gather_rows`, a kernel that copies `rows_per_step` rows per grid step from the source in
HBM, each a DMA from the row a scalar-prefetched index names (no VMEM copy of the source,
so any row count fits; the output is padded to whole steps, keeping Mosaic's (8, 128)
block rule). The row indices are prefetched into SMEM (1 MiB on v5p), so more rows than
`kernels.TPU_SMEM_INDEX_BYTES` of indices take several calls. On GPU the gathers stay XLA's (already memory-bound; Triton has no
scalar prefetch), with the same gather-only VJPs.

The 'reference' versions are plain indexing: their autodiff transposes are scatter-adds
(slow on GPU, PERF.md). The 'xla' versions have custom VJPs built from gathers only, using
that every real row belongs to exactly one assignment:
  d x[t]        = sum_k d x_RD[assign_row[t, k]]
  d y_RD[r]     = gates[a(r)] * d y[t(r)]          (0 on padding rows)
  d gates[t, k] = <d y[t], y_RD[assign_row[t, k]]>
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton

from moejax import kernels, routing
from moejax.routing import BlockPlan


def _pad_row(x):
  return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)


def _gather_kernel(idx_ref, x_hbm, o_ref, sems, *, rows_per_step):
  base = pl.program_id(0) * rows_per_step
  copies = [pltpu.make_async_copy(x_hbm.at[pl.ds(idx_ref[base + i], 1)], o_ref.at[pl.ds(i, 1)], sems.at[i])
            for i in range(rows_per_step)]
  for c in copies:
    c.start()
  for c in copies:
    c.wait()


def gather_rows(x_ND, idx_M, impl: str = 'xla', rows_per_step: int = 8):
  """x_ND[idx_M] (indices must be in range); 'pallas': a row-copy kernel, else jnp indexing. No VJP of its own."""
  impl = kernels.fallback_outside_shard_map('row gather', impl)
  if impl != 'pallas' or kernels.platform() == 'gpu':  # GPU: XLA's gather already runs at memory bandwidth
    return x_ND[idx_M]
  N, D = x_ND.shape
  pack = 4 // x_ND.dtype.itemsize
  if pack > 1:  # Mosaic DMAs no single rows of packed (16-bit) tiles: move rows as 32-bit words
    if D % pack:
      return x_ND[idx_M]
    words_NW = jax.lax.bitcast_convert_type(x_ND.reshape(N, D // pack, pack), jnp.uint32)
    rows = gather_rows(words_NW, idx_M, impl, rows_per_step)
    return jax.lax.bitcast_convert_type(rows, x_ND.dtype).reshape(-1, D)
  M, per = idx_M.shape[0], rows_per_step
  chunk = max(per, kernels.TPU_SMEM_INDEX_BYTES // 4 // per * per)
  if M > chunk:  # the prefetched indices live in SMEM (1 MiB on v5p): 64k tokens x k=8 overflowed it
    return jnp.concatenate([gather_rows(x_ND, idx_M[i:i + chunk], impl, per) for i in range(0, M, chunk)])
  steps = -(-M // per)
  idx = jnp.pad(idx_M.astype(jnp.int32), (0, steps * per - M))  # padding rows copy row 0, cut off below
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(steps,),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((per, D), lambda m, idx: (m, 0)),
      scratch_shapes=[pltpu.SemaphoreType.DMA((per,))])
  out = pl.pallas_call(functools.partial(_gather_kernel, rows_per_step=per),
                       out_shape=kernels.out_struct((steps * per, D), x_ND.dtype, x_ND, idx_M), grid_spec=grid_spec,
                       interpret=pltpu.InterpretParams() if kernels.interpret() else False,
                       name='moejax_gather_rows')(idx, x_ND)
  return out[:M]


RANK_CHUNK = 128
# The Triton counting sort holds its whole [n, 128] id and rank blocks in registers. At n = 4,096 rows
# (E256, k8, 64k tokens: 524,288 assignments) ptxas ran for over 16 minutes in 7.4 GB without finishing
# (jax-cuda12-plugin 0.10.2); 256 rows (OLMoE's 4k tokens x k8) compiled. Longer inputs take XLA's sort.
TRITON_RANK_MAX_ROWS = 512


def _ranks_kernel(experts_ref, rank_ref, *, width):
  """One program walks the [n, C] assignment chunks in order, carrying per-expert counts.

  Within a chunk, rank = onehot_EC @ U_CC (U[c', c] = 1 if c' < c: earlier same-expert
  entries) plus the running count; 0/1 operands are exact in bfloat16, sums in float32.
  """
  n, C = experts_ref.shape
  lane = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0) < jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
  earlier_CC = lane.astype(jnp.bfloat16)
  expert_E1 = jax.lax.broadcasted_iota(jnp.int32, (width, C), 0)

  def body(i, running_EC):
    e_1C = experts_ref[pl.ds(i, 1), :]
    hit_EC = expert_E1 == e_1C
    within_EC = jnp.dot(hit_EC.astype(jnp.bfloat16), earlier_CC, preferred_element_type=jnp.float32)
    rank_1C = jnp.sum(jnp.where(hit_EC, within_EC + running_EC, 0.0), axis=0, keepdims=True)
    rank_ref[pl.ds(i, 1), :] = rank_1C.astype(jnp.int32)
    return running_EC + jnp.sum(hit_EC.astype(jnp.float32), axis=1, keepdims=True)

  jax.lax.fori_loop(0, n, body, jnp.zeros((width, C), jnp.float32))


def ranks_onchip_bytes(A: int, num_experts: int) -> int:
  """On-chip bytes of the counting-sort kernel: the whole [n, 128] id and rank arrays (TPU: double-buffered
  in VMEM) and its [width, 128] running counts and within-chunk products."""
  n, width = _rank_rows(A), _rank_width(num_experts)
  return 4 * n * RANK_CHUNK * 4 + 4 * width * RANK_CHUNK * 4 + RANK_CHUNK * RANK_CHUNK * 2


def _rank_width(num_experts: int) -> int:
  return 1 << max(3, num_experts.bit_length())  # a power of two > any expert id (ids >= E are padding)


def _rank_rows(A: int) -> int:
  n = -(-A // RANK_CHUNK)
  return 1 << (n - 1).bit_length()  # Triton blocks are powers of two; padding ids sort last


def expert_ranks(flat_A, num_experts: int, impl: str = 'xla'):
  """rank_A of `routing.expert_ranks`; 'pallas': a counting-sort kernel (no sort, no scatter)."""
  A, C = flat_A.shape[0], RANK_CHUNK
  impl = kernels.fallback_outside_shard_map('counting sort', impl)
  if impl == 'pallas' and kernels.platform() != 'gpu' and ranks_onchip_bytes(A, num_experts) > kernels.MOSAIC_VMEM_SHARE * kernels.onchip_bytes():
    kernels.warn_once(f'ranks-{A}-{num_experts}', f'moe.kernels=pallas: the counting sort of {A} assignments over '
                      f'{num_experts} experts needs {ranks_onchip_bytes(A, num_experts)} bytes of VMEM, over '
                      f'{kernels.onchip_bytes()}; ranking with the XLA path (a stable sort)')
    impl = 'xla'
  if impl == 'pallas' and kernels.platform() == 'gpu' and _rank_rows(A) > TRITON_RANK_MAX_ROWS:
    kernels.warn_once(f'ranks-gpu-{A}', f'moe.kernels=pallas: the Triton counting sort holds all {A} assignments '
                      f'in registers, over its {TRITON_RANK_MAX_ROWS * C} limit; ranking with the XLA path (a stable sort)')
    impl = 'xla'
  if impl != 'pallas':
    return routing.expert_ranks(flat_A, num_experts)
  n, width = _rank_rows(A), _rank_width(num_experts)
  chunks = jnp.pad(flat_A.astype(jnp.int32), (0, n * C - A), constant_values=width).reshape(n, C)
  whole = pl.BlockSpec((n, C), lambda i: (0, 0))
  gpu = kernels.platform() == 'gpu'
  ranks = pl.pallas_call(
      functools.partial(_ranks_kernel, width=width), grid=(1,), in_specs=[whole], out_specs=whole,
      out_shape=kernels.out_struct((n, C), jnp.int32, flat_A),
      interpret=pltpu.InterpretParams() if kernels.interpret() else False,
      compiler_params=pl_triton.CompilerParams(num_warps=4) if gpu else None, name='moejax_expert_ranks')(chunks)
  return ranks.reshape(-1)[:A]


def dispatch_rows_reference(x_TD, plan: BlockPlan):
  return _pad_row(x_TD)[plan.row_token_R]


def combine_rows_reference(y_RD, gates_TK, plan: BlockPlan):
  y_TKD = y_RD[plan.assign_row_TK]
  return jnp.einsum('tk,tkd->td', gates_TK.astype(y_TKD.dtype), y_TKD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch(x_TD, row_token_R, assign_row_TK, impl):
  return gather_rows(_pad_row(x_TD), row_token_R, impl)


def _dispatch_fwd(x_TD, row_token_R, assign_row_TK, impl):
  return _dispatch(x_TD, row_token_R, assign_row_TK, impl), assign_row_TK


def _dispatch_bwd(impl, assign_row_TK, dx_RD):
  T, K = assign_row_TK.shape
  rows = gather_rows(dx_RD, assign_row_TK.reshape(-1), impl).reshape(T, K, -1)
  return jnp.sum(rows, axis=1), None, None  # gather, then sum over the k copies


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def _rows_of(y_RD, assign_row_TK, impl):
  T, K = assign_row_TK.shape
  return gather_rows(y_RD, assign_row_TK.reshape(-1), impl).reshape(T, K, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _combine(y_RD, gates_TK, assign_row_TK, row_assign_R, impl):
  y_TKD = _rows_of(y_RD, assign_row_TK, impl)
  return jnp.einsum('tk,tkd->td', gates_TK.astype(y_TKD.dtype), y_TKD)


def _combine_fwd(y_RD, gates_TK, assign_row_TK, row_assign_R, impl):
  out = _combine(y_RD, gates_TK, assign_row_TK, row_assign_R, impl)
  return out, (y_RD, gates_TK, assign_row_TK, row_assign_R)


def _combine_bwd(impl, res, dy_TD):
  y_RD, gates_TK, assign_row_TK, row_assign_R = res
  T, K = gates_TK.shape
  gates_A = _pad_row(gates_TK.reshape(-1))  # index T*K = padding row -> gate 0
  dy_rows = gather_rows(_pad_row(dy_TD), jnp.minimum(row_assign_R // K, T), impl)
  dy_RD = (gates_A[row_assign_R][:, None] * dy_rows).astype(y_RD.dtype)
  y_TKD = _rows_of(y_RD, assign_row_TK, impl)
  dgates_TK = jnp.einsum('td,tkd->tk', dy_TD.astype(jnp.float32), y_TKD.astype(jnp.float32))
  return dy_RD, dgates_TK.astype(gates_TK.dtype), None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def dispatch_rows(x_TD, plan: BlockPlan, impl: str = 'xla'):
  """x_RD: token rows in the plan's padded, expert-sorted layout."""
  if impl == 'reference':
    return dispatch_rows_reference(x_TD, plan)
  return _dispatch(x_TD, plan.row_token_R, plan.assign_row_TK, impl)


def combine_rows(y_RD, gates_TK, plan: BlockPlan, impl: str = 'xla'):
  """y_TD: the gate-weighted sum of each token's k expert rows."""
  if impl == 'reference':
    return combine_rows_reference(y_RD, gates_TK, plan)
  return _combine(y_RD, gates_TK, plan.assign_row_TK, plan.row_assign_R, impl)

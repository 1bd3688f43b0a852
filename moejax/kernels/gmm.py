"""Grouped matmul over the block-padded, expert-sorted row layout (`routing.BlockPlan`).

Every block of `block_size` rows belongs to one expert (block_expert_N), so

  block_gmm(x_RK, w_EKN, block_expert_N) -> y_RN,   y[block n] = x[block n] @ w[block_expert_N[n]]

The 'pallas' version has a custom VJP, dx = block_gmm(dy, w^T) (the same kernel) and
dw[e] = sum over e's blocks of x_n^T dy_n; an expert with no block gets dw = 0. Two kernel
families, picked by `kernels.platform()`:

TPU (Mosaic; interpret mode on CPU): a (row block n, output tile j, contraction tile kk)
  grid whose weight BlockSpec picks expert block_expert_N[n] through scalar prefetch, summing
  over kk in a float32 VMEM accumulator; the weight gradient runs over (K tile, N tile, n)
  with n innermost, accumulating while consecutive blocks share an expert. Tiles are
  multiples of 128 dividing the dim (or the whole dim), the largest whose double-buffered
  blocks fit 3/4 of the target's scoped VMEM (`mosaic_tiles`; output tiles capped by `tile`).
GPU (Triton): no scalar prefetch, so the kernel reads block_expert_N[n] itself and loads
  [tk, tn] weight tiles at dynamic offsets, looping over K in `tk` chunks with an f32
  accumulator; the weight gradient runs over (expert, K tile, N tile), each program looping
  over its expert's rows in chunks of `tr` (group starts and counts from the block list).
  Triton needs power-of-two tiles of at least 16, and its software pipeline keeps
  `TRITON['num_stages']` copies of both operand tiles in shared memory (the compiler's
  "requested" figure is exactly stages * (a tile + b tile) * itemsize), so `triton_tiles`
  takes the largest tiles within the target's shared memory per block.
Shapes no tiling fits (or blocks that break the rules above) fall back to the XLA path with
one warning per shape, never a compile failure.
The 'reference' version gathers each block's weights (an [n_blocks, K, N] copy) and uses one
batched einsum. The 'xla' version does the same in chunks of blocks whose gathered weights
fit `WEIGHT_COPY_BYTES` (a `lax.map` with a rematerialized body, so neither the forward nor
the saved residuals hold more than one chunk's copy): at OLMoE's shapes the one-shot copy
is about 4.5 GB per matmul. Small problems fit one chunk and take the one-shot path.
Autodiff gives both gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton

from moejax import kernels


def block_gmm_reference(x_RK, w_EKN, block_expert_N, block_size: int):
  n_blocks = block_expert_N.shape[0]
  x_NBK = x_RK.reshape(n_blocks, block_size, -1)
  return jnp.einsum('nbk,nkm->nbm', x_NBK, w_EKN[block_expert_N]).reshape(n_blocks * block_size, -1)


WEIGHT_COPY_BYTES = 256 << 20


def block_gmm_chunked(x_RK, w_EKN, block_expert_N, block_size: int, budget_bytes: int = WEIGHT_COPY_BYTES):
  """block_gmm_reference, gathering at most `budget_bytes` of block weights at a time."""
  n_blocks = block_expert_N.shape[0]
  K, N = w_EKN.shape[1:]
  per_chunk = max(1, budget_bytes // (K * N * w_EKN.dtype.itemsize))
  if per_chunk >= n_blocks:
    return block_gmm_reference(x_RK, w_EKN, block_expert_N, block_size)
  chunks = -(-n_blocks // per_chunk)
  pad = chunks * per_chunk - n_blocks  # zero blocks on expert 0, cut off below
  x = jnp.pad(x_RK.reshape(n_blocks, block_size, K), ((0, pad), (0, 0), (0, 0)))
  be = jnp.pad(block_expert_N, (0, pad))

  @jax.checkpoint  # keep only each chunk's inputs for the backward pass, not its weight copy
  def chunk(args):
    x_cBK, be_c = args
    return jnp.einsum('cbk,ckm->cbm', x_cBK, w_EKN[be_c])

  y = jax.lax.map(chunk, (x.reshape(chunks, per_chunk, block_size, K), be.reshape(chunks, per_chunk)))
  return y.reshape(chunks * per_chunk * block_size, N)[:n_blocks * block_size]


TRITON = dict(num_warps=4, num_stages=3)  # untuned (no GPU lent yet); see docs/kernels.md


def _lanes(n: int, cap: int) -> list[int]:
  """Mosaic tile candidates for a dim: multiples of 128 dividing n (<= cap), largest first; else n whole."""
  return [t for t in range(min(n, cap) // 128 * 128, 0, -128) if n % t == 0] or [n]


def _pow2s(n: int, cap: int) -> list[int]:
  """Triton tile candidates: powers of two >= 16 dividing n (<= cap), largest first."""
  return [t for t in (1 << b for b in range(min(n, cap).bit_length() - 1, 3, -1)) if n % t == 0]


def mosaic_vmem(block_size: int, tk: int, tn: int, itemsize: int, grad: bool = False) -> int:
  """VMEM bytes of one kernel step: double-buffered blocks plus the float32 accumulator / output."""
  if grad:  # x (bs, tk), dy (bs, tn) in; dw (tk, tn) float32 out
    return 2 * block_size * (tk + tn) * itemsize + 2 * tk * tn * 4
  return 2 * (block_size * tk + tk * tn + block_size * tn) * itemsize + block_size * tn * 4


def mosaic_tiles(block_size: int, K: int, N: int, itemsize: int, tile: int, budget: int,
                 grad: bool = False) -> tuple[int, int] | None:
  """(tk, tn) for a Mosaic kernel contracting K into N (grad: dw's [K, N] tiles), or None when none fits."""
  if block_size % 8:
    return None
  for tn in _lanes(N, max(tile, 128)):
    for tk in _lanes(K, max(tile, 128) if grad else 2048):
      if mosaic_vmem(block_size, tk, tn, itemsize, grad) <= budget * kernels.MOSAIC_VMEM_SHARE:
        return tk, tn
  return None


def triton_smem(rows: int, tk: int, tn: int, itemsize: int, grad: bool = False) -> int:
  """Shared memory of a Triton kernel: num_stages copies of both operand tiles."""
  per_stage = rows * (tk + tn) if grad else rows * tk + tk * tn
  return TRITON['num_stages'] * per_stage * itemsize


def triton_tiles(block_size: int, K: int, N: int, itemsize: int, tile: int, budget: int,
                 grad: bool = False) -> tuple[int, int, int] | None:
  """(rows, tk, tn) for a Triton kernel (rows: block_size, or dw's row chunk), or None when none fits."""
  if block_size < 16 or block_size & (block_size - 1):
    return None
  for tn in _pow2s(N, tile):
    for tk in _pow2s(K, tile if grad else 64):
      for rows in (_pow2s(block_size, 64) if grad else [block_size]):
        if triton_smem(rows, tk, tn, itemsize, grad) <= budget:
          return rows, tk, tn
  return None


def tiles(block_size: int, K: int, N: int, dtype, tile: int = 128) -> dict | None:
  """The target's tiles for the forward (K -> N), input gradient (N -> K) and weight gradient, or None."""
  itemsize, budget = jnp.dtype(dtype).itemsize, kernels.onchip_bytes()
  pick = triton_tiles if kernels.platform() == 'gpu' else mosaic_tiles
  plan = {'fwd': pick(block_size, K, N, itemsize, tile, budget), 'dx': pick(block_size, N, K, itemsize, tile, budget),
          'dw': pick(block_size, K, N, itemsize, tile, budget, grad=True)}
  return plan if all(plan.values()) else None


def _interpret():
  return pltpu.InterpretParams() if kernels.interpret() else False


def _gmm_kernel(be_ref, x_ref, w_ref, o_ref, acc_ref):
  del be_ref
  kk = pl.program_id(2)

  @pl.when(kk == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

  @pl.when(kk == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _gmm_mosaic(x_RK, w_EKN, block_expert_N, block_size: int, tk: int, tn: int):
  R, K = x_RK.shape
  N = w_EKN.shape[2]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(R // block_size, N // tn, K // tk),
      in_specs=[pl.BlockSpec((block_size, tk), lambda n, j, kk, be: (n, kk)),
                pl.BlockSpec((None, tk, tn), lambda n, j, kk, be: (be[n], kk, j))],
      out_specs=pl.BlockSpec((block_size, tn), lambda n, j, kk, be: (n, j)),
      scratch_shapes=[pltpu.VMEM((block_size, tn), jnp.float32)])
  return pl.pallas_call(_gmm_kernel, out_shape=kernels.out_struct((R, N), x_RK.dtype, x_RK, w_EKN, block_expert_N),
                        grid_spec=grid_spec, interpret=_interpret(), name='moejax_block_gmm',
                        compiler_params=pltpu.CompilerParams(
                            dimension_semantics=('parallel', 'parallel', 'arbitrary')))(block_expert_N, x_RK, w_EKN)


def _tgmm_kernel(be_ref, x_ref, dy_ref, o_ref):
  n = pl.program_id(2)
  first = jnp.logical_or(n == 0, be_ref[jnp.maximum(n - 1, 0)] != be_ref[n])

  @pl.when(first)
  def _():
    o_ref[...] = jnp.zeros_like(o_ref)

  o_ref[...] += jnp.dot(x_ref[...].T, dy_ref[...], preferred_element_type=jnp.float32)


def _tgmm_mosaic(x_RK, dy_RN, block_expert_N, num_experts: int, block_size: int, tk: int, tn: int):
  R, K = x_RK.shape
  N = dy_RN.shape[1]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(K // tk, N // tn, R // block_size),
      in_specs=[pl.BlockSpec((block_size, tk), lambda i, j, n, be: (n, i)),
                pl.BlockSpec((block_size, tn), lambda i, j, n, be: (n, j))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda i, j, n, be: (be[n], i, j)))
  dw = pl.pallas_call(_tgmm_kernel, out_shape=kernels.out_struct((num_experts, K, N), jnp.float32, x_RK, dy_RN, block_expert_N),
                      grid_spec=grid_spec, interpret=_interpret(), name='moejax_block_tgmm',
                      compiler_params=pltpu.CompilerParams(
                          dimension_semantics=('parallel', 'parallel', 'arbitrary')))(block_expert_N, x_RK, dy_RN)
  visited = jnp.zeros((num_experts,), jnp.bool_).at[block_expert_N].set(True)
  return jnp.where(visited[:, None, None], dw, 0.0)  # experts without a block were never written


def _gmm_triton_kernel(be_ref, x_ref, w_ref, o_ref, *, block_size, tk, tn):
  n, j = pl.program_id(0), pl.program_id(1)
  e = be_ref[n]
  rows = pl.ds(n * block_size, block_size)

  def body(i, acc):
    a = x_ref[rows, pl.ds(i * tk, tk)]
    b = w_ref[e, pl.ds(i * tk, tk), pl.ds(j * tn, tn)]
    return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, x_ref.shape[1] // tk, body, jnp.zeros((block_size, tn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _gmm_triton(x_RK, w_EKN, block_expert_N, block_size: int, tk: int, tn: int, interpret: bool = False):
  R, K = x_RK.shape
  N = w_EKN.shape[2]
  whole = lambda a: pl.BlockSpec(a.shape, lambda n, j: (0,) * a.ndim)
  return pl.pallas_call(
      functools.partial(_gmm_triton_kernel, block_size=block_size, tk=tk, tn=tn),
      out_shape=kernels.out_struct((R, N), x_RK.dtype, x_RK, w_EKN, block_expert_N), grid=(R // block_size, N // tn),
      in_specs=[whole(block_expert_N), whole(x_RK), whole(w_EKN)],
      out_specs=pl.BlockSpec((block_size, tn), lambda n, j: (n, j)),
      compiler_params=pl_triton.CompilerParams(**TRITON), interpret=interpret,
      name='moejax_block_gmm_gpu')(block_expert_N, x_RK, w_EKN)


def _tgmm_triton_kernel(start_ref, count_ref, x_ref, dy_ref, o_ref, *, block_size, tr, tk, tn):
  e, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  first_row = start_ref[e] * block_size

  def body(c, acc):
    rows = pl.ds(first_row + c * tr, tr)
    a, b = x_ref[rows, pl.ds(i * tk, tk)], dy_ref[rows, pl.ds(j * tn, tn)]
    return acc + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  chunks = count_ref[e] * (block_size // tr)
  o_ref[...] = jax.lax.fori_loop(0, chunks, body, jnp.zeros((tk, tn), jnp.float32))


def _tgmm_triton(x_RK, dy_RN, block_expert_N, num_experts: int, block_size: int, tr: int, tk: int, tn: int,
                 interpret: bool = False):
  R, K = x_RK.shape
  N = dy_RN.shape[1]
  count_E = jnp.bincount(block_expert_N, length=num_experts).astype(jnp.int32)
  start_E = (jnp.cumsum(count_E) - count_E).astype(jnp.int32)  # blocks are sorted by expert
  whole = lambda a: pl.BlockSpec(a.shape, lambda e, i, j: (0,) * a.ndim)
  return pl.pallas_call(
      functools.partial(_tgmm_triton_kernel, block_size=block_size, tr=tr, tk=tk, tn=tn),
      out_shape=kernels.out_struct((num_experts, K, N), jnp.float32, x_RK, dy_RN, block_expert_N),
      grid=(num_experts, K // tk, N // tn),
      in_specs=[whole(start_E), whole(count_E), whole(x_RK), whole(dy_RN)],
      out_specs=pl.BlockSpec((None, tk, tn), lambda e, i, j: (e, i, j)),
      compiler_params=pl_triton.CompilerParams(**TRITON), interpret=interpret,
      name='moejax_block_tgmm_gpu')(start_E, count_E, x_RK, dy_RN)


def _gmm_pallas(x_RK, w_EKN, block_expert_N, block_size, t):
  if kernels.platform() == 'gpu':
    return _gmm_triton(x_RK, w_EKN, block_expert_N, block_size, *t[1:])
  return _gmm_mosaic(x_RK, w_EKN, block_expert_N, block_size, *t)


def _tgmm_pallas(x_RK, dy_RN, block_expert_N, num_experts, block_size, t):
  if kernels.platform() == 'gpu':
    return _tgmm_triton(x_RK, dy_RN, block_expert_N, num_experts, block_size, *t)
  return _tgmm_mosaic(x_RK, dy_RN, block_expert_N, num_experts, block_size, *t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x_RK, w_EKN, block_expert_N, block_size, plan):
  return _gmm_pallas(x_RK, w_EKN, block_expert_N, block_size, plan[0])


def _gmm_fwd(x_RK, w_EKN, block_expert_N, block_size, plan):
  return _gmm_pallas(x_RK, w_EKN, block_expert_N, block_size, plan[0]), (x_RK, w_EKN, block_expert_N)


def _gmm_bwd(block_size, plan, res, dy_RN):
  x_RK, w_EKN, block_expert_N = res
  dx = _gmm_pallas(dy_RN, jnp.swapaxes(w_EKN, 1, 2), block_expert_N, block_size, plan[1])
  dw = _tgmm_pallas(x_RK, dy_RN, block_expert_N, w_EKN.shape[0], block_size, plan[2])
  return dx.astype(x_RK.dtype), dw.astype(w_EKN.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def megablox_gmm(x_RK, w_EKN, block_expert_N, block_size: int, tiling=(128, 128, 128)):
  """The same product through the megablox `gmm` kernel shipped with jax (Mosaic TPU; interpret mode on CPU).

  Blocks are contiguous per expert, so group sizes are blocks-per-expert * block_size. Used as an
  independent oracle in tests and as the TPU alternative to compare against; tiles must divide
  (block rows, K, N).
  """
  from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox  # pylint: disable=import-outside-toplevel
  sizes = jnp.bincount(block_expert_N, length=w_EKN.shape[0]).astype(jnp.int32) * block_size
  return megablox(x_RK, w_EKN, sizes, preferred_element_type=x_RK.dtype, tiling=tiling,
                  interpret=kernels.interpret())


def block_gmm(x_RK, w_EKN, block_expert_N, block_size: int, impl: str = 'xla', tile: int = 128):
  """y_RN: each block of rows times its expert's weights (see the module docstring)."""
  R = x_RK.shape[0]
  if R % block_size:
    raise ValueError(f'block_gmm: {R} rows are not a multiple of block_size={block_size}')
  plan = None
  impl = kernels.fallback_outside_shard_map('grouped matmul', impl)
  if impl == 'pallas':
    K, N = w_EKN.shape[1:]
    dtype = jnp.promote_types(x_RK.dtype, w_EKN.dtype)
    plan = tiles(block_size, K, N, dtype, tile)
    if plan is None:
      need = ('power-of-two tiles of >= 16 and block_size' if kernels.platform() == 'gpu'
              else 'tiles obeying the (8, 128) block rule')
      kernels.warn_once(f'gmm-{kernels.platform()}-{block_size}-{K}-{N}-{dtype}',
                        f'moe.kernels=pallas: no {kernels.platform()} grouped-matmul tiling of block_size={block_size}, '
                        f'K={K}, N={N} ({dtype}) fits {kernels.onchip_bytes()} bytes of on-chip memory with {need}; '
                        f'using the XLA path for this shape')
      impl = 'xla'
  if impl == 'pallas':
    x_RK, w_EKN, block_expert_N = kernels.same_vma(x_RK, w_EKN, block_expert_N.astype(jnp.int32))
    return _gmm(x_RK, w_EKN, block_expert_N, block_size, (plan['fwd'], plan['dx'], plan['dw']))
  if impl == 'xla':
    return block_gmm_chunked(x_RK, w_EKN, block_expert_N, block_size)
  return block_gmm_reference(x_RK, w_EKN, block_expert_N, block_size)

"""Grouped matmul over the block-padded, expert-sorted row layout (`routing.BlockPlan`).

Every block of `block_size` rows belongs to one expert (block_expert_N), so

  block_gmm(x_RK, w_EKN, block_expert_N) -> y_RN,   y[block n] = x[block n] @ w[block_expert_N[n]]

The 'pallas' version is a kernel over a (row block n, output tile j) grid whose weight
BlockSpec picks expert block_expert_N[n] through scalar prefetch, and a custom VJP:
  dx = block_gmm(dy, w^T)                       (the same kernel)
  dw[e] = sum over e's blocks of x_n^T dy_n     (`_tgmm`: grid (K tile, N tile, n) with n innermost,
                                                 accumulating while consecutive blocks share an expert)
An expert with no block gets dw = 0. Tiles: the output width is tiled by `tile` (default 128)
when it divides N, else taken whole; the contraction dim is taken whole.
The 'reference' and 'xla' versions gather each block's weights (an [N, K, N_out] copy) and
use one batched einsum; autodiff gives their gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax import kernels


def block_gmm_reference(x_RK, w_EKN, block_expert_N, block_size: int):
  n_blocks = block_expert_N.shape[0]
  x_NBK = x_RK.reshape(n_blocks, block_size, -1)
  return jnp.einsum('nbk,nkm->nbm', x_NBK, w_EKN[block_expert_N]).reshape(n_blocks * block_size, -1)


def _tile(n: int, tile: int) -> int:
  return tile if n % tile == 0 else n


def _interpret():
  return pltpu.InterpretParams() if kernels.interpret() else False


def _gmm_kernel(be_ref, x_ref, w_ref, o_ref):
  del be_ref
  o_ref[...] = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32).astype(o_ref.dtype)


def _gmm_pallas(x_RK, w_EKN, block_expert_N, block_size: int, tile: int):
  R, K = x_RK.shape
  N = w_EKN.shape[2]
  tn = _tile(N, tile)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(R // block_size, N // tn),
      in_specs=[pl.BlockSpec((block_size, K), lambda n, j, be: (n, 0)),
                pl.BlockSpec((None, K, tn), lambda n, j, be: (be[n], 0, j))],
      out_specs=pl.BlockSpec((block_size, tn), lambda n, j, be: (n, j)))
  return pl.pallas_call(_gmm_kernel, out_shape=jax.ShapeDtypeStruct((R, N), x_RK.dtype), grid_spec=grid_spec,
                        interpret=_interpret(), name='moejax_block_gmm')(block_expert_N, x_RK, w_EKN)


def _tgmm_kernel(be_ref, x_ref, dy_ref, o_ref):
  n = pl.program_id(2)
  first = jnp.logical_or(n == 0, be_ref[jnp.maximum(n - 1, 0)] != be_ref[n])

  @pl.when(first)
  def _():
    o_ref[...] = jnp.zeros_like(o_ref)

  o_ref[...] += jnp.dot(x_ref[...].T, dy_ref[...], preferred_element_type=jnp.float32)


def _tgmm_pallas(x_RK, dy_RN, block_expert_N, num_experts: int, block_size: int, tile: int):
  R, K = x_RK.shape
  N = dy_RN.shape[1]
  tk, tn = _tile(K, tile), _tile(N, tile)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(K // tk, N // tn, R // block_size),
      in_specs=[pl.BlockSpec((block_size, tk), lambda i, j, n, be: (n, i)),
                pl.BlockSpec((block_size, tn), lambda i, j, n, be: (n, j))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda i, j, n, be: (be[n], i, j)))
  dw = pl.pallas_call(_tgmm_kernel, out_shape=jax.ShapeDtypeStruct((num_experts, K, N), jnp.float32),
                      grid_spec=grid_spec, interpret=_interpret(), name='moejax_block_tgmm')(block_expert_N, x_RK, dy_RN)
  visited = jnp.zeros((num_experts,), jnp.bool_).at[block_expert_N].set(True)
  return jnp.where(visited[:, None, None], dw, 0.0)  # experts without a block were never written


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x_RK, w_EKN, block_expert_N, block_size, tile):
  return _gmm_pallas(x_RK, w_EKN, block_expert_N, block_size, tile)


def _gmm_fwd(x_RK, w_EKN, block_expert_N, block_size, tile):
  return _gmm_pallas(x_RK, w_EKN, block_expert_N, block_size, tile), (x_RK, w_EKN, block_expert_N)


def _gmm_bwd(block_size, tile, res, dy_RN):
  x_RK, w_EKN, block_expert_N = res
  dx = _gmm_pallas(dy_RN, jnp.swapaxes(w_EKN, 1, 2), block_expert_N, block_size, tile)
  dw = _tgmm_pallas(x_RK, dy_RN, block_expert_N, w_EKN.shape[0], block_size, tile)
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
  if impl == 'pallas':
    return _gmm(x_RK, w_EKN, block_expert_N.astype(jnp.int32), block_size, tile)
  return block_gmm_reference(x_RK, w_EKN, block_expert_N, block_size)

"""The router in one pass over [T, E] logits: scores, top-k, gates and the expert histogram.

route(logits_TE, k, score='softmax'|'sigmoid', bias_E=None, renormalize=False, scale=1.0, impl)
  -> (scores_TE, experts_TK, gates_TK, counts_E)

Semantics are those of `moejax.routing` (router_scores, select_experts, gate_weights,
expert_counts): selection on scores + bias (the bias never reaches
the gates), ties to the lower expert id, gates renormalized over the k when asked (always
for sigmoid scoring, as the MoE layer calls it), times `scale`.

The 'pallas' kernel takes blocks of `block_rows` rows (the last block is padded with rows
that do not count in the histogram) and writes one partial histogram per block, summed
outside. Top-k is k rounds of row max + lowest matching index + mask. Its VJP recomputes
the reference scores and gates for the selected experts and differentiates those (the
selection itself has no gradient). On GPU (Triton) the expert count, k and the row block
must be powers of two; other shapes route with the XLA path after a one-time warning.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton

from moejax import kernels, routing


def route_reference(logits_TE, k: int, score: str = 'softmax', bias_E=None, renormalize: bool = False,
                    scale: float = 1.0, num_groups: int = 1, topk_groups: int = 1):
  scores_TE = routing.router_scores(logits_TE, score)
  experts_TK = routing.select_experts(scores_TE, k, bias_E, num_groups, topk_groups)
  gates_TK = routing.gate_weights(scores_TE, experts_TK, renormalize, scale)
  return scores_TE, experts_TK, gates_TK, routing.expert_counts(experts_TK, logits_TE.shape[-1])


def _router_kernel(logits_ref, bias_ref, scores_ref, experts_ref, gates_ref, counts_ref, *, k, score, renormalize,
                   scale, valid_rows, block_rows):
  z = logits_ref[...].astype(jnp.float32)
  rows, E = z.shape
  if score == 'sigmoid':
    s = jax.nn.sigmoid(z)
  else:
    e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
    s = e / jnp.sum(e, axis=-1, keepdims=True)
  scores_ref[...] = s
  sel = s + bias_ref[...].astype(jnp.float32)
  col = jax.lax.broadcasted_iota(jnp.int32, (rows, E), 1)
  row = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) + pl.program_id(0) * block_rows
  valid = (row < valid_rows).astype(jnp.float32)
  counts = jnp.zeros((1, E), jnp.float32)
  slot = jax.lax.broadcasted_iota(jnp.int32, (rows, k), 1)  # columns filled by select (Triton has no n-way concat)
  experts = jnp.zeros((rows, k), jnp.int32)
  g = jnp.zeros((rows, k), jnp.float32)
  for r in range(k):
    best = jnp.max(sel, axis=-1, keepdims=True)
    i = jnp.min(jnp.where(sel == best, col, E), axis=-1, keepdims=True)
    hit = col == i
    experts = jnp.where(slot == r, i, experts)
    g = jnp.where(slot == r, jnp.sum(jnp.where(hit, s, 0.0), axis=-1, keepdims=True), g)
    counts = counts + jnp.sum(jnp.where(hit, valid, 0.0), axis=0, keepdims=True)
    sel = jnp.where(hit, -jnp.inf, sel)
  if renormalize:
    g = g / jnp.sum(g, axis=-1, keepdims=True)
  experts_ref[...] = experts
  gates_ref[...] = g * scale
  counts_ref[...] = counts


def _route_pallas(logits_TE, bias_E, k, score, renormalize, scale, block_rows):
  T, E = logits_TE.shape
  br = min(block_rows, T)
  n_blocks = -(-T // br)
  padded = n_blocks * br
  z = jnp.pad(logits_TE.astype(jnp.float32), ((0, padded - T), (0, 0)))
  kernel = functools.partial(_router_kernel, k=k, score=score, renormalize=renormalize, scale=scale, valid_rows=T,
                             block_rows=br)
  rows = lambda width: pl.BlockSpec((br, width), lambda i: (i, 0))
  scores, experts, gates, counts = pl.pallas_call(
      kernel, grid=(n_blocks,),
      in_specs=[rows(E), pl.BlockSpec((1, E), lambda i: (0, 0))],
      # a [1, E] histogram per block; as a (None, 1, E) block of [n_blocks, 1, E] its last two dims equal the
      # array's, which Mosaic's (8, 128) rule accepts (a (1, E) block of [n_blocks, E] it rejects)
      out_specs=[rows(E), rows(k), rows(k), pl.BlockSpec((None, 1, E), lambda i: (i, 0, 0))],
      out_shape=[kernels.out_struct((padded, E), jnp.float32, z, bias_E), kernels.out_struct((padded, k), jnp.int32, z, bias_E),
                 kernels.out_struct((padded, k), jnp.float32, z, bias_E),
                 kernels.out_struct((n_blocks, 1, E), jnp.float32, z, bias_E)],
      interpret=pltpu.InterpretParams() if kernels.interpret() else False, name='moejax_router',
      compiler_params=pl_triton.CompilerParams(num_warps=4) if kernels.platform() == 'gpu' else None,
  )(z, bias_E.reshape(1, E).astype(jnp.float32))
  return scores[:T], experts[:T], gates[:T], jnp.sum(counts, axis=(0, 1)).astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _route(logits_TE, bias_E, k, score, renormalize, scale, block_rows):
  return _route_pallas(logits_TE, bias_E, k, score, renormalize, scale, block_rows)


def _route_fwd(logits_TE, bias_E, k, score, renormalize, scale, block_rows):
  out = _route_pallas(logits_TE, bias_E, k, score, renormalize, scale, block_rows)
  return out, (logits_TE, out[1])


def _route_bwd(k, score, renormalize, scale, block_rows, res, cotangents):
  logits_TE, experts_TK = res
  d_scores, _, d_gates, _ = cotangents

  def differentiable(z):
    s = routing.router_scores(z, score)
    return s, routing.gate_weights(s, experts_TK, renormalize, scale)

  _, vjp = jax.vjp(differentiable, logits_TE)
  (d_logits,) = vjp((d_scores, d_gates))
  return d_logits, None


_route.defvjp(_route_fwd, _route_bwd)


GPU_BLOCK_ELEMENTS = 32768


def route(logits_TE, k: int, score: str = 'softmax', bias_E=None, renormalize: bool = False, scale: float = 1.0,
          impl: str = 'xla', block_rows: int = 256, num_groups: int = 1, topk_groups: int = 1):
  """(scores_TE, experts_TK, gates_TK, counts_E); see the module docstring.

  Group-limited selection (num_groups > 1) is not in the kernel: 'pallas' then routes with the
  reference functions, after a one-time warning.
  """
  impl = kernels.fallback_outside_shard_map('router', impl)
  if impl == 'pallas' and num_groups > 1:
    kernels.warn_once('router-groups', 'moe.kernels=pallas: the router kernel has no group-limited top-k; '
                      'routing with the XLA path (num_expert_groups > 1)')
    impl = 'xla'
  if impl == 'pallas' and kernels.platform() == 'gpu':
    T, E = logits_TE.shape
    # Triton holds a block's [rows, E] scores in registers: 256 x 128 compiled; at 256 x 256 (E256, 64k tokens)
    # ptxas ran for minutes in 7.4 GB. Rows per block shrink so that a block has at most GPU_BLOCK_ELEMENTS.
    block_rows = min(block_rows, max(16, GPU_BLOCK_ELEMENTS // E))
    pow2 = lambda n: n & (n - 1) == 0
    if not (pow2(E) and pow2(k) and pow2(min(block_rows, T))):
      kernels.warn_once(f'router-gpu-{E}-{k}', f'moe.kernels=pallas: the GPU router kernel needs power-of-two '
                        f'num_experts ({E}), top_k ({k}) and row block ({min(block_rows, T)}); routing with the XLA path')
      impl = 'xla'
  if impl != 'pallas':
    return route_reference(logits_TE, k, score, bias_E, renormalize, scale, num_groups, topk_groups)
  bias = jnp.zeros((logits_TE.shape[-1],), jnp.float32) if bias_E is None else jax.lax.stop_gradient(bias_E)
  return _route(logits_TE, bias, k, score, renormalize, float(scale), block_rows)

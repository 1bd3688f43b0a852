"""Causal grouped-query attention cores, selected by `model.attention` (docs/scaling-out.md, "Attention").

Every core maps q_BLHK, k_BLGK, v_BLGK (rotary already applied; G kv heads shared by H/G query
heads each) to o_BLHK, scaled by 1/sqrt(K), causal, and, with `segment_ids_BL`, restricted to
keys of the query's own segment (document masking: `document_layout`).

  'xla'        `jax.nn.dot_product_attention` as it was always called (the default; it builds the
               [H, L, L] scores, and keeps the probabilities for the backward pass).
  'blockwise'  flash attention in plain jnp: queries in blocks of `q_block`, keys in blocks of
               `kv_block` with an online softmax; a custom VJP recomputes each block's scores from
               the saved log-sum-exp, so neither pass ever holds more than [H, q_block, kv_block]
               scores. Causal: key blocks after a query block are skipped. Any backend.
  'cudnn'      `jax.nn.dot_product_attention(implementation='cudnn')`: cuDNN's fused flash attention
               (GPU only; bfloat16/float16 inputs). Document masking becomes a [B, 1, L, L] boolean mask.
  'splash'     jax's Pallas TPU splash-attention kernel (TPU; `interpret=True` runs it on CPU, for tests).
  'auto'       'cudnn' on GPU with a bfloat16 model, 'splash' on TPU, else 'xla'.

On a multi-device mesh the splash kernel runs inside a `jax.shard_map` (XLA cannot partition Mosaic
calls); the jnp cores and cuDNN's are partitioned by XLA like any other op.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec as P

from moejax import kernels
from moejax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS  # noqa: F401  (re-exported)
from moejax.parallel import mesh as mesh_lib
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # a finite "minus infinity": exp(masked - max) is 0, never NaN


def resolve(impl: str, dtype=jnp.float32, platform: str | None = None, head_dim: int | None = None,
            seq_len: int | None = None, masked: bool = False) -> str:
  """The concrete core for `model.attention` on `platform` (default: the platform kernels are lowered for,
  `kernels.platform()`: a compile target's inside `kernels.target`, else jax's default backend).

  Compiling for a GPU target without a GPU (`--target=gpu:...`), 'auto' gives 'blockwise' (warned once):
  cuDNN's fused attention is built by the cuDNN library at compile time, which a deviceless compile lacks. So
  does a shape cuDNN's attention refuses (jax raises deep in tracing): a head_dim that is not a multiple of 8 or is
  over 128 (256 needs Hopper), or an odd length with a segment mask.
  """
  if impl != 'auto':
    return impl
  platform = platform or kernels.platform()
  if platform == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    if kernels.deviceless():
      kernels.warn_once('attention-auto-deviceless', "model.attention='auto': cuDNN's attention cannot be compiled "
                        'without cuDNN and a GPU; compiling the blockwise core for this target instead')
      return 'blockwise'
    if (head_dim is not None and (head_dim % 8 or head_dim > 128)) or (masked and seq_len and seq_len % 2):
      kernels.warn_once('attention-auto-shape', f"model.attention='auto': cuDNN's attention does not take head_dim "
                        f'{head_dim} with length {seq_len}{" and a segment mask" if masked else ""}; using the '
                        'blockwise core')
      return 'blockwise'
    return 'cudnn'
  return 'splash' if platform == 'tpu' else 'xla'


def document_layout(tokens_BL: jax.Array, separator: int) -> tuple[jax.Array, jax.Array]:
  """(segment_ids_BL, positions_BL) of packed windows whose documents each begin with `separator`.

  Segment ids count documents from 1 within each row (0 is left for padding): the first token
  opens segment 1 (it may continue a document begun before the window) and every later
  separator opens the next. Positions restart at 0 at each segment's first token.
  """
  tokens_BL = jnp.asarray(tokens_BL)
  L = tokens_BL.shape[1]
  index_L = jnp.arange(L, dtype=jnp.int32)
  starts_BL = (tokens_BL == separator) | (index_L == 0)[None]
  segment_ids_BL = jnp.cumsum(starts_BL, axis=1, dtype=jnp.int32)
  first_BL = jax.lax.cummax(jnp.where(starts_BL, index_L[None], 0), axis=1)
  return segment_ids_BL, index_L[None] - first_BL


def attend(q_BLHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array, impl: str = 'xla',
           segment_ids_BL: jax.Array | None = None, q_block: int = 512, kv_block: int = 512,
           interpret: bool = False) -> jax.Array:
  """Causal attention o_BLHK by the named core (`resolve`d)."""
  impl = resolve(impl, q_BLHK.dtype, head_dim=q_BLHK.shape[-1], seq_len=q_BLHK.shape[1],
                 masked=segment_ids_BL is not None)
  if impl == 'blockwise':
    return blockwise_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, q_block, kv_block)
  if impl == 'splash':
    return _splash_on_mesh(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, q_block, kv_block, interpret)
  if impl == 'xla' and segment_ids_BL is None:
    # dot_product_attention broadcasts kv heads over query-head groups (GQA) and scales by 1/sqrt(K).
    return jax.nn.dot_product_attention(q_BLHK, k_BLGK, v_BLGK, is_causal=True)
  mask = None if segment_ids_BL is None else (segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :])
  return jax.nn.dot_product_attention(q_BLHK, k_BLGK, v_BLGK, mask=mask, is_causal=True,
                                      implementation=None if impl == 'xla' else impl)


# ----- blockwise (flash) attention in jnp -----

def _visible(qi, kj, bq: int, bk: int, seg_q_BQ, seg_k_BS):
  """[B or 1, bq, bk] booleans: key index <= query index, and the same segment."""
  vis = (kj * bk + jnp.arange(bk))[None, :] <= (qi * bq + jnp.arange(bq))[:, None]
  return vis[None] & (seg_q_BQ[:, :, None] == seg_k_BS[:, None, :])


def _block(x, i, size: int, axis: int):
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis)


def _scores(q_BGRQK, k_BGSK, scale):
  return jnp.einsum('bgrqk,bgsk->bgrqs', q_BGRQK, k_BGSK, preferred_element_type=jnp.float32) * scale


def _last_kv_block(qi, bq: int, bk: int):
  """One past the last key block a causal query block `qi` sees."""
  return ((qi + 1) * bq - 1) // bk + 1


def _flash_fwd(q, k, v, seg, bq, bk):
  """(o_BGRLK, lse_BGRL) over padded, head-grouped inputs."""
  B, G, R, L, K = q.shape
  scale = 1.0 / math.sqrt(K)

  def q_block(qi):
    q_i, seg_q = _block(q, qi, bq, 3), _block(seg, qi, bq, 1)

    def body(kj, carry):
      o, m, l = carry
      k_j, v_j, seg_k = _block(k, kj, bk, 2), _block(v, kj, bk, 2), _block(seg, kj, bk, 1)
      vis = _visible(qi, kj, bq, bk, seg_q, seg_k)[:, None, None]
      s = jnp.where(vis, _scores(q_i, k_j, scale), _MASKED)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      o = alpha[..., None] * o + jnp.einsum('bgrqs,bgsk->bgrqk', p.astype(v.dtype), v_j,
                                            preferred_element_type=jnp.float32)
      return o, m_new, alpha * l + jnp.sum(p, axis=-1)

    init = (jnp.zeros((B, G, R, bq, K), jnp.float32), jnp.full((B, G, R, bq), _MASKED, jnp.float32),
            jnp.zeros((B, G, R, bq), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, _last_kv_block(qi, bq, bk), body, init)
    l = jnp.where(l == 0, 1.0, l)
    return (o / l[..., None]).astype(q.dtype), m + jnp.log(l)

  o, lse = jax.lax.map(q_block, jnp.arange(L // bq))  # [nq, B, G, R, bq, ...]
  return jnp.moveaxis(o, 0, 3).reshape(B, G, R, L, K), jnp.moveaxis(lse, 0, 3).reshape(B, G, R, L)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, seg, bq, bk):
  return _flash_fwd(q, k, v, seg, bq, bk)[0]


def _flash_vjp_fwd(q, k, v, seg, bq, bk):
  o, lse = _flash_fwd(q, k, v, seg, bq, bk)
  return o, (q, k, v, seg, o, lse)


def _flash_vjp_bwd(bq, bk, res, do):
  q, k, v, seg, o, lse = res
  B, G, R, L, K = q.shape
  scale = 1.0 / math.sqrt(K)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, G, R, L]

  def probs(qi, kj):
    """(p, ds) of block (qi, kj), recomputed from the saved log-sum-exp."""
    q_i, k_j, v_j = _block(q, qi, bq, 3), _block(k, kj, bk, 2), _block(v, kj, bk, 2)
    vis = _visible(qi, kj, bq, bk, _block(seg, qi, bq, 1), _block(seg, kj, bk, 1))[:, None, None]
    p = jnp.where(vis, jnp.exp(_scores(q_i, k_j, scale) - _block(lse, qi, bq, 3)[..., None]), 0.0)
    dp = jnp.einsum('bgrqk,bgsk->bgrqs', _block(do, qi, bq, 3), v_j, preferred_element_type=jnp.float32)
    return p, p * (dp - _block(delta, qi, bq, 3)[..., None])

  def dq_block(qi):
    def body(kj, dq):
      _, ds = probs(qi, kj)
      return dq + jnp.einsum('bgrqs,bgsk->bgrqk', ds, _block(k, kj, bk, 2).astype(jnp.float32)) * scale
    return jax.lax.fori_loop(0, _last_kv_block(qi, bq, bk), body, jnp.zeros((B, G, R, bq, K), jnp.float32))

  def dkv_block(kj):
    def body(qi, carry):
      dk, dv = carry
      p, ds = probs(qi, kj)
      dv = dv + jnp.einsum('bgrqs,bgrqk->bgsk', p, _block(do, qi, bq, 3).astype(jnp.float32))
      dk = dk + jnp.einsum('bgrqs,bgrqk->bgsk', ds, _block(q, qi, bq, 3).astype(jnp.float32)) * scale
      return dk, dv
    zeros = jnp.zeros((B, G, bk, K), jnp.float32)
    return jax.lax.fori_loop((kj * bk) // bq, L // bq, body, (zeros, zeros))

  dq = jnp.moveaxis(jax.lax.map(dq_block, jnp.arange(L // bq)), 0, 3).reshape(q.shape)
  dk, dv = jax.lax.map(dkv_block, jnp.arange(L // bk))
  dk, dv = (jnp.moveaxis(x, 0, 2).reshape(k.shape) for x in (dk, dv))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def _padded_blocks(L: int, q_block: int, kv_block: int) -> tuple[int, int, int]:
  """(bq, bk, padded L): blocks no longer than L, and L rounded up to a multiple of both."""
  bq, bk = min(q_block, L), min(kv_block, L)
  step = math.lcm(bq, bk)
  return bq, bk, -(-L // step) * step


def blockwise_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL=None, q_block: int = 512, kv_block: int = 512):
  """Flash attention in jnp (the 'blockwise' core); any L (padded to the blocks, padding masked)."""
  B, L, H, K = q_BLHK.shape
  G = k_BLGK.shape[2]
  bq, bk, Lp = _padded_blocks(L, q_block, kv_block)
  seg_BL = jnp.ones((B, L), jnp.int32) if segment_ids_BL is None else segment_ids_BL.astype(jnp.int32)
  pad = Lp - L
  seg_BL = jnp.pad(seg_BL, ((0, 0), (0, pad)), constant_values=-1)  # padded keys: no real query's segment
  grouped = lambda x, heads: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, Lp, G, heads, K)
  q = jnp.transpose(grouped(q_BLHK, H // G), (0, 2, 3, 1, 4))  # [B, G, R, Lp, K]
  k, v = (jnp.transpose(grouped(x, 1)[:, :, :, 0], (0, 2, 1, 3)) for x in (k_BLGK, v_BLGK))  # [B, G, Lp, K]
  o = _flash(q, k, v, seg_BL, bq, bk)
  return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, Lp, H, K)[:, :L]


# ----- Pallas TPU splash attention -----

def _splash_on_mesh(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, q_block: int, kv_block: int, interpret: bool):
  """`splash_attention`, per device inside a `jax.shard_map` when the context mesh has several devices.

  XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be automatically partitioned"), so
  on a multi-device mesh each device runs the kernel on its own rows: the batch over the longest
  leading run of the mesh's batch axes that B divides and, when the mesh's 'tensor' axis divides both head counts,
  query and kv heads over it (contiguous shards keep every query head with its kv head).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return splash_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, q_block, kv_block, interpret)
  batch_axes = tuple(a for a in mesh_lib.LOGICAL_AXIS_RULES['batch'] if mesh.shape.get(a, 1) > 1)
  batch = ()
  for axis in batch_axes:  # the longest run of batch axes that B divides (the rest see whole rows)
    if q_BLHK.shape[0] % math.prod(mesh.shape[a] for a in batch + (axis,)):
      break
    batch += (axis,)
  batch = batch or None
  t = mesh.shape.get('tensor', 1)
  heads = 'tensor' if t > 1 and q_BLHK.shape[2] % t == 0 and k_BLGK.shape[2] % t == 0 else None
  qkv = P(batch, None, heads, None)
  seg = jnp.ones(q_BLHK.shape[:2], jnp.int32) if segment_ids_BL is None else segment_ids_BL
  fn = functools.partial(splash_attention, q_block=q_block, kv_block=kv_block, interpret=interpret)
  return jax.shard_map(lambda q, k, v, s: fn(q, k, v, s), mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None)),
                       out_specs=qkv, check_vma=False)(q_BLHK, k_BLGK, v_BLGK, seg)


def splash_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL=None, q_block: int = 512, kv_block: int = 512,
                     interpret: bool = False):
  """jax's Pallas TPU splash-attention kernel, one multi-query kernel per kv head (GQA), vmapped over the batch."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as splash, splash_attention_mask as masks)
  B, L, H, K = q_BLHK.shape
  G = k_BLGK.shape[2]
  # The kernel tiles by multiples of 128: a shorter sequence runs as one 128-row block, padding masked.
  up = lambda n: -(-n // 128) * 128  # noqa: E731
  bq, bk, Lp = _padded_blocks(up(L), up(q_block), up(kv_block))
  pad = ((0, 0), (0, Lp - L), (0, 0), (0, 0))
  q = jnp.transpose(jnp.pad(q_BLHK, pad), (0, 2, 1, 3)).reshape(B, G, H // G, Lp, K) / math.sqrt(K)
  k, v = (jnp.transpose(jnp.pad(x, pad), (0, 2, 1, 3)) for x in (k_BLGK, v_BLGK))  # [B, G, Lp, K]
  sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                            block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  mask = masks.MultiHeadMask([masks.CausalMask((Lp, Lp)) for _ in range(H // G)])
  kernel = splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
  seg = jnp.ones((B, L), jnp.int32) if segment_ids_BL is None else segment_ids_BL.astype(jnp.int32)
  seg = jnp.pad(seg, ((0, 0), (0, Lp - L)), constant_values=-1)
  per_kv_head = jax.vmap(lambda q_RLK, k_LK, v_LK, s: kernel(q_RLK, k_LK, v_LK, segment_ids=splash.SegmentIds(s, s)),
                         in_axes=(0, 0, 0, None))
  o = jax.vmap(per_kv_head)(q, k, v, seg)  # [B, G, R, Lp, K]
  return jnp.transpose(o.reshape(B, H, Lp, K), (0, 2, 1, 3))[:, :L]

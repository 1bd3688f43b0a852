"""Transformer building blocks: RMSNorm, embedding, rotary attention (GQA), dense SwiGLU.

Parameters are float32 `nnx.Param`s with `logical_axes` metadata (resolved by
`moejax.parallel.mesh`); matmuls run in the `dtype` each module is given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model import attention as attention_lib


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
  """A normal(0, std) float32 parameter tagged with logical axis names."""
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), logical_axes=axes)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, computed in float32."""

  def __init__(self, dim: int, eps: float, axis: str = 'embed'):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(axis,))
    self.eps = eps

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...]).astype(x_BLD.dtype)


class Embed(nnx.Module):
  """Token embedding table [V, D]; `attend` gives the tied output logits."""

  def __init__(self, vocab: int, dim: int, std: float, rngs: nnx.Rngs):
    self.table = param(rngs, (vocab, dim), ('vocab', 'embed'), std)

  def __call__(self, tokens_BL: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.table[...], tokens_BL, axis=0).astype(dtype)

  def attend(self, x_BLD: jax.Array) -> jax.Array:
    return jnp.einsum('bld,vd->blv', x_BLD, self.table[...].astype(x_BLD.dtype))


def rotary(x_BLHK: jax.Array, base: float, positions_BL: jax.Array | None = None) -> jax.Array:
  """Rotary position embedding (rotate-half form) in float32, at `positions_BL` (default 0..L-1 in every row)."""
  L, K = x_BLHK.shape[1], x_BLHK.shape[-1]
  inv_freq = base ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
  positions = jnp.arange(L)[None] if positions_BL is None else positions_BL
  angles_BLK = positions.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(angles_BLK)[:, :, None, :], jnp.cos(angles_BLK)[:, :, None, :]
  x = x_BLHK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)


class ProjectionRMSNorm(nnx.Module):
  """RMSNorm over a whole [H, K] projection (OLMoE's QK-norm): one rms over H*K values, a scale per value."""

  def __init__(self, heads: int, head_dim: int, eps: float, axis: str):
    self.scale = nnx.Param(jnp.ones((heads, head_dim), jnp.float32), logical_axes=(axis, 'head_dim'))
    self.eps = eps

  def __call__(self, x_BLHK: jax.Array) -> jax.Array:
    x = x_BLHK.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=(-2, -1), keepdims=True) + self.eps)
    return (x * self.scale[...]).astype(x_BLHK.dtype)


def _qk_norm(heads: int, head_dim: int, eps: float | None, scope: str, axis: str):
  if not eps:
    return None
  return RMSNorm(head_dim, eps, 'head_dim') if scope == 'head' else ProjectionRMSNorm(heads, head_dim, eps, axis)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings.

  Options: QK-norm (`qk_norm_eps`) per head or over the whole projection (`qk_norm_scope`),
  query/key/value biases (`use_qkv_bias`, Qwen2-MoE), and the attention core with its
  blocks (`attention`, `blocks`: moejax/model/attention.py).
  """

  def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, rope_base: float, std: float,
               out_std: float, rngs: nnx.Rngs, qk_norm_eps: float | None = None, qk_norm_scope: str = 'head',
               use_qkv_bias: bool = False, attention: str = 'xla', blocks: tuple[int, int] = (512, 512)):
    self.wq = param(rngs, (dim, heads, head_dim), ('embed', 'heads', 'head_dim'), std)
    self.wk = param(rngs, (dim, kv_heads, head_dim), ('embed', 'kv_heads', 'head_dim'), std)
    self.wv = param(rngs, (dim, kv_heads, head_dim), ('embed', 'kv_heads', 'head_dim'), std)
    self.wo = param(rngs, (heads, head_dim, dim), ('heads', 'head_dim', 'embed'), out_std)
    self.rope_base = rope_base
    self.q_norm = _qk_norm(heads, head_dim, qk_norm_eps, qk_norm_scope, 'heads')
    self.k_norm = _qk_norm(kv_heads, head_dim, qk_norm_eps, qk_norm_scope, 'kv_heads')
    zeros = lambda h, axis: nnx.Param(jnp.zeros((h, head_dim), jnp.float32), logical_axes=(axis, 'head_dim'))
    self.bq = zeros(heads, 'heads') if use_qkv_bias else None
    self.bk = zeros(kv_heads, 'kv_heads') if use_qkv_bias else None
    self.bv = zeros(kv_heads, 'kv_heads') if use_qkv_bias else None
    self.attention, self.blocks = attention, tuple(blocks)

  def project(self, x_BLD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q_BLHK, k_BLHK, v_BLHK) before rotary: the projections, their biases and QK-norm."""
    dt = x_BLD.dtype
    q, k, v = (jnp.einsum('bld,dhk->blhk', x_BLD, w[...].astype(dt)) for w in (self.wq, self.wk, self.wv))
    if self.bq is not None:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array | None = None,
               cache: tuple[jax.Array, jax.Array] | None = None, segment_ids_BL: jax.Array | None = None):
    """Without a cache: causal attention over the L tokens (training, scoring) -> y_BLD; with
    `segment_ids_BL` only within each segment (document masking).

    With `cache` = (keys_BGTK, values_BGTK) of this layer (prefill and decode steps): the L new
    tokens at `positions_BL` write their keys and values at their positions and attend to every
    cached position <= their own -> (y_BLD, (keys_BGTK, values_BGTK)).
    """
    if cache is not None:
      return self._cached(x_BLD, positions_BL, *cache)
    dt = x_BLD.dtype
    q, k, v = self.project(x_BLD)
    q, k = rotary(q, self.rope_base, positions_BL), rotary(k, self.rope_base, positions_BL)
    o = attention_lib.attend(q, k, v, self.attention, segment_ids_BL, *self.blocks)
    return jnp.einsum('blhk,hkd->bld', o, self.wo[...].astype(dt))

  def _cached(self, x_BLD, positions_BL, keys_BGTK, values_BGTK):
    dt = x_BLD.dtype
    q, k, v = self.project(x_BLD)
    q, k = rotary(q, self.rope_base, positions_BL), rotary(k, self.rope_base, positions_BL)
    rows = jnp.arange(x_BLD.shape[0])[:, None]
    # (advanced indices split by a slice: the indexed block is [B, L, H_kv, K], the layout of k and v)
    keys_BGTK = keys_BGTK.at[rows, :, positions_BL].set(k.astype(keys_BGTK.dtype))
    values_BGTK = values_BGTK.at[rows, :, positions_BL].set(v.astype(values_BGTK.dtype))
    B, L, H, K = q.shape
    Hkv = keys_BGTK.shape[1]
    q_BLGRK = q.reshape(B, L, Hkv, H // Hkv, K)  # query heads grouped over their kv head (GQA)
    scores = jnp.einsum('blgrk,bgtk->bgrlt', q_BLGRK, keys_BGTK.astype(dt)).astype(jnp.float32) / jnp.sqrt(
        jnp.float32(K))
    visible_BLT = jnp.arange(keys_BGTK.shape[2])[None, None, :] <= positions_BL[:, :, None]
    scores = jnp.where(visible_BLT[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    o = jnp.einsum('bgrlt,bgtk->blgrk', probs, values_BGTK.astype(dt)).reshape(B, L, H, K)
    return jnp.einsum('blhk,hkd->bld', o, self.wo[...].astype(dt)), (keys_BGTK, values_BGTK)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, spec: str) -> jax.Array:
  """SwiGLU: (silu(x @ w_gate) * (x @ w_up)) @ w_down, with einsum specs 'in,gate->hidden,down->out'."""
  first, last = spec.split(';')
  h = jax.nn.silu(jnp.einsum(first, x, w_gate)) * jnp.einsum(first, x, w_up)
  return jnp.einsum(last, h, w_down)


class MLP(nnx.Module):
  """Dense SwiGLU feed-forward block."""

  def __init__(self, dim: int, hidden: int, std: float, out_std: float, rngs: nnx.Rngs):
    self.w_gate = param(rngs, (dim, hidden), ('embed', 'mlp'), std)
    self.w_up = param(rngs, (dim, hidden), ('embed', 'mlp'), std)
    self.w_down = param(rngs, (hidden, dim), ('mlp', 'embed'), out_std)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    dt = x_BLD.dtype
    return swiglu(x_BLD, self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt),
                  '...d,df->...f;...f,fd->...d')

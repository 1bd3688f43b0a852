"""KV-cache decoding: prefill a batch of prompts, then one jitted, donated step per token.

The cache is preallocated per attention layer: keys and values [B, T_max, H_kv, K] in the
compute dtype, written at each row's own positions (prompts of different lengths share a
batch). Prefill runs the prompts right-padded to one length and writes every position; a row's
padding is overwritten by its generated tokens before any query can attend to it, because a
query at position p attends to keys at positions <= p only. Rotary embeddings use absolute
positions, so a decoded token gets exactly the rotation the full-sequence forward gives it.

The FFN of each block is the model's own module (dense SwiGLU or `moejax.moe.MoE`, every routed
design): routing is per token, so at decode it sees the B new tokens as a batch of B. It runs
with the evaluation settings (`moe.eval_capacity_factor`); with a capacity factor the routing
of a token would depend on the other tokens of its step, so decoding requires dropless
evaluation (checked).

The reference twin is the full-sequence forward (`Transformer.__call__`): per-position logits
from prefill + decode equal it (tests/decode_test.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.layers import Attention
from moejax.model import Transformer


class Cache(NamedTuple):
  """Keys and values per attention layer, [B, T_max, H_kv, K] each."""
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]


def check_decodable(cfg) -> None:
  """Decoding needs dropless evaluation: a capacity factor makes a token's routing depend on its batch."""
  if cfg.moe.num_experts and cfg.moe.eval_capacity_factor is not None:
    raise ConfigError(f'moe.eval_capacity_factor={cfg.moe.eval_capacity_factor}: decoding needs dropless evaluation '
                      '(a capacity limit would make a token\'s experts depend on the other tokens of its step); '
                      'set it to None')


def init_cache(model: Transformer, batch: int, max_len: int) -> Cache:
  """A zeroed cache for `batch` sequences of at most `max_len` tokens."""
  shapes = []
  for block in model.blocks:
    attn = block.attn
    kv_heads, head_dim = attn.wk.shape[1], attn.wk.shape[2]
    shapes.append((batch, max_len, kv_heads, head_dim))
  zeros = tuple(jnp.zeros(s, model.dtype) for s in shapes)
  return Cache(zeros, tuple(jnp.zeros(s, model.dtype) for s in shapes))


def rotary_at(x_BLHK: jax.Array, positions_BL: jax.Array, base: float) -> jax.Array:
  """Rotary embedding at absolute positions (rotate-half form, float32); equals `layers.rotary` at 0..L-1."""
  K = x_BLHK.shape[-1]
  inv_freq = base ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
  angles_BLK = positions_BL.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(angles_BLK)[:, :, None, :], jnp.cos(angles_BLK)[:, :, None, :]
  x = x_BLHK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLHK.dtype)


def _attention(attn: Attention, x_BLD, keys_BTHK, values_BTHK, positions_BL):
  """Attention of L new tokens at `positions_BL` over the cache; returns (output, keys, values) with theirs written."""
  dt = x_BLD.dtype
  q = jnp.einsum('bld,dhk->blhk', x_BLD, attn.wq[...].astype(dt))
  k = jnp.einsum('bld,dhk->blhk', x_BLD, attn.wk[...].astype(dt))
  if attn.q_norm is not None:
    q, k = attn.q_norm(q), attn.k_norm(k)
  q, k = rotary_at(q, positions_BL, attn.rope_base), rotary_at(k, positions_BL, attn.rope_base)
  v = jnp.einsum('bld,dhk->blhk', x_BLD, attn.wv[...].astype(dt))
  rows = jnp.arange(x_BLD.shape[0])[:, None]
  keys_BTHK = keys_BTHK.at[rows, positions_BL].set(k.astype(keys_BTHK.dtype))
  values_BTHK = values_BTHK.at[rows, positions_BL].set(v.astype(values_BTHK.dtype))
  B, L, H, K = q.shape
  Hkv = keys_BTHK.shape[2]
  q_BLGRK = q.reshape(B, L, Hkv, H // Hkv, K)  # query heads grouped over their kv head (GQA)
  scores = jnp.einsum('blgrk,btgk->bgrlt', q_BLGRK, keys_BTHK.astype(dt)).astype(jnp.float32) / jnp.sqrt(
      jnp.float32(K))
  visible_BLT = jnp.arange(keys_BTHK.shape[1])[None, None, :] <= positions_BL[:, :, None]
  scores = jnp.where(visible_BLT[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  o = jnp.einsum('bgrlt,btgk->blgrk', probs, values_BTHK.astype(dt)).reshape(B, L, H, K)
  return jnp.einsum('blhk,hkd->bld', o, attn.wo[...].astype(dt)), keys_BTHK, values_BTHK


def forward(model: Transformer, tokens_BL: jax.Array, positions_BL: jax.Array, cache: Cache
            ) -> tuple[jax.Array, Cache]:
  """Logits [B, L, V] (float32) of `tokens_BL` at `positions_BL` (prefill: L prompt tokens; decode: L = 1), and the
  cache with their keys and values written."""
  x = model.embed(tokens_BL, model.dtype)
  keys, values = list(cache.keys), list(cache.values)
  for i, block in enumerate(model.blocks):
    y, keys[i], values[i] = _attention(block.attn, block.attn_norm(x), keys[i], values[i], positions_BL)
    x = x + y
    if block.use_moe:
      f, _ = block.ffn(block.ffn_norm(x))
    else:
      f = block.ffn(block.ffn_norm(x))
    x = x + f
  x = model.final_norm(x)
  if model.unembed is None:
    logits = model.embed.attend(x)
  else:
    logits = jnp.einsum('bld,dv->blv', x, model.unembed[...].astype(model.dtype))
  return logits.astype(jnp.float32), Cache(tuple(keys), tuple(values))

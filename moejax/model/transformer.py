"""Decoder-only transformer: embed -> blocks (pre-norm attention + dense or MoE FFN) -> norm -> logits.

One forward pass serves training, scoring, prefill and decode: without a cache `__call__` runs
causal attention over its tokens; with a `Cache` each attention layer writes the new tokens'
keys and values at their positions and reads the cache (moejax.inference.decode drives it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.model import dispatch as dispatch_lib, stack
from moejax.model.layers import MLP, Attention, Embed, RMSNorm, param
from moejax.model.moe import MoE


class Cache(NamedTuple):
  """Keys and values per attention layer, [B, H_kv, T_max, K] each.

  Heads before positions: the attention's batched matmuls (batch dims b, h) then read the cache in
  place; with [B, T, H, K] XLA:CPU transposed the whole cache every step and rewrote it in the
  scatter's loop fusion (docs/inference.md).
  """
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]


class Block(nnx.Module):
  """x + attn(norm(x)), then + ffn(norm(x)); the FFN is dense or MoE by the layer pattern."""

  def __init__(self, model_cfg, moe_cfg, use_moe: bool, rngs: nnx.Rngs):
    m = model_cfg
    std, out_std = m.init_std, m.init_std / math.sqrt(2 * m.num_layers)
    self.attn_norm = RMSNorm(m.model_dim, m.norm_eps)
    self.attn = Attention(m.model_dim, m.num_heads, m.num_kv_heads, config_lib.head_dim(m), m.rope_base,
                          std, out_std, rngs, m.norm_eps if m.use_qk_norm else None, m.qk_norm_scope,
                          m.use_qkv_bias, m.get('attention', 'xla'),
                          (m.get('attention_q_block', 512), m.get('attention_kv_block', 512)))
    self.ffn_norm = RMSNorm(m.model_dim, m.norm_eps)
    if use_moe:
      self.ffn = MoE(m, moe_cfg, std, out_std, rngs)
    else:
      self.ffn = MLP(m.model_dim, m.ffn_hidden, std, out_std, rngs)
    self.use_moe = use_moe

  def __call__(self, x_BLD: jax.Array, train: bool = False, rng: jax.Array | None = None, positions_BL=None,
               kv=None, dispatch: str | None = None, use_ffn: bool = True, segment_ids_BL=None):
    """(x_BLD, aux or None, kv): `kv` is this layer's (keys, values) cache in and out (None without one).
    `segment_ids_BL`: document masking (attention within segments; routing statistics skip segment 0, padding)."""
    if kv is None:
      x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), positions_BL, segment_ids_BL=segment_ids_BL)
    else:
      y_BLD, kv = self.attn(self.attn_norm(x_BLD), positions_BL, kv)
      x_BLD = x_BLD + y_BLD
    if not use_ffn:
      return x_BLD, None, kv
    if self.use_moe:
      valid = None if segment_ids_BL is None else segment_ids_BL > 0
      y_BLD, aux = self.ffn(self.ffn_norm(x_BLD), train, rng, dispatch, valid_BL=valid)
      return x_BLD + y_BLD, aux, kv
    return x_BLD + self.ffn(self.ffn_norm(x_BLD)), None, kv


class Transformer(nnx.Module):
  """The language model. `__call__(tokens_BL, train=False, rng=None) -> (logits_BLV float32, aux)`.

  `train` selects the training capacity factor and router jitter (which draws from `rng`,
  folded with the layer index). aux: 'aux_loss' and 'z_loss' (means over MoE layers; 0 for a
  dense model) and per-MoE-layer stacks of the routing statistics ('expert_counts' [n_moe, E],
  'load_max_over_mean', 'load_cv', 'dead_experts', 'drop_fraction', 'router_entropy', 'bias_abs_mean').

  With `cache` (prefill and decode; evaluation routing): the tokens sit at `positions_BL`, their
  keys and values are written into the cache, and the call returns (logits_BLV, aux, cache) where
  aux['routes'] holds each MoE layer's experts [B*L, k] in layer order. `moe_dispatch` picks each
  MoE layer's dispatch (`dispatch.pick_dispatch`: 'auto', 'model', 'distinct', 'gather');
  use_ffn=False skips every FFN (an ablation for the decode benchmark's time breakdown only).
  `segment_ids_BL` (with `positions_BL` restarting per segment: `attention.document_layout`) is
  document masking: attention stays within a segment, and segment-0 tokens (padding) are left
  out of the routing statistics and losses.
  """

  def __init__(self, model_cfg, moe_cfg, rngs: nnx.Rngs):
    m = model_cfg
    self.embed = Embed(m.vocab_size, m.model_dim, m.init_std, rngs)
    blocks = [Block(m, moe_cfg, config_lib.is_moe_layer(moe_cfg, i), rngs) for i in range(m.num_layers)]
    # Scanned: the parameters stored stacked per period position (stack.stack_blocks), initialized as unrolled.
    self.spans = stack.model_spans(m, moe_cfg)
    self.blocks = nnx.List(stack.stack_blocks(blocks, self.spans) if self.spans else blocks)
    self.final_norm = RMSNorm(m.model_dim, m.norm_eps)
    self.unembed = None if m.use_tied_embeddings else param(rngs, (m.model_dim, m.vocab_size), ('embed', 'vocab'),
                                                            m.init_std)
    self.dtype = jnp.dtype(m.compute_dtype)
    self.remat = m.get('remat', 'none')

  def __call__(self, tokens_BL: jax.Array, train: bool = False, rng: jax.Array | None = None, *,
               positions_BL: jax.Array | None = None, cache: Cache | None = None, moe_dispatch: str = 'model',
               use_ffn: bool = True, segment_ids_BL: jax.Array | None = None):
    x_BLD = self.embed(tokens_BL, self.dtype)
    tokens = tokens_BL.shape[0] * tokens_BL.shape[1]
    if cache is not None and self.spans:
      raise ConfigError('a scanned model (model.scan_layers=True) stores its layers stacked and cannot decode; build '
                        'the model unscanned (moejax.model.stack.unscanned(cfg)): checkpoints are per layer')
    if cache is None and (self.spans or self.remat != 'none'):  # (decode runs the blocks unrolled)
      x_BLD, layer_aux = stack.run(self.blocks, x_BLD, train, rng, positions_BL, self.spans, self.remat, use_ffn,
                                   segment_ids_BL=segment_ids_BL)
      return self.logits(self.final_norm(x_BLD)), _stack_aux(layer_aux)
    layer_aux, keys, values = [], [], []
    for i, block in enumerate(self.blocks):
      kv, dispatch = None, None
      if cache is not None:
        kv = (cache.keys[i], cache.values[i])
        moe_cfg = block.ffn.cfg if block.use_moe else None
        dispatch = moe_cfg and dispatch_lib.pick_dispatch(moe_dispatch, tokens, moe_cfg.experts_per_token,
                                                          moe_cfg.num_experts)
      x_BLD, aux, kv = block(x_BLD, train, None if rng is None else jax.random.fold_in(rng, i), positions_BL, kv,
                             dispatch, use_ffn, segment_ids_BL=segment_ids_BL)
      if aux is not None:
        layer_aux.append(aux)
      if kv is not None:
        keys.append(kv[0])
        values.append(kv[1])
    logits_BLV = self.logits(self.final_norm(x_BLD))
    if cache is None:
      return logits_BLV, _stack_aux(layer_aux)
    return logits_BLV, {'routes': tuple(a['experts_TK'] for a in layer_aux)}, Cache(tuple(keys), tuple(values))

  def logits(self, x_BLD: jax.Array) -> jax.Array:
    """Float32 output logits of the final-normed hidden states (tied or untied unembedding)."""
    if self.unembed is None:
      logits_BLV = self.embed.attend(x_BLD)
    else:
      logits_BLV = jnp.einsum('bld,dv->blv', x_BLD, self.unembed[...].astype(self.dtype))
    return logits_BLV.astype(jnp.float32)

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """A zeroed cache (compute dtype) for `batch` sequences of at most `max_len` tokens."""
    shapes = [(batch, b.attn.wk.shape[1], max_len, b.attn.wk.shape[2]) for b in self.blocks]
    return Cache(tuple(jnp.zeros(s, self.dtype) for s in shapes), tuple(jnp.zeros(s, self.dtype) for s in shapes))


def _stack_aux(layer_aux: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  if not layer_aux:
    zero = jnp.zeros((), jnp.float32)
    return {'aux_loss': zero, 'z_loss': zero}
  stacked = {k: jnp.stack([a[k] for a in layer_aux]) for k in layer_aux[0]}
  stacked['aux_loss_per_layer'] = stacked['aux_loss']
  stacked['z_loss_per_layer'] = stacked['z_loss']
  stacked['aux_loss'] = jnp.mean(stacked['aux_loss'])
  stacked['z_loss'] = jnp.mean(stacked['z_loss'])
  return stacked


def build(cfg, seed: int | None = None) -> Transformer:
  """Instantiates the model of a validated config (float32 params)."""
  return Transformer(cfg.model, cfg.moe, nnx.Rngs(params=cfg.seed if seed is None else seed))


def split(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, buffers): trainable `nnx.Param`s and everything else (the aux-free expert biases)."""
  return nnx.split(model, nnx.Param, ...)

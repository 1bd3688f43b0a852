"""Decoder-only transformer: embed -> blocks (pre-norm attention + dense or MoE FFN) -> norm -> logits."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config as config_lib
from moejax.layers import MLP, Attention, Embed, RMSNorm, param
from moejax.moe import MoE


class Block(nnx.Module):
  """x + attn(norm(x)), then + ffn(norm(x)); the FFN is dense or MoE by the layer pattern."""

  def __init__(self, model_cfg, moe_cfg, use_moe: bool, rngs: nnx.Rngs):
    m = model_cfg
    std, out_std = m.init_std, m.init_std / math.sqrt(2 * m.num_layers)
    self.attn_norm = RMSNorm(m.model_dim, m.norm_eps)
    self.attn = Attention(m.model_dim, m.num_heads, m.num_kv_heads, config_lib.head_dim(m), m.rope_base,
                          std, out_std, rngs, m.norm_eps if m.use_qk_norm else None, m.qk_norm_scope,
                          m.use_qkv_bias)
    self.ffn_norm = RMSNorm(m.model_dim, m.norm_eps)
    if use_moe:
      self.ffn = MoE(m, moe_cfg, std, out_std, rngs)
    else:
      self.ffn = MLP(m.model_dim, m.ffn_hidden, std, out_std, rngs)
    self.use_moe = use_moe

  def __call__(self, x_BLD: jax.Array, train: bool = False, rng: jax.Array | None = None):
    x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD))
    if self.use_moe:
      y_BLD, aux = self.ffn(self.ffn_norm(x_BLD), train, rng)
      return x_BLD + y_BLD, aux
    return x_BLD + self.ffn(self.ffn_norm(x_BLD)), None


class Transformer(nnx.Module):
  """The language model. `__call__(tokens_BL, train=False, rng=None) -> (logits_BLV float32, aux)`.

  `train` selects the training capacity factor and router jitter (which draws from `rng`,
  folded with the layer index). aux: 'aux_loss' and 'z_loss' (means over MoE layers; 0 for a
  dense model) and per-MoE-layer stacks of the routing statistics ('expert_counts' [n_moe, E],
  'load_max_over_mean', 'load_cv', 'dead_experts', 'drop_fraction', 'router_entropy', 'bias_abs_mean').
  """

  def __init__(self, model_cfg, moe_cfg, rngs: nnx.Rngs):
    m = model_cfg
    self.embed = Embed(m.vocab_size, m.model_dim, m.init_std, rngs)
    self.blocks = nnx.List([
        Block(m, moe_cfg, config_lib.is_moe_layer(moe_cfg, i), rngs) for i in range(m.num_layers)])
    self.final_norm = RMSNorm(m.model_dim, m.norm_eps)
    self.unembed = None if m.use_tied_embeddings else param(rngs, (m.model_dim, m.vocab_size), ('embed', 'vocab'),
                                                            m.init_std)
    self.dtype = jnp.dtype(m.compute_dtype)

  def __call__(self, tokens_BL: jax.Array, train: bool = False, rng: jax.Array | None = None):
    x_BLD = self.embed(tokens_BL, self.dtype)
    layer_aux = []
    for i, block in enumerate(self.blocks):
      x_BLD, aux = block(x_BLD, train, None if rng is None else jax.random.fold_in(rng, i))
      if aux is not None:
        layer_aux.append(aux)
    x_BLD = self.final_norm(x_BLD)
    if self.unembed is None:
      logits_BLV = self.embed.attend(x_BLD)
    else:
      logits_BLV = jnp.einsum('bld,dv->blv', x_BLD, self.unembed[...].astype(self.dtype))
    return logits_BLV.astype(jnp.float32), _stack_aux(layer_aux)


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

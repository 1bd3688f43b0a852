"""Gradient accumulation (`train.microbatches`): one optimizer step over k equal microbatches.

The step's [B, L+1] batch becomes k microbatches of B/k consecutive rows (a `jax.lax.scan` inside
the jitted step; each microbatch is split over the batch axes like a whole batch). Every term of
the loss is a mean over tokens, so the mean over equal microbatches is the whole batch's loss, with
one exception made exact here: the global-batch load-balancing loss E * sum_i f_i * P_i, whose
expert fractions f_i come from the whole batch's counts. A forward-only pass over the microbatches
first counts each layer's assignments; the loss of microbatch m is then E * sum_i f_i * P_i(m) with
those global f_i, and the mean over m of P_i(m) is the whole batch's P_i. The pass costs one extra
forward per step (about a third of a step) and runs only with load_balancing='global_batch'.
Micro-batch and sequence-wise losses, z-loss, cross-entropy, capacity groups (which must divide a
microbatch, config.py) and the aux-free bias update (from the summed counts) need nothing extra.
Router jitter draws its noise per microbatch (the key folded with the microbatch index): equal in
distribution to the whole batch's, not in value. tests/scale_train_test.py checks the equality.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moejax import config as config_lib, routing
from moejax.model import moe as moe_lib
from moejax.parallel import mesh as mesh_lib

# Per-layer statistics that are means over tokens: their mean over equal microbatches is exact.
_MEAN_STATS = ('drop_fraction', 'ep_drop_fraction', 'router_entropy', 'bias_abs_mean', 'z_loss_per_layer')


def _microbatches(tokens_BL1: jax.Array, k: int, mesh) -> jax.Array:
  """[k, B/k, L+1]: consecutive rows, each microbatch sharded over the batch axes (a cheap token reshuffle)."""
  B, L1 = tokens_BL1.shape
  tokens_KBL = tokens_BL1.reshape(k, B // k, L1)
  if mesh is not None:
    spec = mesh_lib.batch_sharding(mesh, 2).spec
    tokens_KBL = jax.lax.with_sharding_constraint(tokens_KBL, NamedSharding(mesh, PartitionSpec(None, *spec)))
  return tokens_KBL


def value_and_grad(graphdef: nnx.GraphDef, cfg, state: dict, tokens_BL1: jax.Array, rng: jax.Array,
                   token_nll: Callable, mesh=None, param_shardings=None, model_kwargs: Callable = lambda _: {}):
  """((loss, (ce, aux)), grads) of the whole batch, as `step.make_train_step`'s loss_fn gives them
  (`token_nll`: its per-token cross-entropy; `model_kwargs(inputs_BL)`: extra model arguments of a
  microbatch's inputs, e.g. its document segment ids)."""
  moe_cfg, k = cfg.moe, cfg.train.microbatches
  balance_coef = moe_lib.balance_coefficient(moe_cfg)
  exact_global = moe_cfg.num_experts > 0 and moe_cfg.load_balancing == 'global_batch' and balance_coef > 0
  params, buffers = state['params'], state['buffers']
  tokens_KBL = _microbatches(tokens_BL1, k, mesh)
  model = lambda p, tokens_BL, j: nnx.merge(graphdef, p, buffers)(tokens_BL[:, :-1], train=True,
                                                                   rng=jax.random.fold_in(rng, j),
                                                                   **model_kwargs(tokens_BL[:, :-1]))
  fractions_ME = None
  if exact_global:  # the whole batch's expert fractions f, from a forward-only pass
    def count(total, xs):
      return total + model(params, *xs)[1]['expert_counts'], None
    zero = jnp.zeros((len(config_lib.moe_layers(cfg.model, moe_cfg)), moe_cfg.num_experts), jnp.float32)
    counts_ME, _ = jax.lax.scan(count, zero, (tokens_KBL, jnp.arange(k)))
    T = tokens_BL1.shape[0] * (tokens_BL1.shape[1] - 1)
    fractions_ME = jax.lax.stop_gradient(counts_ME.astype(jnp.float32) / (moe_cfg.experts_per_token * T))

  def loss_fn(p, tokens_BL, j):
    logits_BLV, aux = model(p, tokens_BL, j)
    ce = jnp.mean(token_nll(logits_BLV, tokens_BL[:, 1:]))
    if fractions_ME is not None:
      aux = dict(aux, aux_loss_per_layer=moe_cfg.num_experts * jnp.sum(fractions_ME * aux['balance_scores'], -1))
      aux['aux_loss'] = jnp.mean(aux['aux_loss_per_layer'])
    loss = ce + balance_coef * aux['aux_loss'] + moe_cfg.z_loss_coef * aux['z_loss']
    return loss, (ce, aux)

  def micro(grads, xs):
    (loss, (ce, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, *xs)
    return jax.tree.map(jnp.add, grads, g), (loss, ce, aux)

  zeros = jax.tree.map(jnp.zeros_like, params)
  if param_shardings is not None:  # the accumulator shards like the parameters
    zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
  grads, (loss_K, ce_K, aux_K) = jax.lax.scan(micro, zeros, (tokens_KBL, jnp.arange(k)))
  grads = jax.tree.map(lambda g: g / k, grads)
  return (jnp.mean(loss_K), (jnp.mean(ce_K), _combine(aux_K))), grads


def _combine(aux_K: dict) -> dict:
  """The whole batch's aux from k microbatches' (stacked on axis 0): counts summed, load statistics
  recomputed from them, token means averaged."""
  out = {'aux_loss': jnp.mean(aux_K['aux_loss']), 'z_loss': jnp.mean(aux_K['z_loss'])}
  if 'aux_loss_per_layer' in aux_K:
    out['aux_loss_per_layer'] = jnp.mean(aux_K['aux_loss_per_layer'], axis=0)
  out.update({key: jnp.mean(aux_K[key], axis=0) for key in _MEAN_STATS if key in aux_K})
  if 'expert_counts' in aux_K:
    counts_ME = jnp.sum(aux_K['expert_counts'], axis=0)
    out['expert_counts'] = counts_ME
    out.update(jax.vmap(routing.load_stats)(counts_ME))
  return out

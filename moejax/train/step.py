"""The train step: the loss, one jitted and donated optimizer step, and the cache of compiled steps."""

from __future__ import annotations

import collections
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax import config as config_lib
from moejax.model import attention as attention_lib, moe as moe_lib, stack
from moejax.parallel import mesh as mesh_lib
from moejax.train import accumulate, optim


def token_nll(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in nats (float32)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32), targets_BL)


ROUTING_METRICS = ('expert_counts', 'load_max_over_mean', 'load_cv', 'dead_experts', 'drop_fraction', 'ep_drop_fraction',
                   'router_entropy', 'bias_abs_mean', 'aux_loss_per_layer', 'z_loss_per_layer')


def document_kwargs(inputs_BL: jax.Array, separator: int | None) -> dict[str, jax.Array]:
  """The model's document-masking arguments for packed windows (`data.document_mask`); {} without a separator."""
  if separator is None:
    return {}
  segment_ids_BL, positions_BL = attention_lib.document_layout(inputs_BL, separator)
  return {'segment_ids_BL': segment_ids_BL, 'positions_BL': positions_BL}


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg,
                    state_shardings: Any = None, mesh=None, document_separator: int | None = None) -> Callable:
  """Returns step(state, tokens_BL1, seed, lr) -> (state, metrics); the state buffers are donated.

  `seed` (the run's `cfg.seed`, int32) and `lr` (this step's learning rate, float32) are
  traced scalars, so one compiled step serves every seed, schedule and run length of a
  configuration; see `cached_train_step`. `optimizer` is `optim.make` (unit learning rate). `state_shardings` (from `shardings(state)`)
  pins the new state to the shardings the state came in with. With `mesh`, the step is traced
  under `jax.set_mesh(mesh)` (the MoE layers find the expert axis there) and its metrics are
  replicated, so every process can read them.

  The state is {'params', 'buffers', 'opt_state', 'step'}; only params get gradients. With
  load_balancing='aux_free' the expert biases in 'buffers' move after each step from that
  step's pre-drop expert counts (over the global batch).

  `document_separator` (the tokenizer's separator, with `data.document_mask`): segment ids and
  restarting positions are derived on the device from each window's own tokens.
  """
  moe_cfg = cfg.moe
  balance_coef = moe_lib.balance_coefficient(moe_cfg)

  def loss_fn(params, buffers, tokens_BL1, rng):
    logits_BLV, aux = nnx.merge(graphdef, params, buffers)(
        tokens_BL1[:, :-1], train=True, rng=rng, **document_kwargs(tokens_BL1[:, :-1], document_separator))
    ce = jnp.mean(token_nll(logits_BLV, tokens_BL1[:, 1:]))
    loss = ce + balance_coef * aux['aux_loss'] + moe_cfg.z_loss_coef * aux['z_loss']
    return loss, (ce, aux)

  def step(state, tokens_BL1, seed, lr):
    rng = jax.random.fold_in(jax.random.key(seed), state['step'])
    if cfg.train.get('microbatches', 1) > 1:  # gradient accumulation (moejax/train/accumulate.py)
      (loss, (ce, aux)), grads = accumulate.value_and_grad(
          graphdef, cfg, state, tokens_BL1, rng, token_nll, mesh, state_shardings and state_shardings['params'],
          lambda inputs_BL: document_kwargs(inputs_BL, document_separator))
    else:
      (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state['params'], state['buffers'], tokens_BL1, rng)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    lr = jnp.asarray(lr, jnp.float32)
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    params = optax.apply_updates(state['params'], updates)
    buffers = state['buffers']
    if moe_cfg.load_balancing == 'aux_free' and 'expert_counts' in aux:
      buffers = moe_lib.update_expert_biases(buffers, aux['expert_counts'], moe_cfg.bias_update_rate,
                                             stack.storage_spans(cfg))
    out = {'loss': loss, 'ce': ce, 'aux_loss': aux['aux_loss'], 'z_loss': aux['z_loss'],
           'grad_norm': optax.tree.norm(grads), 'learning_rate': lr}
    out.update({k: aux[k] for k in ROUTING_METRICS if k in aux})
    new_state = {'params': params, 'buffers': buffers, 'opt_state': opt_state, 'step': state['step'] + 1}
    # Keep every leaf on the sharding it came in with, so step n+1 reuses step n's executable
    # and parameters never silently become replicated.
    if state_shardings is not None:
      new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
    if mesh is not None:
      out = jax.lax.with_sharding_constraint(out, mesh_lib.replicated(mesh))
    return new_state, out

  return mesh_lib.under_mesh(jax.jit(step, donate_argnums=0), mesh)


_STEP_CACHE: collections.OrderedDict = collections.OrderedDict()
_STEP_CACHE_SIZE = 8


def step_key(cfg) -> str:
  """The part of a config that determines the compiled train and eval steps, as a hash
  (`config.STEP_NEUTRAL_KEYS` are left out)."""
  return config_lib.config_hash(cfg, config_lib.STEP_NEUTRAL_KEYS, digits=None)


def document_separator(s) -> int | None:
  """The separator that begins documents in `s.corpus` when `data.document_mask` is set, else None."""
  return s.corpus.tokenizer.separator if s.cfg.data.get('document_mask', False) else None


def cached(kind: str, cfg, build: Callable[[], Callable]) -> Callable:
  """`build()` once per (kind, step_key(cfg)); the last few are kept (LRU)."""
  key = (kind, step_key(cfg))
  if key in _STEP_CACHE:
    _STEP_CACHE.move_to_end(key)
    return _STEP_CACHE[key]
  fn = _STEP_CACHE[key] = build()
  while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
    _STEP_CACHE.popitem(last=False)
  return fn


def cached_train_step(s) -> Callable:
  """The jitted train step for `s.cfg`, shared with earlier runs whose step_key is equal."""
  cfg, sep = s.cfg, document_separator(s)  # (the tokenizer is outside step_key: the separator is in the kind)
  return cached('train' if sep is None else f'train-sep{sep}', cfg, lambda: make_train_step(
      s.graphdef, optim.for_run(cfg), cfg, jax.tree.map(lambda x: x.sharding, s.state), s.mesh, sep))

"""Upcycling: a finished dense run's weights start an MoE (`train.init_from`; docs/studies.md, "Upcycling").

Attention, norms, embeddings and dense layers are copied. Each MoE layer's routed expert j
takes slice j mod G of the dense FFN's hidden units, G = F_dense / F_expert (G = 1: every
expert is a full copy; G > 1: granular upcycling, E must be a multiple of G). SwiGLU is a sum
over its hidden units, so FFN(x) = sum_s FFN_s(x) over the G slices. The router starts at zero
(`train.init_from_router_std`=0) or N(0, std^2); copied expert weights are optionally multiplied
by (1 + noise * N(0, 1)) (`train.init_from_noise`, keys from `seed`), which breaks the experts'
symmetry. The first forward equals the dense model's exactly when every slice's selected gates
sum to 1: with a zero router all scores tie, top-k takes experts 0..k-1, so with k a multiple of
G, renormalized gates (softmax with `moe.use_renormalized_gates`, or sigmoid) and
`moe.routed_scaling_factor` = G, each slice is selected k/G times with gate G/k.

The dense run's training FLOPs (its result.json) are recorded in WORKDIR/upcycled.json when
the MoE starts, so the MoE run's result.json reports compute on the same curve as a
from-scratch run: `compute.total_flops` = dense FLOPs + this run's.
"""

from __future__ import annotations

import logging
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from moejax import config as config_lib, files
from moejax.errors import ConfigError
from moejax.model import stack
from moejax.train import restore

log = logging.getLogger(__name__)

RECORD = 'upcycled.json'
# May differ between the dense run and the MoE: initialization, and the program's choices (how the layers run and
# attention is computed), which change no parameter shape.
MODEL_KEYS_FREE = ('init_std', 'compute_dtype', 'allow_padded_vocab', 'scan_layers', 'remat', 'attention',
                   'attention_q_block', 'attention_kv_block')


def granularity(cfg, dense_cfg, source: str) -> int:
  """G = F_dense / F_expert after checking that `dense_cfg` can start `cfg`; one ConfigError line otherwise."""
  where = f'train.init_from={source}'
  if dense_cfg.moe.num_experts:
    raise ConfigError(f'{where} is an MoE run (moe.num_experts={dense_cfg.moe.num_experts}); upcycling starts from a '
                      'dense one')
  for key, value in cfg.model.items():
    if key not in MODEL_KEYS_FREE and dense_cfg.model[key] != value:
      raise ConfigError(f'{where} has model.{key}={dense_cfg.model[key]!r}, this run {value!r}: shapes must match')
  if dense_cfg.data.tokenizer != cfg.data.tokenizer:
    raise ConfigError(f'{where} used data.tokenizer={dense_cfg.data.tokenizer!r}, this run {cfg.data.tokenizer!r}')
  e = cfg.moe
  if len(config_lib.size_classes(cfg.model, e)) > 1 or e.num_shared_experts:
    raise ConfigError(f'{where}: upcycling fills uniform routed experts; heterogeneous and shared experts are not '
                      'supported')
  F, f = cfg.model.ffn_hidden, config_lib.expert_hidden(cfg.model, e)
  if F % f or e.num_experts % (F // f):
    raise ConfigError(f'{where}: moe.expert_hidden={f} must divide the dense model.ffn_hidden={F} into G slices, '
                      f'and moe.num_experts={e.num_experts} must be a multiple of G')
  return F // f


def dense_record(source: str) -> dict:
  """The dense run's compute from its result.json: {'init_from', 'flops', 'tokens', 'loss', 'steps'}."""
  path = os.path.join(source, 'result.json')
  if not os.path.exists(path):
    raise ConfigError(f'train.init_from={source} has no result.json: finish the dense run first')
  r = files.read_json(path, 'dense run result', ConfigError)
  try:
    tokens, per_token = r['train']['tokens'], r['accounting']['flops_per_token']
    return {'init_from': os.path.abspath(source), 'tokens': tokens, 'steps': r['train']['steps'],
            'flops': tokens * per_token, 'loss': r['eval']['loss'], 'config_name': r.get('name')}
  except (KeyError, TypeError):
    raise ConfigError(f'{path} lacks train.tokens, accounting.flops_per_token or eval.loss') from None


def _dense_params(cfg, source: str):
  """(dense config, its latest checkpoint's params as numpy), restored onto this run's mesh and batch."""
  from moejax.train import state as state_lib  # pylint: disable=import-outside-toplevel  (state imports the step)
  dense_cfg = restore.load_config(source)
  G = granularity(cfg, dense_cfg, source)
  placed = config_lib.apply_overrides(dense_cfg, {**{f'mesh.{k}': v for k, v in cfg.mesh.items()},
                                                  'train.batch_size': cfg.train.batch_size,
                                                  'eval.batch_size': cfg.eval.batch_size})
  _, abstract = state_lib.abstract_state(stack.unscanned(placed))
  _, state = restore.restore_state(types.SimpleNamespace(state=abstract), source)
  return G, jax.tree.map(np.asarray, jax.device_get(state['params']))


def upcycle_params(params: dict, dense: dict, cfg, G: int, key: jax.Array) -> dict:
  """The MoE parameter tree `params` (pure dict) filled from the dense tree `dense` (see the module docstring)."""
  flat, dense_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(dense)
  out = {}
  for path, value in flat.items():
    if path in dense_flat and not _is_moe(path, cfg):
      if dense_flat[path].shape != value.shape:
        raise ConfigError(f'upcycling: {"/".join(map(str, path))} is {dense_flat[path].shape} in the dense run, '
                          f'{value.shape} here')
      out[path] = np.asarray(dense_flat[path], value.dtype)
      continue
    block, name = path[1], path[-1]
    layer_key = jax.random.fold_in(key, int(block))
    if name == 'w_router':
      std = cfg.train.init_from_router_std
      out[path] = np.asarray(std * jax.random.normal(layer_key, value.shape, jnp.float32), value.dtype)
      continue
    if path[-3] != 'experts':
      raise ConfigError(f'upcycling: no dense source for parameter {"/".join(map(str, path))}')
    w = np.asarray(dense['blocks'][block]['ffn'][name])  # [D, F] or [F, D]
    E, f = value.shape[0], cfg.model.ffn_hidden // G
    slices = [(e % G) * f for e in range(E)]
    copies = np.stack([w[:, s:s + f] if name != 'w_down' else w[s:s + f, :] for s in slices])
    noise = cfg.train.init_from_noise
    if noise:
      copies = copies * (1 + noise * np.asarray(jax.random.normal(jax.random.fold_in(layer_key, _WEIGHT_IDS[name]),
                                                                  copies.shape, jnp.float32)))
    out[path] = copies.astype(value.dtype)
  return traverse_util.unflatten_dict(out)


_WEIGHT_IDS = {'w_gate': 1, 'w_up': 2, 'w_down': 3}


def _is_moe(path: tuple, cfg) -> bool:
  return path[0] == 'blocks' and path[2] == 'ffn' and config_lib.is_moe_layer(cfg.moe, int(path[1]))


def initialize(cfg, state: dict, workdir: str) -> dict:
  """The train state with its params upcycled from `cfg.train.init_from`; writes WORKDIR/upcycled.json."""
  source = cfg.train.init_from
  prior = dense_record(source)
  G, dense = _dense_params(cfg, source)
  shardings = jax.tree.map(lambda x: x.sharding, state['params'])
  spans = stack.storage_spans(cfg)  # (upcycled per layer, stored as the run stores them)
  host = stack.to_layers(jax.tree.map(np.asarray, jax.device_get(state['params'])), spans)
  new = stack.to_stacked(upcycle_params(host, dense, cfg, G, jax.random.fold_in(jax.random.key(cfg.seed), 0x0C7C1E)),
                         spans)
  log.info('upcycled from %s (G=%d, %d experts, router std %g, noise %g); its training: %.3g FLOPs', source, G,
           cfg.moe.num_experts, cfg.train.init_from_router_std, cfg.train.init_from_noise, prior['flops'])
  from moejax.parallel import distributed  # pylint: disable=import-outside-toplevel
  if distributed.is_leader():
    files.atomic_write_json(os.path.join(workdir, RECORD), dict(prior, granularity=G))
  return dict(state, params=jax.device_put(new, shardings))


def read_record(workdir: str | None) -> dict | None:
  """WORKDIR/upcycled.json (the dense run's compute), or None for a run that did not upcycle."""
  path = os.path.join(workdir, RECORD) if workdir else None
  return files.read_json(path, 'upcycling record', ConfigError) if path and os.path.exists(path) else None

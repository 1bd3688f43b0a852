"""Held-out scoring.

Loss is the token-weighted mean cross-entropy in nats per target token over the whole
fixed held-out stream (every held-out token is a target exactly once; document
separators count as targets). Bits per byte = total nats / ln 2 / (UTF-8 bytes of the
scored held-out text, decoded with the run's tokenizer: `data.scored_bytes`), so separator
costs are charged to the bytes and the number is comparable across tokenizers.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import data, routing
from moejax.model import accounting
from moejax.parallel import mesh as mesh_lib
from moejax.train.state import Setup
from moejax.train.step import cached, document_kwargs, document_separator, token_nll


EVAL_ROUTING = ('expert_counts', 'drop_fraction', 'router_entropy', 'ep_drop_fraction')


def make_eval_step(graphdef: nnx.GraphDef, mesh=None, document_separator: int | None = None):
  """step(params, buffers, batch) -> ((weighted nats, weights), routing stats).

  With `mesh`: traced under it (see `train.make_train_step`), outputs replicated. With
  `document_separator` (document masking) the windows are masked as in training, and the
  weight-0 tokens (the padded tail) get segment 0: left out of the routing statistics.
  """

  def step(params, buffers, batch):
    kwargs = document_kwargs(batch['inputs'], document_separator)
    if kwargs:
      kwargs['segment_ids_BL'] = jnp.where(batch['weights'] > 0, kwargs['segment_ids_BL'], 0)
    logits_BLV, aux = nnx.merge(graphdef, params, buffers)(batch['inputs'], **kwargs)  # train=False: eval capacity
    nll_BL = token_nll(logits_BLV, batch['targets'])
    w_BL = batch['weights']
    sums = (jnp.sum(nll_BL * w_BL), jnp.sum(w_BL))
    out = sums, {k: aux[k] for k in EVAL_ROUTING if k in aux}
    return out if mesh is None else jax.lax.with_sharding_constraint(out, mesh_lib.replicated(mesh))

  return mesh_lib.under_mesh(jax.jit(step), mesh)


def evaluate(s: Setup, state: dict | None = None) -> dict[str, Any]:
  """Scores the held-out split of `s.corpus` with `state` (default: the setup's train state).

  Also returns per-MoE-layer routing diagnostics on the held-out tokens (padded tail rows included,
  unless `data.document_mask` is set).
  """
  state = s.state if state is None else state
  sep = document_separator(s)
  step = cached('eval' if sep is None else f'eval-sep{sep}', s.cfg, lambda: make_eval_step(s.graphdef, s.mesh, sep))
  nats, tokens = 0.0, 0.0
  routing_sums, batches = {}, 0
  sharding = mesh_lib.batch_sharding(s.mesh, 2)
  B = s.cfg.eval.batch_size
  start, stop = mesh_lib.process_rows(sharding, B)  # every process builds the same batches, feeds its rows
  for batch in data.heldout_batches(s.corpus, s.cfg.data.seq_len, B, s.cfg.eval.max_batches):
    local = {k: mesh_lib.global_batch(v[start:stop], sharding, B) for k, v in batch.items()}
    sums, stats = jax.device_get(step(state['params'], state['buffers'], local))
    nats, tokens = nats + float(sums[0]), tokens + float(sums[1])
    for key, value in stats.items():  # accumulate on the host in float64
      routing_sums[key] = routing_sums.get(key, 0.0) + np.asarray(value, np.float64)
    batches += 1
  scored = _scored_bytes(s.corpus, s.cfg.data.seq_len, B, s.cfg.eval.max_batches)
  result = {'loss': nats / tokens, 'bits_per_byte': nats / math.log(2) / max(scored, 1), 'tokens': int(tokens),
            'bytes': scored}
  if routing_sums:
    result['routing'] = routing_summary(s.cfg, routing_sums, batches)
  return result


_SCORED_BYTES: dict = {}


def _scored_bytes(corpus, seq_len: int, batch_size: int, max_batches) -> int:
  """`data.scored_bytes`, once per corpus and eval shape (periodic evals reuse it)."""
  key = (corpus.fingerprint, corpus.name, seq_len, batch_size, max_batches)
  if key not in _SCORED_BYTES:
    _SCORED_BYTES[key] = data.scored_bytes(corpus, seq_len, batch_size, max_batches)
  return _SCORED_BYTES[key]


def routing_summary(cfg, sums: dict[str, np.ndarray], batches: int) -> dict[str, Any]:
  """Per-layer load statistics of the held-out pass and the measured active parameters."""
  counts = sums['expert_counts']  # [n_moe, E], summed over batches
  layers = []
  for i, row in enumerate(counts):
    stats = {k: float(v) for k, v in routing.load_stats(row).items()}
    layers.append({'tokens_per_expert': row.tolist(), **stats, 'dead_experts': int(stats['dead_experts']),
                   'drop_fraction': float(sums['drop_fraction'][i] / batches),
                   **({'ep_drop_fraction': float(sums['ep_drop_fraction'][i] / batches)}
                      if 'ep_drop_fraction' in sums else {}),
                   'router_entropy': float(sums['router_entropy'][i] / batches)})
  return {'layers': layers, **accounting.measured_active(cfg, counts.tolist())}

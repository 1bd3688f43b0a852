"""Held-out scoring and the per-run result record (`WORKDIR/result.json`).

Loss is the token-weighted mean cross-entropy in nats per target token over the whole
fixed held-out stream (every held-out token is a target exactly once; document
separators count as targets). Bits per byte = total nats / ln 2 / (number of byte
targets), so separator costs are charged to the bytes. Evaluation is always dropless.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import checkpoint, data, mesh as mesh_lib, metrics as metrics_lib
from moejax.errors import CheckpointError
from moejax.train import Setup, token_nll


def make_eval_step(graphdef: nnx.GraphDef):
  """Returns step(params, batch) -> (sum of weighted nats, sum of weights, weighted byte targets)."""

  @jax.jit
  def step(params, batch):
    logits_BLV, _ = nnx.merge(graphdef, params)(batch['inputs'])
    nll_BL = token_nll(logits_BLV, batch['targets'])
    w_BL = batch['weights']
    is_byte = (batch['targets'] < data.SEPARATOR).astype(jnp.float32)
    return jnp.sum(nll_BL * w_BL), jnp.sum(w_BL), jnp.sum(w_BL * is_byte)

  return step


def evaluate(s: Setup, params: Any | None = None) -> dict[str, float]:
  """Scores the held-out split of `s.corpus` with `params` (default: the setup's train state)."""
  params = s.state['params'] if params is None else params
  step = make_eval_step(s.graphdef)
  nats, tokens, byte_tokens = 0.0, 0.0, 0.0
  sharding = mesh_lib.batch_sharding(s.mesh, 2)
  for batch in data.heldout_batches(s.corpus, s.cfg.data.seq_len, s.cfg.eval.batch_size, s.cfg.eval.max_batches):
    out = step(params, jax.device_put(batch, sharding))
    a, b, c = (float(x) for x in jax.device_get(out))  # accumulate on the host in float64
    nats, tokens, byte_tokens = nats + a, tokens + b, byte_tokens + c
  return {'loss': nats / tokens, 'bits_per_byte': nats / math.log(2) / max(byte_tokens, 1.0),
          'tokens': int(tokens)}


def restore_params(s: Setup, workdir: str) -> tuple[int, Any]:
  """(step, params) of the latest checkpoint in `workdir`."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), use_async=False)
  try:
    restored = ckpt.restore_latest(checkpoint.abstract(s.state))
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f'no checkpoint in {workdir}/checkpoints to evaluate')
  step, state, _ = restored
  return step, state['params']


def git_revision() -> str | None:
  """The moejax source tree's git revision, or None outside a git checkout."""
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def result_record(s: Setup, eval_metrics: dict, train_summary: dict) -> dict:
  """The result.json record of one run."""
  return metrics_lib.to_jsonable({
      'name': s.cfg.name,
      'config': json.loads(s.cfg.to_json_best_effort()),
      'accounting': s.accounting,
      'data': s.corpus.metadata(),
      'eval': eval_metrics,
      'train': {k: v for k, v in train_summary.items() if k in ('steps', 'tokens', 'wall_s')},
      'git': git_revision(),
      'platform': {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
                   'device_count': jax.device_count(), 'jax': jax.__version__, 'numpy': np.__version__},
  })


def write_result(workdir: str, record: dict) -> str:
  """Writes WORKDIR/result.json atomically; returns its path."""
  path = os.path.join(workdir, 'result.json')
  metrics_lib.atomic_write(path, json.dumps(record, indent=2, sort_keys=True) + '\n')
  return path

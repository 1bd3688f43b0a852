"""Held-out scoring and the per-run result record (`WORKDIR/result.json`).

Loss is the token-weighted mean cross-entropy in nats per target token over the whole
fixed held-out stream (every held-out token is a target exactly once; document
separators count as targets). Bits per byte = total nats / ln 2 / (UTF-8 bytes of the
scored held-out text, decoded with the run's tokenizer: `data.scored_bytes`), so separator
costs are charged to the bytes and the number is comparable across tokenizers.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import files
from moejax import accounting, checkpoint, data, distributed, mesh as mesh_lib, metrics as metrics_lib, routing
from moejax.errors import CheckpointError, DataError
from moejax.train import Setup, cached, token_nll


EVAL_ROUTING = ('expert_counts', 'drop_fraction', 'router_entropy', 'ep_drop_fraction')
IMPORT_RECORD = 'imported.json'  # written by moejax.import_hf: where the weights came from, and the corpus given


def make_eval_step(graphdef: nnx.GraphDef, mesh=None):
  """step(params, buffers, batch) -> ((weighted nats, weights), routing stats).

  With `mesh`: traced under it (see `train.make_train_step`), outputs replicated.
  """

  def step(params, buffers, batch):
    logits_BLV, aux = nnx.merge(graphdef, params, buffers)(batch['inputs'])  # train=False: eval capacity
    nll_BL = token_nll(logits_BLV, batch['targets'])
    w_BL = batch['weights']
    sums = (jnp.sum(nll_BL * w_BL), jnp.sum(w_BL))
    out = sums, {k: aux[k] for k in EVAL_ROUTING if k in aux}
    return out if mesh is None else jax.lax.with_sharding_constraint(out, mesh_lib.replicated(mesh))

  return mesh_lib.under_mesh(jax.jit(step), mesh)


def evaluate(s: Setup, state: dict | None = None) -> dict[str, Any]:
  """Scores the held-out split of `s.corpus` with `state` (default: the setup's train state).

  Also returns per-MoE-layer routing diagnostics on the held-out tokens (padded tail rows included).
  """
  state = s.state if state is None else state
  step = cached('eval', s.cfg, lambda: make_eval_step(s.graphdef, s.mesh))
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


def restore_state(s: Setup, workdir: str) -> tuple[int, dict]:
  """(step, state) of the latest checkpoint in `workdir`."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), use_async=False)
  try:
    restored = ckpt.restore_latest(checkpoint.abstract(s.state), move_aside=False)
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f'no checkpoint in {workdir}/checkpoints to evaluate')
  _check_finite_params(restored[1]['params'], restored[0], workdir)
  return restored[0], restored[1]


@jax.jit
def _finite_leaves(tree):
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def _check_finite_params(params, step: int, workdir: str) -> None:
  """A CheckpointError naming the first parameter that holds NaN or inf (scores and samples of it are garbage)."""
  finite = jax.device_get(_finite_leaves(params))
  bad = [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_leaves_with_path(finite) if not ok]
  if bad:
    raise CheckpointError(f'checkpoint step {step} in {workdir} holds non-finite (NaN or inf) parameters '
                          f'({len(bad)} tensors, first {bad[0]}); refusing to use it')


def check_corpus_given(cfg, workdir: str) -> None:
  """Refuses a workdir imported without a corpus while data.source is still the import's placeholder."""
  path = os.path.join(workdir, IMPORT_RECORD)
  if not os.path.exists(path):
    return
  record = files.read_json(path, 'import record', CheckpointError)
  if record.get('corpus') is None and cfg.data.source == record.get('placeholder_source'):
    raise DataError(f'{workdir} was imported from {record.get("source")} without a corpus: give one with '
                    '--config.data.source=SOURCE --allow_config_change (or import with --data_source=SOURCE)')


def git_revision() -> str | None:
  """The moejax source tree's git revision, or None outside a git checkout."""
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def learning_curve(workdir: str | None, prefix: str = 'eval_') -> list[dict]:
  """[{'step', 'tokens', 'loss', 'bits_per_byte'}] of held-out scores in WORKDIR/metrics.jsonl.

  prefix 'eval_': the periodic scores of the main run (`eval.every_steps`); 'branch_eval_':
  the decay branches (`optim.decay_branches`), at the step each branch ends.
  """
  path = os.path.join(workdir, 'metrics.jsonl') if workdir else None
  if not path or not os.path.exists(path):
    return []
  curve = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # a line cut by a crash mid-write
      if prefix + 'loss' in row:  # a resumed run may repeat a step: the last score wins
        curve[row['step']] = {'step': row['step'], 'tokens': row.get('tokens'), 'loss': row[prefix + 'loss'],
                              'bits_per_byte': row.get(prefix + 'bits_per_byte')}
  return [curve[k] for k in sorted(curve)]


def decay_curve(cfg, eval_metrics: dict, train_summary: dict, workdir: str | None) -> list[dict]:
  """Loss versus run length of a WSD run: its decay branches, then the finished run itself; [] otherwise."""
  if cfg.optim.schedule != 'wsd' or train_summary.get('steps') != cfg.train.steps:
    return []
  final = {'step': cfg.train.steps, 'tokens': train_summary.get('tokens'), 'loss': eval_metrics['loss'],
           'bits_per_byte': eval_metrics['bits_per_byte']}
  return [p for p in learning_curve(workdir, 'branch_eval_') if p['step'] < cfg.train.steps] + [final]


def result_record(s: Setup, eval_metrics: dict, train_summary: dict, config_changes: list | None = None,
                  workdir: str | None = None) -> dict:
  """The result.json record of one run (with the workdir's deliberate config changes and learning curve)."""
  return metrics_lib.to_jsonable({
      'config_changes': config_changes or [],
      'eval_curve': learning_curve(workdir),
      'decay_curve': decay_curve(s.cfg, eval_metrics, train_summary, workdir),
      'name': s.cfg.name,
      'config': json.loads(s.cfg.to_json_best_effort()),
      'accounting': s.accounting,
      'data': s.corpus.metadata(),
      'eval': {k: v for k, v in eval_metrics.items() if k != 'routing'},
      'routing': eval_metrics.get('routing'),
      'train': {k: v for k, v in train_summary.items() if k in ('steps', 'tokens', 'wall_s')},
      'git': git_revision(),
      'platform': {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
                   'device_count': jax.device_count(), 'jax': jax.__version__, 'numpy': np.__version__,
                   'python': platform.python_version(), 'host_cpu': host_cpu()},
  })


def host_cpu() -> str | None:
  """The host CPU model: XLA:CPU compiles for the host's instruction set, so float results follow it."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


def write_result(workdir: str, record: dict) -> str:
  """Writes WORKDIR/result.json atomically (the leader process only); returns its path."""
  path = os.path.join(workdir, 'result.json')
  if distributed.is_leader():
    files.atomic_write(path, json.dumps(record, indent=2, sort_keys=True) + '\n')
  return path

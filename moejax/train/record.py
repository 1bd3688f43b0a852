"""The per-run result record (`WORKDIR/result.json`): scores, accounting, curves and provenance."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

from moejax import files
from moejax.parallel import distributed
from moejax.train import metrics as metrics_lib
from moejax.train.state import Setup


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
      'train': {k: v for k, v in train_summary.items() if k in ('steps', 'tokens', 'wall_s', 'routing')},
      **compute(s.accounting, train_summary, workdir),
      'git': git_revision(),
      'platform': {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
                   'device_count': jax.device_count(), 'jax': jax.__version__, 'numpy': np.__version__,
                   'python': platform.python_version(), 'host_cpu': host_cpu()},
  })


def compute(acc: dict, train_summary: dict, workdir: str | None) -> dict:
  """{'compute': this run's training FLOPs, an upcycled run's dense FLOPs and their sum; 'upcycled_from'}."""
  from moejax.train import upcycle  # pylint: disable=import-outside-toplevel
  prior = upcycle.read_record(workdir)
  train_flops = (train_summary.get('tokens') or 0) * acc['flops_per_token']
  init_flops = prior['flops'] if prior else 0
  out = {'compute': {'train_flops': train_flops, 'init_from_flops': init_flops, 'total_flops': train_flops + init_flops}}
  return dict(out, upcycled_from=prior) if prior else out


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


# Training-time routing statistics summarised in result.json: per MoE layer, the mean over the last
# 10% of the run's steps (`train.routing`); their trajectory is in metrics.jsonl and TensorBoard.
TRAIN_ROUTING = ('drop_fraction', 'ep_drop_fraction', 'load_max_over_mean', 'load_cv', 'dead_experts',
                 'router_entropy')


class RoutingWindow:
  """Sums the train step's per-layer routing statistics over steps (start, steps] on the device (no host
  wait per step); `state()`/`restore()` carry the partial sums through a checkpoint's JSON record."""

  def __init__(self, steps: int):
    self.start, self.end = steps - max(1, math.ceil(steps / 10)), steps
    self.sums: dict = {}
    self.count = 0

  def add(self, step: int, out: dict) -> None:
    if self.start < step <= self.end:
      for key in TRAIN_ROUTING:
        if key in out:
          self.sums[key] = self.sums.get(key, 0.0) + out[key]
      self.count += 1

  def state(self) -> dict:
    return {'count': self.count, 'sums': metrics_lib.to_jsonable(jax.device_get(self.sums))}

  def restore(self, state: dict | None) -> None:
    if state:
      self.count, self.sums = state['count'], {k: jnp.asarray(v, jnp.float32) for k, v in state['sums'].items()}

  def summary(self) -> dict | None:
    """{'window': [first, last step], 'steps', 'layers': [{stat: mean}], 'mean': {stat: mean over layers}}."""
    if not self.count or not self.sums:
      return None
    means = {k: np.asarray(jax.device_get(v), np.float64) / self.count for k, v in self.sums.items()}
    layers = [{k: float(v[i]) for k, v in means.items()} for i in range(len(next(iter(means.values()))))]
    return {'window': [self.start + 1, self.end], 'steps': self.count, 'layers': layers,
            'mean': {k: float(np.mean(v)) for k, v in means.items()}}

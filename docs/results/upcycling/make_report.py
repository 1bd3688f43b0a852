"""Rebuilds report.md and loss_vs_total_flops.png here from the runs' records: python docs/results/upcycling/make_report.py

Each run's result.json and metrics.jsonl sit in a folder of this directory (dense, upcycled_sS, scratch_sS),
copied from the workdirs of experiments/upcycling_tiny.py.
"""

import json
import os
import statistics

from moejax import files

HERE = os.path.dirname(os.path.abspath(__file__))


def runs() -> list[dict]:
  """One row per run: kind, seed, held-out loss, FLOPs (this run, the dense run's, total) and the train curve."""
  rows = []
  for name in sorted(os.listdir(HERE)):
    path = os.path.join(HERE, name, 'result.json')
    if not os.path.exists(path):
      continue
    r = files.read_json(path, 'result')
    per_token, prior = r['accounting']['flops_per_token'], r['compute']['init_from_flops']
    tokens_per_step = r['config']['train']['batch_size'] * r['config']['data']['seq_len']
    curve = []
    with open(os.path.join(HERE, name, 'metrics.jsonl')) as f:
      for line in f:
        m = json.loads(line)
        if 'loss' in m:
          curve.append((prior + m['step'] * tokens_per_step * per_token, m['ce']))
    rows.append({'run': name, 'kind': name.split('_')[0], 'seed': r['config']['seed'], 'steps': r['train']['steps'],
                 'loss': r['eval']['loss'], 'train_flops': r['compute']['train_flops'], 'init_from_flops': prior,
                 'total_flops': r['compute']['total_flops'], 'wall_s': r['train']['wall_s'], 'curve': curve})
  return rows


def summary(rows: list[dict]) -> list[dict]:
  """Per kind: mean held-out loss over seeds, its spread, and the mean total FLOPs."""
  out = []
  for kind in ('dense', 'upcycled', 'scratch'):
    group = [r for r in rows if r['kind'] == kind]
    if group:
      losses = [r['loss'] for r in group]
      out.append({'kind': kind, 'n': len(group), 'loss': statistics.mean(losses),
                  'spread': (max(losses) - min(losses)) if len(losses) > 1 else None,
                  'total_flops': statistics.mean(r['total_flops'] for r in group)})
  return out


def _spread(value) -> str:
  return '-' if value is None else f'{value:.4f}'


def render(rows: list[dict], means: list[dict]) -> str:
  lines = ['# Upcycling vs from scratch at matched total FLOPs (tiny, CPU)', '',
           'Runs of `experiments/upcycling_tiny.py` (its docstring holds the question and commands); the numbers '
           'come from the result.json files beside this report. Held-out loss in nats/token.', '',
           '| run | seed | steps | held-out loss | train FLOPs | dense FLOPs | total FLOPs | wall s |', '|' + '---|' * 8]
  lines += [f"| {r['run']} | {r['seed']} | {r['steps']} | {r['loss']:.4f} | {r['train_flops']:.3e} | "
            f"{r['init_from_flops']:.3e} | {r['total_flops']:.3e} | {r['wall_s']:.0f} |" for r in rows]
  lines += ['', '| kind | seeds | mean loss | max - min | mean total FLOPs |', '|---|---|---|---|---|']
  lines += [f"| {m['kind']} | {m['n']} | {m['loss']:.4f} | {_spread(m['spread'])} | {m['total_flops']:.3e} |"
            for m in means]
  by_kind = {m['kind']: m for m in means}
  if 'upcycled' in by_kind and 'scratch' in by_kind:
    gap = by_kind['upcycled']['loss'] - by_kind['scratch']['loss']
    lines += ['', f"Upcycled minus scratch at matched total FLOPs: {gap:+.4f} nats/token (mean of "
              f"{by_kind['upcycled']['n']} and {by_kind['scratch']['n']} seeds). With two seeds and a seed spread of "
              'this size no difference is claimed; the example shows the bookkeeping (compute.total_flops), not a '
              'verdict. Training points are single-batch losses logged every 50 steps (noisy).']
  lines += ['', '![training loss vs total FLOPs](loss_vs_total_flops.png)', '']
  return '\n'.join(lines)


def figure(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = {'dense': 'k', 'upcycled': 'C1', 'scratch': 'C0'}
  for r in rows:
    ax.plot(*zip(*r['curve']), color=colors[r['kind']], marker='.', label=f"{r['run']} (held-out {r['loss']:.3f})")
  ax.set_xlabel('total training FLOPs (an upcycled run includes its dense run)')
  ax.set_ylabel('training cross-entropy (nats/token)')
  ax.set_ylim(top=3.5)
  ax.legend(fontsize=7)
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png', dpi=120)


if __name__ == '__main__':
  gathered = runs()
  figure(gathered, os.path.join(HERE, 'loss_vs_total_flops.png'))
  files.atomic_write(os.path.join(HERE, 'report.md'), render(gathered, summary(gathered)))

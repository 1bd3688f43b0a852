"""Rebuilds report.md and loss_vs_tokens.png here from the runs' records: python docs/results/expert_choice/make_report.py

Each run's result.json and metrics.jsonl sit in a folder of this directory (tc_sS token choice, ec_sS expert
choice), copied from the workdirs of experiments/expert_choice_tiny.py.
"""

import json
import math
import os
import statistics

from moejax import files
from moejax.studies.statistics import MIN_DOF, t_quantile

HERE = os.path.dirname(os.path.abspath(__file__))
ROUTINGS = ('token_choice', 'expert_choice')
LEVEL = 0.95


def _layer_mean(values) -> float:
  return statistics.mean(float(v) for v in values)


def read_run(folder: str) -> dict:
  """One row of a run folder: routing, seed, held-out loss, compute, unserved tokens and both curves."""
  r = files.read_json(os.path.join(folder, 'result.json'), 'result')
  per_token = r['accounting']['flops_per_token']
  train_curve, last_unserved = [], None
  with open(os.path.join(folder, 'metrics.jsonl')) as f:
    for line in f:
      m = json.loads(line)
      if 'ce' in m:
        train_curve.append((m['step'], m['ce']))
        last_unserved = _layer_mean(m['drop_fraction'])
  tokens_per_step = r['train']['tokens'] / r['train']['steps']
  heldout = [(c['tokens'], c['loss']) for c in r['eval_curve']] + [(r['train']['tokens'], r['eval']['loss'])]
  return {'run': os.path.basename(folder), 'routing': r['config']['moe']['routing'], 'seed': r['config']['seed'],
          'data_seed': r['config']['data']['seed'], 'steps': r['train']['steps'], 'loss': r['eval']['loss'],
          'flops_per_token': per_token, 'total_flops': r['compute']['total_flops'], 'wall_s': r['train']['wall_s'],
          'unserved_heldout': _layer_mean(layer['drop_fraction'] for layer in r['routing']['layers']),
          'unserved_train': last_unserved, 'heldout_curve': heldout,
          'train_curve': [(step * tokens_per_step, ce) for step, ce in train_curve],
          'eval_batch_size': r['config']['eval']['batch_size'], 'seq_len': r['config']['data']['seq_len'],
          'heldout_tokens': r['eval']['tokens']}


def runs(root: str = HERE) -> list[dict]:
  """Every run folder of `root` (one with a result.json), in routing then seed order."""
  rows = [read_run(os.path.join(root, name)) for name in sorted(os.listdir(root))
          if os.path.exists(os.path.join(root, name, 'result.json'))]
  return sorted(rows, key=lambda r: (ROUTINGS.index(r['routing']), r['seed']))


def summary(rows: list[dict]) -> list[dict]:
  """Per routing: seeds, mean held-out loss, its sample standard deviation, mean FLOPs, wall time and unserved share."""
  out = []
  for routing in ROUTINGS:
    group = [r for r in rows if r['routing'] == routing]
    if group:
      losses = [r['loss'] for r in group]
      out.append({'routing': routing, 'n': len(group), 'loss': statistics.mean(losses),
                  'sd': statistics.stdev(losses) if len(losses) > 1 else None,
                  'flops_per_token': statistics.mean(r['flops_per_token'] for r in group),
                  'total_flops': statistics.mean(r['total_flops'] for r in group),
                  'wall_s': statistics.mean(r['wall_s'] for r in group),
                  'unserved_heldout': statistics.mean(r['unserved_heldout'] for r in group)})
  return out


def paired_difference(rows: list[dict], a: str = 'expert_choice', b: str = 'token_choice',
                      level: float = LEVEL) -> dict | None:
  """Held-out loss of `a` minus `b`, paired by seed (a seed sets initialization and data order), with its t interval.

  The mean of the per-seed differences d_s over n shared seeds, +- t((1 + level) / 2, n - 1) * sd(d) / sqrt(n);
  None with fewer than two shared seeds. `resolved` is whether the interval excludes 0.
  """
  by = {routing: {r['seed']: r['loss'] for r in rows if r['routing'] == routing} for routing in (a, b)}
  seeds = sorted(set(by[a]) & set(by[b]))
  if len(seeds) < 2:
    return None
  diffs = [by[a][s] - by[b][s] for s in seeds]
  mean, sd, dof = statistics.mean(diffs), statistics.stdev(diffs), len(seeds) - 1
  half = t_quantile((1 + level) / 2, dof) * sd / math.sqrt(len(seeds))
  return {'a': a, 'b': b, 'seeds': seeds, 'diffs': diffs, 'mean': mean, 'sd': sd, 'dof': dof, 'level': level,
          'half_width': half, 'low': mean - half, 'high': mean + half, 'resolved': not mean - half <= 0 <= mean + half}


def _opt(value, fmt: str) -> str:
  return '-' if value is None else format(value, fmt)


def _verdict(d: dict | None) -> list[str]:
  if d is None:
    return ['Fewer than two seeds are shared by both routings: no paired interval.']
  per_seed = ', '.join(f's{s}: {x:+.4f}' for s, x in zip(d['seeds'], d['diffs']))
  lines = [f"Expert choice minus token choice, paired by seed ({per_seed}): mean {d['mean']:+.4f} nats/token, "
           f"{d['level']:.0%} t interval [{d['low']:+.4f}, {d['high']:+.4f}] (sd of the differences {d['sd']:.4f}, "
           f"{d['dof']} degrees of freedom, t = {t_quantile((1 + d['level']) / 2, d['dof']):.2f})."]
  seeds, rule = len(d['seeds']), 'MIN_DOF in moejax/studies/statistics.py'
  if d['resolved']:
    text = (f"The interval excludes 0: at this scale and these settings the difference is resolved "
            f"({'expert' if d['mean'] < 0 else 'token'} choice lower), for these {seeds} seeds only")
  else:
    text = f'The interval contains 0: the difference is not resolved by these {seeds} seeds, and no verdict is claimed'
  if d['dof'] < MIN_DOF:
    text += (f"; the repository's verdict rule wants at least {MIN_DOF} degrees of freedom and would call it "
             f'inconclusive with {d["dof"]} ({rule}).')
  else:
    text += f" ({d['dof']} degrees of freedom, at least the {MIN_DOF} the repository's verdict rule wants: {rule})."
  lines.append(text)
  return lines


def _caveats(rows: list[dict]) -> list[str]:
  r = rows[0]
  windows = math.ceil(r['heldout_tokens'] / r['seq_len'])
  last = windows % r['eval_batch_size'] or r['eval_batch_size']
  return ['Caveats. Expert-choice groups are the batch\'s tokens at one position (causal: docs/studies.md, '
          '"Expert-choice routing"), so an expert-choice token\'s routing depends on the other sequences of its '
          f"batch and the held-out score depends on eval.batch_size (here {r['eval_batch_size']}, the training "
          f"batch, so groups have the training size); the last of the {math.ceil(windows / r['eval_batch_size'])} "
          f"held-out batches holds {last} real sequence(s) among its {r['eval_batch_size']} rows; its weight-0 "
          'padding rows also compete for the experts. Token choice is dropless and does not depend on the batch. Wall times are from a shared, '
          'loaded 2-core CPU (other jobs running): not a speed comparison. Training points are single-batch '
          'losses (noisy); held-out points score the whole held-out split.']


def render(rows: list[dict], means: list[dict], diff: dict | None) -> str:
  """report.md from the rows, the per-routing means and the paired difference."""
  lines = ['# Token choice vs expert choice at matched compute (tiny, CPU)', '',
           'Runs of `experiments/expert_choice_tiny.py` (its docstring holds the question, the settings and the '
           'commands); the numbers come from the result.json and metrics.jsonl files beside this report. Held-out '
           'loss in nats/token. Token choice: softmax top-2, dropless, renormalized gates x 2, global-batch '
           'balancing 0.01. Expert choice: C = ceil(2 x 16 / 8) = 4 tokens per expert per position (exactly 2 '
           'experts per token on average), no balancing loss, gates = softmax score x E (= 1 at uniform routing, '
           'as a token-choice gate). "unserved" is the share of tokens no expert took (mean over the 2 MoE layers; '
           'held-out from result.json, train at the last logged step); 0 for dropless token choice.', '',
           '| run | routing | seed | steps | held-out loss | FLOPs/token | total FLOPs | wall s | unserved held-out '
           '| unserved train |', '|' + '---|' * 10]
  lines += [f"| {r['run']} | {r['routing']} | {r['seed']} | {r['steps']} | {r['loss']:.4f} | "
            f"{r['flops_per_token']:,} | {r['total_flops']:.3e} | {r['wall_s']:.0f} | {r['unserved_heldout']:.4f} | "
            f"{_opt(r['unserved_train'], '.4f')} |" for r in rows]
  lines += ['', '| routing | seeds | mean loss | sd | FLOPs/token | mean total FLOPs | mean wall s | '
            'mean unserved held-out |', '|' + '---|' * 8]
  lines += [f"| {m['routing']} | {m['n']} | {m['loss']:.4f} | {_opt(m['sd'], '.4f')} | {m['flops_per_token']:,.0f} | "
            f"{m['total_flops']:.3e} | {m['wall_s']:.0f} | {m['unserved_heldout']:.4f} |" for m in means]
  lines += [''] + _verdict(diff) + [''] + _caveats(rows)
  lines += ['', '![held-out and training loss vs tokens](loss_vs_tokens.png)', '']
  return '\n'.join(lines)


def figure(rows: list[dict], path: str) -> None:
  """Held-out loss (left) and training cross-entropy (right) vs training tokens, one line per run."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  colors = {'token_choice': 'C0', 'expert_choice': 'C3'}
  styles = ['-', '--', ':', '-.', (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 2, 2))]  # one per seed
  for r in rows:
    style = dict(color=colors[r['routing']], linestyle=styles[r['seed'] % len(styles)])
    left.plot(*zip(*r['heldout_curve']), marker='.', label=f"{r['run']} ({r['loss']:.3f})", **style)
    right.plot(*zip(*r['train_curve']), marker='.', **style)
  left.set_title('held-out loss')
  right.set_title('training cross-entropy (one batch per point)')
  for ax in (left, right):
    ax.set_xlabel('training tokens')
  left.set_ylabel('nats/token')
  left.set_ylim(top=3.4)
  left.legend(fontsize=6, ncol=2, loc='upper right')
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png', dpi=120)


if __name__ == '__main__':
  gathered = runs()
  figure(gathered, os.path.join(HERE, 'loss_vs_tokens.png'))
  files.atomic_write(os.path.join(HERE, 'report.md'),
                     render(gathered, summary(gathered), paired_difference(gathered)))

"""A frontier's analysis: per budget, the loss-optimal design with an interval, and how the optimum moves.

  python -m moejax.frontier --analyze --config=FRONTIER_FILE --root=DIR [--out=DIR]

The runs under DIR are matched to the file's points by name (seed suffixes dropped) and each run's
held-fixed cost is recounted from its recorded config (`frontier.quantity`): a run outside the
tolerance of its budget (say, trained with a `--config.*` flag that changed the cost) is listed and
left out. Seeds are grouped per configuration (`results.table`). The seed noise is
`statistics.make_noise` over every frontier configuration: the block-design sigma when the points
were run at the same seeds (seed i sets initialization and data order, so points are paired), else the
pooled sigma. Per budget:
  - the best design: the lowest seed-mean loss, its 95% t interval (t sigma / sqrt(n)), and every
    other design's difference from it with its 95% interval; designs whose interval contains 0 are
    "not distinguishable from the best";
  - P(best): the share of DRAWS simulated experiments in which a design has the lowest loss (each
    seed mean perturbed by sigma / sqrt(n) times a t shock at the noise's degrees of freedom, one
    chi-square per draw since sigma is one estimate), and the 95% range of each axis (E, k, s, d_exp,
    shared, width d, N_total, N_active) at the simulated optima.
Between consecutive budgets an axis "moves up" (down) when its 95% ranges at the two budgets do not
overlap and the upper one is the larger budget's (smaller); otherwise the move is not resolved at
these seeds. Without usable noise (fewer than statistics.MIN_DOF degrees of freedom, e.g. one seed)
the best design is reported without intervals and no move is resolved.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from moejax import base_config, config as config_lib, files
from moejax.errors import ConfigError, DataError, MoejaxError
from moejax.studies import figures, frontier as frontier_lib, render_frontier, results, statistics

DRAWS = 4000
AXES = (('num_experts', 'E'), ('experts_per_token', 'k'), ('sparsity', 's'), ('expert_hidden', 'd_exp'),
        ('num_shared_experts', 'shared'), ('width', 'd'), ('n_total', 'N_total'), ('n_active', 'N_active'))


def load(path: str) -> dict:
  """The FRONTIER of an emitted file (one ConfigError line if the file is not one)."""
  meta = getattr(config_lib.load_module(path), 'FRONTIER', None)
  if not isinstance(meta, dict) or not {'points', 'budgets', 'match', 'tolerance'} <= set(meta):
    raise ConfigError(f'{path} has no FRONTIER dict: not a file that `python -m moejax.frontier --emit` wrote')
  return meta


def design_of(name: str) -> str:
  """A run's point name without its seed suffix ('b1-e4k2-f64-seed1' -> 'b1-e4k2-f64')."""
  return re.sub(r'-seed\d+$', '', name)


def recount(record: dict, spec: frontier_lib.Spec) -> float:
  """The held-fixed cost of a recorded run, from its config rebuilt on the current base config."""
  cfg = config_lib.apply_overrides(base_config.get_config(), config_lib.flatten(record['config']))
  return frontier_lib.quantity(cfg, spec)


def assign(records: list[dict], meta: dict) -> tuple[dict[int, list[dict]], list[tuple[str, str]]]:
  """({budget index: records}, [(path, why left out)]): records matched to points, their cost recounted."""
  spec = frontier_lib.spec_from(meta)
  by_budget: dict[int, list[dict]] = {}
  left_out = []
  for r in records:
    point = meta['points'].get(design_of(r['name']))
    if point is None:
      left_out.append((r['_path'], f'{r["name"]} is not a point of this frontier'))
      continue
    try:
      q = recount(r, spec)
    except (MoejaxError, KeyError, TypeError, ValueError) as e:
      left_out.append((r['_path'], f'its cost cannot be recounted ({e})'))
      continue
    budget = meta['budgets'][point['budget']]
    if abs(q / budget - 1) > spec.tolerance:
      left_out.append((r['_path'], f'{meta["what"]} {q:.4g} is {q / budget - 1:+.1%} from budget {budget:.4g} '
                       f'(tolerance ±{spec.tolerance:.1%}): trained with other settings?'))
      continue
    by_budget.setdefault(point['budget'], []).append(dict(r, _frontier={'design': point['design'], 'quantity': q}))
  return by_budget, left_out


def argmin_draws(points: list[dict], noise: statistics.Noise, rng: np.random.Generator) -> np.ndarray | None:
  """Index of the lowest loss in each of DRAWS simulated experiments (seed means perturbed by the noise)."""
  if not noise.usable:
    return None
  means = np.array([p['loss_mean'] for p in points], np.float64)
  scale = noise.sigma / np.sqrt([p['seeds'] for p in points])
  chi = np.sqrt(noise.dof / rng.chisquare(noise.dof, (DRAWS, 1)))
  return np.argmin(means + rng.standard_normal((DRAWS, len(points))) * chi * scale, axis=1)


def _axis(row: dict, key: str) -> float:
  value = row.get(key)
  if key in ('num_experts', 'experts_per_token', 'num_shared_experts') and not value:
    return 0.0 if key == 'num_shared_experts' else 1.0  # dense: one expert of the FFN's width, top-1
  if key == 'expert_hidden' and value is None:
    return float(row.get('ffn_hidden') or 0.0)
  return float(value) if value is not None else math.nan


def budget_summary(j: int, value: float, rows: list[dict], noise: statistics.Noise,
                   rng: np.random.Generator) -> dict:
  """One budget: the rows sorted by loss (with differences from the best), the best, P(best) and axis ranges."""
  rows = sorted(rows, key=lambda r: r['loss_mean'])
  best = rows[0]
  pair = noise.for_pair(*rows)
  t = statistics.t_quantile(0.975, pair.dof) if pair.usable else None
  draws = argmin_draws(rows, pair, rng)
  p_best = np.bincount(draws, minlength=len(rows)) / DRAWS if draws is not None else None
  out_rows = []
  for i, r in enumerate(rows):
    diff = r['loss_mean'] - best['loss_mean']
    half = pair.half_width(best, r) if i else None
    out_rows.append(dict(r, diff=diff, half_width=half, p_best=None if p_best is None else float(p_best[i]),
                         tied=None if i == 0 or half is None else diff - half <= 0,
                         loss_half_width=t * pair.sigma / math.sqrt(r['seeds']) if t else None))
  axes = {}
  for key, label in AXES:
    values = np.array([_axis(r, key) for r in rows])
    entry = {'label': label, 'best': float(values[0]), 'lo': None, 'hi': None}
    if draws is not None:
      entry['lo'], entry['hi'] = (float(x) for x in np.percentile(values[draws], [2.5, 97.5]))
    axes[key] = entry
  return {'budget': j, 'value': value, 'rows': out_rows, 'best': best['design'], 'best_loss': best['loss_mean'],
          'p_best_dist': None if p_best is None else {r['design']: float(p) for r, p in zip(rows, p_best)},
          'axes': axes, 'noise_sigma': pair.sigma if pair.usable else None, 'noise_dof': pair.dof}


def moves(budgets: list[dict]) -> list[dict]:
  """Between consecutive budgets: per axis the optimum's values, their ranges and whether the move is resolved;
  P(same design) = sum over designs of P(best here) x P(best there) (independent simulated experiments)."""
  out = []
  for a, b in zip(budgets, budgets[1:]):
    axes = {}
    for key, label in AXES:
      x, y = a['axes'][key], b['axes'][key]
      verdict = 'not resolved'
      if x['lo'] is not None and y['lo'] is not None:
        verdict = 'up' if x['hi'] < y['lo'] else 'down' if x['lo'] > y['hi'] else 'not resolved'
      axes[key] = {'label': label, 'from': x['best'], 'to': y['best'], 'verdict': verdict}
    same = None
    if a['p_best_dist'] is not None and b['p_best_dist'] is not None:
      same = sum(p * b['p_best_dist'].get(d, 0.0) for d, p in a['p_best_dist'].items())
    out.append({'from_budget': a['budget'], 'to_budget': b['budget'], 'from': a['best'], 'to': b['best'],
                'p_same': same, 'axes': axes})
  return out


def analyze(records: list[dict], meta: dict, seed: int = 0) -> dict:
  """Every budget's summary, the moves between them, the noise, and the runs left out (rows, no Markdown)."""
  by_budget, left_out = assign(records, meta)
  if not by_budget:
    raise ConfigError('no run under the root is a point of this frontier within its tolerance'
                      + (f' ({left_out[0][1]})' if left_out else ''))
  tables = {}
  for j, recs in sorted(by_budget.items()):
    rows, _ = results.table(recs)
    by_name = {design_of(r['name']): r for r in recs}
    for row in rows:
      rec = by_name[design_of(row['name'])]
      row.update(design=rec['_frontier']['design'], budget=j, width=rec['config']['model']['model_dim'],
                 ffn_hidden=rec['config']['model']['ffn_hidden'])
    tables[j] = rows
  every = [r for rows in tables.values() for r in rows]
  noise = statistics.make_noise(every)
  rng = np.random.default_rng(seed)
  budgets = [budget_summary(j, meta['budgets'][j], rows, noise, rng) for j, rows in tables.items()]
  missing = {d for d in meta['designs']} - {r['design'] for r in every}
  return {'match': meta['match'], 'what': meta['what'], 'tolerance': meta['tolerance'], 'budgets': budgets,
          'moves': moves(budgets), 'left_out': left_out, 'missing_designs': sorted(missing),
          'budgets_without_runs': [j for j in range(len(meta['budgets'])) if j not in tables],
          'noise': {'sigma': noise.sigma, 'dof': noise.dof, 'paired_sigma': noise.paired.sigma if noise.paired else None,
                    'paired_dof': noise.paired.dof if noise.paired else 0},
          'runs': sum(r['seeds'] for r in every), 'dropped': meta.get('dropped', [])}


FIGURE = 'frontier.png'


def write(config_path: str, root: str, out: str) -> str:
  """Analyses ROOT's runs of the frontier in `config_path`; writes OUT/report.md, frontier.json and the figure."""
  meta = load(config_path)
  if not os.path.isdir(root):
    raise DataError(f'--root={root} is not a directory of runs')
  gathered = results.gather(root)
  result = analyze(gathered.records, meta)
  result['unreadable'] = [list(x) for x in gathered.unreadable]
  result['failed'] = [f.get('name', '?') for f in gathered.failed]
  results.warn_unreadable(gathered)  # (frontier.json lists them too)
  with files.output(out, 'the frontier analysis', last='report.md') as path:
    figures.frontier_figure(result, path(FIGURE))
    with open(path('frontier.json'), 'w') as f:
      f.write(json.dumps(result, indent=1, default=str) + '\n')
    with open(path('report.md'), 'w') as f:
      f.write(render_frontier.frontier_markdown(result, root, config_path, FIGURE))
  return os.path.join(out, 'report.md')

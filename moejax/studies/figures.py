"""The report's figures, each drawn from rows a test can check (`series`, `grid_series`).

Three PNGs: held-out loss against N_total, against sparsity
s = E/k and against the number of experts. Each line is one fixed active-parameter
budget (runs whose N_active lies within 10% of the smallest in the group;
the router, d*E per MoE layer, is active and grows with E), points are
seed means and error bars one sample standard deviation (none for a single seed).
Dense runs sit at s = 1 and at "1 expert". Points at one x in one budget (other design
choices) are drawn separately and the line joins their mean.

With the paper grids, one figure per grid
(`grid_<ID>.png`): the held-out loss of each configuration against the grid's variable with
95% t intervals of its seed mean (pooled sigma), and beside it every configuration's loss
against training tokens from its decay branches (error bars: one seed standard deviation).

Beside the claims: `forest.png` (every claim's Δ with its 95% interval at each decay-branch budget, coloured by
verdict, with the margin ±T; `forest_rows`) and `best_expert.png` (the best expert size against N_active with the
interval of the argmin; `best_expert_series`).
"""

from __future__ import annotations

from moejax import files
from moejax.model import accounting
from moejax.studies import statistics, verdicts

PLOTS = (('n_total', 'N_total (parameters, with embeddings)', 'loss_vs_n_total.png'),
         ('sparsity', 'sparsity s = E / k', 'loss_vs_sparsity.png'),
         ('num_experts', 'routed experts E (dense = 1)', 'loss_vs_experts.png'))
BUDGET_TOLERANCE = 0.10  # the router (d*E per layer) is active and grows with E; tiny models feel it


def budgets(rows: list[dict]) -> list[list[dict]]:
  """Rows grouped by active-parameter budget: sorted by N_active, a new group past +10% of its first."""
  groups: list[list[dict]] = []
  for row in sorted(rows, key=lambda r: r['n_active']):
    if groups and row['n_active'] <= groups[-1][0]['n_active'] * (1 + BUDGET_TOLERANCE):
      groups[-1].append(row)
    else:
      groups.append([row])
  return groups


def series(rows: list[dict], x_key: str) -> dict[str, list[tuple[float, float, float]]]:
  """{budget label: [(x, loss mean, loss std or 0)] sorted by x}, one entry per fixed N_active budget."""
  out = {}
  for group in budgets(rows):
    label = f'N_active ≈ {accounting.human(group[0]["n_active"])}'
    points = []
    for r in group:
      x = r[x_key] if x_key != 'num_experts' else max(r['num_experts'] or 0, 1)
      points.append((float(x), float(r['loss_mean']), float(r['loss_std'] or 0.0)))
    out[label] = sorted(points)
  return out


def plot(rows: list[dict], x_key: str, x_label: str, path: str) -> None:
  """One PNG: loss against `x_key`, a line with error bars per budget, log2/log10 x axis."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for label, points in series(rows, x_key).items():
    xs, ys, es = zip(*points)
    bar = ax.errorbar(xs, ys, yerr=es, marker='o', linestyle='none', capsize=3, label=label)
    by_x: dict[float, list[float]] = {}
    for x, y in zip(xs, ys):
      by_x.setdefault(x, []).append(y)
    line_x = sorted(by_x)
    ax.plot(line_x, [sum(by_x[x]) / len(by_x[x]) for x in line_x], color=bar[0].get_color(), linewidth=1)
  ax.set_xscale('log', base=10 if x_key == 'n_total' else 2)
  ax.set_xlabel(x_label)
  ax.set_ylabel('held-out loss (nats/token)')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png')
  plt.close(fig)


# Each paper grid's variable: (row key or None for categorical grids, axis label, log2 axis).
GRID_AXES = {'A1': ('sparsity', 's = E / k', True), 'A2a': ('num_experts', 'E (width shrinks)', True),
             'A2b': ('num_experts', 'E (d_exp = 192 / k)', True), 'A4': (None, 'design', False),
             'B1': ('num_experts', 'E (dense = 1)', True), 'B2': ('expert_hidden', 'd_exp', True),
             'B2s32': ('expert_hidden', 'd_exp', True), 'B2p': ('expert_hidden', 'd_exp', True),
             'B3': (None, 'design', False), 'B4': (None, 'design', False), 'B5': (None, 'load balancing', False),
             'B6': ('train_capacity_factor', 'training capacity factor (dropless at the right)', False),
             'LR': ('peak_learning_rate', 'peak learning rate', True)}


def grid_series(grid: str, points: list[dict], noise) -> tuple[list[float], dict[str, list[tuple]], float | None]:
  """What a grid figure's left panel plots: (x of every point, {line: [(x, loss, 95% half-width or None)] sorted by
  x}, the t * sigma the half-widths come from or None). The LR grid has one line per anchor at seed 0."""
  key = GRID_AXES.get(grid, (None, 'configuration', False))[0]
  if key == 'num_experts':
    xs = [max(p.get('num_experts') or 0, 1) for p in points]
  elif key == 'train_capacity_factor':
    finite = [p[key] for p in points if p.get(key)]
    top = max(finite, default=1.0) * 1.6
    xs = [p.get(key) or top for p in points]
  elif key:
    xs = [p.get(key) for p in points]
  else:
    xs = list(range(len(points)))
  if grid == 'LR':  # one line per anchor configuration
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(points):
      groups.setdefault(p['name'].split('-lr')[0], []).append(i)
  else:
    groups = {'': list(range(len(points)))}
  def t_sigma(p):  # the pooled sigma of the point's noise class: the interval of one configuration's mean
    n = noise.of(p) if hasattr(noise, 'of') else noise
    return statistics.t_quantile(0.975, n.dof) * n.sigma if n is not None and n.usable else None

  t = t_sigma(points[0]) if points else None
  out = {}
  for name, idx in groups.items():
    idx = sorted(idx, key=lambda i: xs[i])
    if grid == 'LR':  # one seed per rate: compare like with like (the chosen rate's grid point has more)
      out[name] = [(xs[i], (points[i].get('seed_losses') or {}).get('0/0', points[i]['loss_mean']), None) for i in idx]
    else:
      out[name] = [(xs[i], points[i]['loss_mean'], (t_sigma(points[i]) or 0) / points[i]['seeds'] ** 0.5 if t else None)
                   for i in idx]
  return xs, out, t


def grid_figure(grid: str, points: list[dict], noise, path: str) -> None:
  """One PNG for a grid: loss vs the grid's variable (95% t intervals) and loss vs tokens (decay branches)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  key, label, log2 = GRID_AXES.get(grid, (None, 'configuration', False))
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
  xs, groups, t = grid_series(grid, points, noise)
  for name, pts in groups.items():
    left.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts] if t and grid != 'LR' else None,
                  marker='o',
                  capsize=3, label=name or None)
  if key is None:
    left.set_xticks(xs, [p['name'].replace('-', '\n', 1) for p in points], fontsize=7)
  elif log2:
    left.set_xscale('log', base=2)
    left.set_xticks(sorted(set(xs)))
    left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:g}'))
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  left.set_xlabel(label)
  left.set_ylabel('held-out loss (nats/token)')
  left.set_title(f'{grid}: seed 0' if grid == 'LR' else f'{grid}: seed mean, 95% t interval' if t
                 else f'{grid}: seed mean')
  if grid == 'LR':
    left.legend(fontsize=7)
  for p in points:
    curve = p.get('decay_curve') or []
    if curve:
      right.errorbar([c['tokens'] for c in curve], [c['loss'] for c in curve],
                     yerr=[c.get('std') or 0.0 for c in curve], marker='.', capsize=2, label=p['name'])
  right.set_xscale('log')
  right.set_xlabel('training tokens (decay branches)')
  right.set_ylabel('held-out loss (nats/token)')
  right.legend(fontsize=6)
  for ax in (left, right):
    ax.grid(True, which='both', alpha=0.3)
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png')
  plt.close(fig)


def frontier_series(result: dict) -> dict[str, list[tuple[float, float, float | None, bool]]]:
  """{design: [(budget value, loss mean, 95% half-width or None, is the budget's best)]} sorted by budget."""
  out: dict[str, list] = {}
  for b in result['budgets']:
    for r in b['rows']:
      out.setdefault(r['design'], []).append((b['value'], r['loss_mean'], r['loss_half_width'],
                                              r['design'] == b['best']))
  return {d: sorted(points) for d, points in out.items()}


def frontier_figure(result: dict, path: str) -> None:
  """One PNG: loss against the budget per design (95% t intervals, the optimum per budget starred) and P(best)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
  series = frontier_series(result)
  for design, points in series.items():
    xs, ys, hw, _ = zip(*points)
    left.errorbar(xs, ys, yerr=None if any(h is None for h in hw) else hw, marker='o', capsize=3, label=design)
  best = sorted((x, y) for points in series.values() for x, y, _, is_best in points if is_best)
  left.plot([x for x, _ in best], [y for _, y in best], 'k*--', markersize=12, linewidth=1, label='optimum')
  left.set_xscale('log', base=2)
  left.set_xticks([b['value'] for b in result['budgets']], [f'{b["value"]:.3g}' for b in result['budgets']])
  left.set_xlabel(f'budget: {result["what"]}')
  left.set_ylabel('held-out loss (nats/token)')
  left.set_title('seed mean, 95% t interval' if any(p[2] is not None for v in series.values() for p in v)
                 else 'seed mean (no interval: too few seeds)')
  left.legend(fontsize=7)
  designs = list(series)
  width = 0.8 / max(len(result['budgets']), 1)
  for i, b in enumerate(result['budgets']):
    shares = [(b['p_best_dist'] or {}).get(d, 0.0) for d in designs]
    right.bar([j + i * width for j in range(len(designs))], shares, width, label=f'budget {b["budget"] + 1}')
  right.set_xticks([j + width * (len(result['budgets']) - 1) / 2 for j in range(len(designs))], designs, fontsize=7)
  right.set_ylabel('P(best design)')
  right.set_ylim(0, 1)
  right.set_title('P(best) under the seed noise' if any(b['p_best_dist'] for b in result['budgets'])
                  else 'P(best): no usable seed noise')
  right.legend(fontsize=7)
  for ax in (left, right):
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png')
  plt.close(fig)


VERDICT_COLORS = {'holds': 'tab:green', 'contradicted': 'tab:red', 'inconclusive': 'tab:gray'}


def forest_rows(effects: list[dict]) -> list[dict]:
  """What the forest plot draws (`budgets.effect_rows` in): one row per claim with a measured effect and interval,
  top to bottom, [{'label', 'expected', 'kind', 'points': [(tokens, delta, low, high, verdict)] by budget}];
  claims without one (argmin, fit, missing runs) are left out. low/high are None where there is no interval."""
  out = []
  for e in effects:
    points = []
    for cell in e['cells']:
      c = cell['claim']
      if c.delta is None:
        continue
      hw = c.half_width
      points.append((cell['tokens'], c.delta, None if hw is None else c.delta - hw, None if hw is None else c.delta + hw,
                     c.verdict))
    if points:
      last = e['cells'][-1]['claim']
      out.append({'label': verdicts.label(last), 'expected': verdicts.expected_sign(last), 'kind': e['kind'],
                  'points': points})
  return out


def forest_figure(rows: list[dict], threshold: float | None, path: str) -> None:
  """One PNG: every claim's Δ with its 95% interval at each budget (the full run drawn last, largest), coloured by
  verdict, with 0 and the equivalence margin ±T."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.6), dpi=110)
  budgets = sorted({p[0] for r in rows for p in r['points']})
  offset = {t: 0.25 * (i - (len(budgets) - 1)) / max(len(budgets) - 1, 1) for i, t in enumerate(budgets)}
  for y, r in enumerate(rows):
    for tokens, delta, lo, hi, verdict in r['points']:
      last = tokens == budgets[-1]
      ax.errorbar([delta], [y + offset[tokens]], xerr=None if lo is None else [[delta - lo], [hi - delta]],
                  fmt='o' if last else '.', color=VERDICT_COLORS.get(verdict, 'k'), alpha=1.0 if last else 0.45,
                  markersize=6 if last else 4, capsize=2)
  ax.axvline(0, color='k', linewidth=0.8)
  if threshold is not None:
    ax.axvspan(-threshold, threshold, color='tab:blue', alpha=0.08, label=f'±T = {threshold:.4f} (equivalence)')
  ax.set_yticks(range(len(rows)), [f'{r["label"]}  ({r["expected"]})' for r in rows], fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel('Δ held-out loss (nats/token), 95% t interval')
  ax.set_title('Every claim: full run (large), earlier decay branches above it (faint)', fontsize=9)
  handles = [matplotlib.lines.Line2D([], [], marker='o', linestyle='none', color=c, label=v)
             for v, c in VERDICT_COLORS.items()]
  ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7, loc='best')
  ax.grid(True, axis='x', alpha=0.3)
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png')
  plt.close(fig)


def best_expert_series(rows: list[dict]) -> dict[str, list[tuple]]:
  """{'s = 8': [(N_active non-embedding, best d_exp, low, high, smallest size, largest size)]} by N_active, from
  `summaries.best_expert_rows` (low/high None without an interval)."""
  out: dict[str, list[tuple]] = {}
  for r in rows:
    out.setdefault(f's = {r["sparsity"]:g}', []).append(
        (float(r['n_active_nonembed']), float(r['best']), r['lo'], r['hi'], min(r['sizes']), max(r['sizes'])))
  return {k: sorted(v) for k, v in out.items()}


def best_expert_figure(rows: list[dict], path: str) -> None:
  """One PNG: the best expert size against N_active, with the 95% interval of the argmin and the grid's range."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  series = best_expert_series(rows)
  for i, (name, pts) in enumerate(series.items()):
    shift = 1 + 0.04 * (i - (len(series) - 1) / 2)  # side by side where two s share an active scale
    xs = [p[0] * shift for p in pts]
    err = None if any(p[2] is None for p in pts) else [[max(p[1] - p[2], 0.0) for p in pts],  # (2**log2 rounding)
                                                       [max(p[3] - p[1], 0.0) for p in pts]]
    bar = ax.errorbar(xs, [p[1] for p in pts], yerr=err, marker='os^'[i % 3], capsize=4, label=name)
    ax.vlines(xs, [p[4] for p in pts], [p[5] for p in pts], color=bar[0].get_color(), alpha=0.2, linewidth=8)
  ax.set_xscale('log')
  ax.set_yscale('log', base=2)
  xs = sorted({p[0] for pts in series.values() for p in pts})
  ax.set_xticks(xs, [accounting.human(x) for x in xs])
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  flat = [p for pts in series.values() for p in pts]
  ax.set_ylim(min(p[4] for p in flat) / 1.3, max(p[5] for p in flat) * 1.3)
  ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:g}'))
  ax.set_xlabel('N_active (non-embedding parameters)')
  ax.set_ylabel('best expert size d_exp')
  ax.set_title('argmin of loss over d_exp: 95% interval (bars), grid range (shaded)', fontsize=9)
  ax.legend(fontsize=8, loc='lower right')
  ax.grid(True, which='both', alpha=0.3)
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png')
  plt.close(fig)

"""A Markdown report with figures from every result under a root.

  python -m moejax.report --root=DIR --out=DIR

Writes OUT/report.md and three PNGs: held-out loss against N_total, against sparsity
s = E/k and against the number of experts. Each line is one fixed active-parameter
budget (runs whose N_active lies within 10% of the smallest in the group;
the router, d*E per MoE layer, is active and grows with E), points are
seed means and error bars one sample standard deviation (none for a single seed).
Dense runs sit at s = 1 and at "1 expert". Points at one x in one budget (other design
choices) are drawn separately and the line joins their mean. The results table
(`moejax.results`) follows.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from moejax import accounting, metrics as metrics_lib, results
from moejax.errors import DataError, WorkdirError

FLAGS = flags.FLAGS

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
  tmp = path + '.tmp.png'
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)


def write_report(root: str, out: str, extra: str = '', figure_rows=None, figure_note: str = '',
                 gathered: results.Gathered | None = None) -> str:
  """Writes OUT/report.md (figures, then `extra` Markdown, then the table); returns its path.

  `figure_rows(rows)` may select the rows the figures show (default: all); `figure_note` says which.
  `gathered` saves reading ROOT again when the caller already has it.
  """
  gathered = gathered or results.gather(root)
  if not gathered.records:
    raise DataError(f'no complete result.json under {root}; nothing to report')
  rows, varied = results.table(gathered.records)
  shown = figure_rows(rows) if figure_rows else rows
  try:
    os.makedirs(out, exist_ok=True)
    for key, label, name in PLOTS:
      plot(shown or rows, key, label, os.path.join(out, name))
  except OSError as e:
    raise WorkdirError(f'cannot write the report under {out}: {e.strerror or e}') from None
  seeds = sum(r['seeds'] for r in rows)
  lines = [f'# Results under `{root}`', '',
           f'{seeds} runs in {len(rows)} configurations; {len(gathered.failed)} failed; '
           f'{len(gathered.unreadable)} files skipped. Lines are fixed active-parameter budgets '
           f'(N_active within {BUDGET_TOLERANCE:.0%}; the line joins the mean at each x); error bars are one seed '
           f'standard deviation.{" " + figure_note if figure_note else ""}', '']
  for _, label, name in PLOTS:
    lines += [f'![held-out loss vs {label}]({name})', '']
  if extra:
    lines += [extra, '']
  lines += ['## Table', '', results.markdown(rows, varied, gathered)]
  path = os.path.join(out, 'report.md')
  metrics_lib.atomic_write(path, '\n'.join(lines))
  return path


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.root or not FLAGS.out:
    raise app.UsageError('--root and --out are required')
  path = write_report(FLAGS.root, FLAGS.out)
  print(f'wrote {path} and {len(PLOTS)} figures', file=sys.stderr)


if __name__ == '__main__':
  from moejax import cli  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('root', None, 'Directory holding result.json files (as for moejax.results).')
  flags.DEFINE_string('out', None, 'Directory for report.md and the PNG figures.')
  cli.cli(_main)

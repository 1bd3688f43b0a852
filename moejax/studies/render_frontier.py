"""The compute-matched frontier's Markdown (`python -m moejax.frontier`): the matched grid it emits and the report
of its analysis (`moejax.studies.frontier_analysis`), rendered from rows like every other table (`render.py`)."""

from __future__ import annotations

from moejax.model import accounting
from moejax.studies import frontier as frontier_lib, statistics


def frontier_grid(result, reference: float) -> str:
  """The matched points of a frontier (`moejax.studies.frontier.Frontier`) and its dropped designs, as Markdown."""
  spec = result.spec
  lines = [f'Held fixed: {frontier_lib.MATCHES[spec.match]} within ±{spec.tolerance:.1%} (the base config: '
           f'{reference:.4g}); solved: {spec.solve}.', '',
           '| budget | design | ' + spec.solve + ' | cost | off by | training FLOPs/token |', '|---|---|---:|---:|---:|---:|']
  for m in result.matches:
    lines.append(f'| {m.budget_index + 1} ({m.budget:.4g}) | {m.design.label} | {m.value} | {m.quantity:.4g} | '
                 f'{m.error:+.2%} | {m.flops_per_token:.4g} |')
  if result.dropped:
    lines += ['', 'Dropped designs:', ''] + [f'- {label}: {why}' for label, why in result.dropped]
  return '\n'.join(lines) + '\n'


def _interval(x: dict) -> str:
  return '-' if x['lo'] is None else f'[{x["lo"]:.4g}, {x["hi"]:.4g}]'


def _frontier_budget_table(b: dict) -> list[str]:
  lines = ['| design | E | k | d_exp | shared | N_total | N_active | FLOPs/token | loss (95% interval) | seeds | '
           'Δ vs best (95% interval) | P(best) |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in b['rows']:
    loss = f'{r["loss_mean"]:.4f}' + (f' ± {r["loss_half_width"]:.4f}' if r['loss_half_width'] is not None else '')
    diff = '(best)' if r['design'] == b['best'] else f'{r["diff"]:+.4f}' + (
        f' ± {r["half_width"]:.4f}' + (' (not distinguishable)' if r['tied'] else '') if r['half_width'] else '')
    lines.append(f'| {r["design"]} | {r["num_experts"] or 1} | {r["experts_per_token"] or 1} | '
                 f'{r["expert_hidden"] or r.get("ffn_hidden")} | {r["num_shared_experts"] or 0} | '
                 f'{accounting.human(r["n_total"])} | {accounting.human(r["n_active"])} | '
                 f'{r["flops_per_token"]:.4g} | {loss} | {r["seeds"]} | {diff} | {_share(r["p_best"])} |')
  return lines


def frontier_markdown(result: dict, root: str, config_path: str, figure: str) -> str:
  """A frontier's report (`moejax.studies.frontier_analysis.analyze`): the optimum per budget, how it moves, and
  every budget's designs."""
  n = result['noise']
  noise = ('no usable seed noise (fewer than '
           f'{statistics.MIN_DOF} degrees of freedom): best designs are reported without intervals'
           if not (n['paired_dof'] >= statistics.MIN_DOF or n['dof'] >= statistics.MIN_DOF) else
           f'seed noise σ = {n["paired_sigma"] if n["paired_dof"] >= statistics.MIN_DOF else n["sigma"]:.4f} nats '
           f'({n["paired_dof"] if n["paired_dof"] >= statistics.MIN_DOF else n["dof"]} degrees of freedom; '
           f'{"block design: points paired by seed" if n["paired_dof"] >= statistics.MIN_DOF else "pooled"})')
  lines = [f'# Frontier: {result["what"]} held fixed (±{result["tolerance"]:.1%})', '',
           f'`{config_path}`, runs under `{root}`: {result["runs"]} runs; {noise}. Intervals are 95% t intervals; '
           'P(best) is the share of simulated experiments (seed means perturbed by the noise) in which a design has '
           'the lowest loss; axis ranges are the 95% range at the simulated optima '
           '(moejax/studies/frontier_analysis.py).', '', f'![frontier]({figure})', '',
           '## The loss-optimal design per budget', '',
           '| budget | best design | loss | P(best) | not distinguishable from the best | E | k | d_exp | N_total |',
           '|---|---|---:|---:|---|---|---|---|---|']
  for b in result['budgets']:
    best = b['rows'][0]
    ties = ', '.join(r['design'] for r in b['rows'][1:] if r['tied']) or ('none' if best['p_best'] is not None
                                                                            else '-')
    ax = b['axes']
    cell = lambda k, fmt='{:g}': fmt.format(ax[k]['best']) + (f' {_interval(ax[k])}' if ax[k]['lo'] is not None else '')
    lines.append(f'| {b["budget"] + 1} ({b["value"]:.4g}) | {b["best"]} | {best["loss_mean"]:.4f}'
                 + (f' ± {best["loss_half_width"]:.4f}' if best['loss_half_width'] is not None else '') +
                 f' | {_share(best["p_best"])} | {ties} | '
                 f'{cell("num_experts")} | {cell("experts_per_token")} | {cell("expert_hidden")} | '
                 f'{accounting.human(ax["n_total"]["best"])} |')
  lines += ['', '## How the optimum moves with the budget', '']
  if not result['moves']:
    lines += ['One budget with runs: no move to report.']
  else:
    keys = list(result['moves'][0]['axes'])
    lines += ['| budgets | best design | P(same design) | ' + ' | '.join(result['moves'][0]['axes'][k]['label']
                                                                        for k in keys) + ' |',
              '|---|---|---:|' + '---|' * len(keys)]
    for m in result['moves']:
      same = '-' if m['p_same'] is None else f'{m["p_same"]:.2f}'
      cells = ' | '.join(f'{_num(a["from"])} → {_num(a["to"])} ({a["verdict"]})' for a in m['axes'].values())
      lines.append(f'| {m["from_budget"] + 1} → {m["to_budget"] + 1} | {m["from"]} → {m["to"]} | {same} | {cells} |')
    lines += ['', 'An axis moves "up" ("down") when its 95% ranges at the optima of the two budgets do not overlap; '
              'otherwise the move is not resolved at these seeds.']
  for b in result['budgets']:
    lines += ['', f'## Budget {b["budget"] + 1}: {result["what"]} = {b["value"]:.4g}', ''] + _frontier_budget_table(b)
  notes = [f'- left out: {p}: {why}' for p, why in result['left_out']]
  notes += [f'- design without runs: {d}' for d in result['missing_designs']]
  notes += [f'- budget {j + 1} has no runs' for j in result['budgets_without_runs']]
  notes += [f'- failed: {name}' for name in result.get('failed', [])]
  notes += [f'- dropped when emitted: {label}: {why}' for label, why in result['dropped']]
  if notes:
    lines += ['', '## Notes', ''] + notes
  return '\n'.join(lines) + '\n'


def _share(p: float | None) -> str:
  return '-' if p is None else f'{p:.2f}'


def _num(x: float) -> str:
  return accounting.human(x) if abs(x) >= 1e4 else f'{x:g}'

"""Every Markdown table of the studies, rendered in one place from rows: the claims page (claims with per-seed
contrasts, the forest plot, claims at every decay-branch budget, literature, speedup over dense with intervals, the
best expert size per active scale, learning-rate sweep, fits, loss against N_active and tokens), the results table
and the design ranking (the frontier's: render_frontier.py)."""

from __future__ import annotations

from typing import Any

from moejax.model import accounting
from moejax.studies import figures, fits as fits_lib, statistics, summaries, verdicts
from moejax.studies.verdicts import Claim


def literature_table(rows: list[dict]) -> str:
  lines = ['| claim | ' + ' | '.join(summaries.LITERATURE_COLUMNS) + ' | ours |',
           '|---|' + '---|' * (len(summaries.LITERATURE_COLUMNS) + 1)]
  for r in rows:
    lines.append(f'| {r["id"]} | ' + ' | '.join(r['sides']) + f' | {"; ".join(r["ours"])} |')
  return '\n'.join(lines) + '\n'


def speedup_table(s: dict | None) -> str:
  if s is None:
    return 'No B1 runs with decay curves: no speedup to report.\n'
  lines = [f'Dense baseline `{s["dense"]["name"]}`: {s["loss"]:.4f} nats after {accounting.human(s["tokens"])} tokens. '
           'Speedup = dense tokens / tokens the MoE needs to reach that loss, read off the MoE\'s decay-branch curve '
           '(held-out loss after decays branched at 1/4, 1/2 and the full run; log-linear between them).', '',
           'The 95% interval is the delta method on that interpolation, with each point\'s seed-mean noise at its '
           'budget (the class σ measured there): the MoE\'s two points around the crossing taken perfectly correlated '
           '(the widest case), the dense loss independent of them.', '',
           '| MoE | s | N_total | loss by tokens (mean of seeds) | tokens to reach dense | speedup | 95% interval |',
           '|---|---:|---:|---|---:|---:|---|']
  for x in s['rows']:
    r = x['row']
    curve = ', '.join(f'{accounting.human(p["tokens"])}: {p["loss"]:.4f}' for p in r['decay_curve'])
    if x['where'] == '>':
      reach, speed = 'not reached', '< 1x'
    elif x['where'] == '<':
      reach, speed = f'≤ {accounting.human(x["tokens"])}', f'≥ {x["speedup"]:.1f}x'
    else:
      reach, speed = accounting.human(x['tokens']), f'{x["speedup"]:.2f}x'
    iv = x.get('interval')
    iv = '-' if iv is None else f'[{iv[0]:.2f}x, {iv[1]:.2f}x]'
    lines.append(f'| {r["name"]} | {r["sparsity"]:g} | {accounting.human(r["n_total"])} | {curve} | {reach} | {speed} '
                 f'| {iv} |')
  return '\n'.join(lines) + '\n'


def lr_table(rates: list[float], rows: list[dict]) -> str:
  if not rows:
    return 'No runs of grid LR.\n'
  rule = 'rule' in rows[0]  # widths vary: the joint fit of summaries.lr_rule
  lines = ['| anchor | N_total | ' + ' | '.join(f'LR {x:g}' for x in rates) + ' | best | parabola vertex |'
           + (' rule (joint fit) |' if rule else ''), '|---|---:|' + '---:|' * len(rates) + '---:|---:|' + '---:|' * rule]
  for r in rows:
    vertex = ('not bracketed' if not r['bracketed'] else '-' if r['vertex'] is None else f'{r["vertex"]:.2g}')
    cells = ' | '.join(f'{r["losses"][x]:.4f}' if x in r['losses'] else '-' for x in rates)
    lines.append(f'| {r["anchor"]} | {accounting.human(r["n_total"])} | {cells} | {r["best"]:g} | {vertex} |'
                 + (f' {r["rule"]["rate"]:.2g}{" (fit %.2g: outside the sweep)" % r["rule"]["fitted"] if r["rule"]["clamped"] else ""} |' if rule else ''))
  return '\n'.join(lines) + '\n' + (f'\nNo rate rule between the widths: {rows[0]["rule_error"]}.\n' if 'rule_error' in rows[0] else '')


def residuals_table(by_k: dict[str, dict[int, tuple[float, int]]]) -> str:
  ks = sorted({k for cells in by_k.values() for k in cells})
  lines = ['| form | ' + ' | '.join(f'k={k}' for k in ks) + ' |', '|---|' + '---:|' * len(ks)]
  for name, cells in by_k.items():
    lines.append(f'| {name} | ' + ' | '.join(f'{cells[k][0]:+.4f} ({cells[k][1]})' if k in cells else '-'
                                              for k in ks) + ' |')
  return '\n'.join(lines) + '\n'


def compute_line(c: dict) -> str:
  return (f'Compute: {c["runs"]} runs, {c["wall_h"]:.2f} h of training wall time (summed `train.wall_s`, which '
          'includes compilation, decay branches and their held-out scoring), '
          f'{c["flops"]:.3g} training FLOPs (6 N_active-style accounting, `moejax.model.accounting`).')


def fits_table(fits: list[fits_lib.Fit], largest: str = 'N_total') -> str:
  """The fits as a Markdown table: values with 95% intervals, in-sample RMSE, leave-one-out and extrapolation error."""
  lines = ['| form | n | parameters (95% bootstrap interval) | RMSE (nats) | LOO RMSE | LOO max | largest-'
           f'{largest} RMSE |', '|---|---:|---|---:|---:|---:|---:|']
  baselines = fits_lib.BASELINES + fits_lib.TOKEN_BASELINES
  fits = sorted(fits, key=lambda f: f.form not in baselines)  # baselines first
  for f in fits:
    params = ', '.join(f'{k} = {v:.3g}' + (f' [{f.intervals[k][0]:.3g}, {f.intervals[k][1]:.3g}]' if k in f.intervals
                                           else f' (at its bound {f.at_bound[k]:g}: not identified, no interval)'
                                           if k in f.at_bound else '') for k, v in f.values.items())
    loo = '-' if f.loo_rmse is None else f'{f.loo_rmse:.4f}'
    loo_max = '-' if f.loo_max is None else f'{f.loo_max:.4f}'
    extra = '-' if f.extrapolation_rmse is None else f'{f.extrapolation_rmse:.4f} ({f.extrapolation_n})'
    lines.append(f'| {f.form} | {f.n} | {params} | {f.rmse:.4f} | {loo} | {loo_max} | {extra} |')
  return '\n'.join(lines) + '\n'



def comparisons_table(fits: dict[str, fits_lib.Fit], baselines: tuple[str, ...] = fits_lib.BASELINES) -> str:
  """Each form against each baseline on held-out error, with the bootstrap interval over configurations."""
  lines = ['| form | baseline | score | RMSE difference (nats; < 0: the form is better) | 95% interval (bootstrap over '
           'configurations) |', '|---|---|---|---:|---|']
  for name in fits:
    if name in baselines:
      continue
    for r in fits_lib.baseline_comparisons(fits, name, baselines=baselines):
      lines.append(f'| {name} | {r["baseline"]} | {r["score"]} | {r["difference"]:+.4f} | '
                   f'[{r["interval"][0]:+.4f}, {r["interval"][1]:+.4f}] |')
  return '\n'.join(lines) + '\n' if len(lines) > 2 else ''


def noise_check_lines(check: dict | None) -> list[str]:
  if not check or check['robust_sigma'] is None:
    return []
  if not check['outliers']:
    return [f'Noise check: no configuration\'s seed spread is out of line (beyond the 1 − 0.05/C quantile at the '
            f'median-based σ = {check["robust_sigma"]:.4f}; {check["configurations"]} configurations): the noise '
            'looks homogeneous.', '']
  listed = ', '.join(f'{name} ({spread:.3f})' for name, spread in check['outliers'])
  return [f'Noise check (a diagnostic; verdicts use σ above): {len(check["outliers"])} of {check["configurations"]} '
          f'configurations have seed spreads beyond the 1 − 0.05/C quantile (5% family-wise) expected at the '
          f'median-based σ = '
          f'{check["robust_sigma"]:.4f}: {listed} (max − min over seeds, nats). The noise is not homogeneous; these '
          'points inflate the pooled σ, so verdicts on the other points are conservative, and verdicts involving '
          'these points may understate their own noise.', '']


def per_seed_cell(c: Claim) -> str:
  """The claim's contrast in each seed alone ('0: +0.0123, 1: +0.0201'; argmin claims: the argmins)."""
  fmt = lambda v: v if isinstance(v, str) else f'{v:+.4f}'
  return ', '.join(f'{verdicts.seed_label(k)}: {fmt(v)}' for k, v in c.per_seed.items()) or '-'


def _effect_cell(c: Claim) -> str:
  if c.delta is not None:
    hw = '' if c.half_width is None else f' [{c.delta - c.half_width:+.4f}, {c.delta + c.half_width:+.4f}]'
    return f'{c.delta:+.4f}{hw} {c.verdict}'
  return f'{c.measured} {c.verdict}' if c.kind == 'argmin' else c.verdict


def effects_table(effects: list[dict]) -> str:
  """Claim x budget (`budgets.effect_rows`): Δ, 95% interval and verdict at each budget, and the last change."""
  if not effects or not effects[0]['cells']:
    return 'No decay-branch budgets: nothing to tabulate.\n'
  budgets = [c['tokens'] for c in max((e['cells'] for e in effects), key=len)]
  full = budgets[-1]
  head = ' | '.join(f'{accounting.human(t)} tokens ({t / full:.2g} of the run)' for t in budgets)
  step = (f'{accounting.human(budgets[-2])} → {accounting.human(full)}' if len(budgets) > 1 else '-')
  lines = [f'| claim | expected | {head} | change of Δ, {step} (95% interval) | the effect |',
           '|---|---|' + '---|' * len(budgets) + '---|---|']
  for e in effects:
    last = e['cells'][-1]['claim']
    by = {c['tokens']: c['claim'] for c in e['cells']}
    cells = ' | '.join(_effect_cell(by[t]) if t in by else '-' for t in budgets)
    ch = e['change']
    change = '-' if ch is None or ch.delta is None else f'{ch.delta:+.4f}' + (
        '' if ch.half_width is None else f' [{ch.delta - ch.half_width:+.4f}, {ch.delta + ch.half_width:+.4f}]')
    lines.append(f'| {verdicts.label(last)} | {verdicts.expected_sign(last) or last.expected} | {cells} | {change} | '
                 f'{e["tendency"]} |')
  return '\n'.join(lines) + '\n'


def effects_lines(effects: list[dict] | None, forest: bool) -> list[str]:
  """The forest plot and the claims at every budget, as lines of the claims page."""
  lines = []
  if forest:
    lines += ['## Every effect with its interval', '',
              'Each claim\'s Δ with its 95% interval (the claims table\'s), coloured by verdict, beside the equivalence '
              'margin ±T; the fainter points above each are the same claim at the earlier decay-branch budgets. Argmin '
              'and fit claims (C-B2, C-B2a, C-A3) have no single Δ and are not drawn.', '', '![forest plot](forest.png)',
              '']
  if effects and len(effects[0]['cells']) > 1:  # (runs without decay branches have one budget)
    lines += ['## The claims at every budget: does the effect shrink with tokens?', '',
              'Every claim evaluated again on the held-out losses after the decay branches (as if every run had stopped '
              'there: Hägele et al. 2024 show such branches match separate runs of that length), with the seed noise '
              'measured at that budget and the same margin T. C-A3 rests on the full-run fits only. "Change of Δ" is '
              'the claim evaluated on each seed\'s loss change between the last two budgets, so its interval carries '
              'the noise of those changes (one run\'s losses at two budgets are strongly correlated); the effect '
              '"shrinks" or "grows" when that interval excludes 0 towards or away from no effect. An effect still '
              'shrinking at the full run means the runs are too short for that contrast (SCIENCE.md §4).', '',
              effects_table(effects)]
  return lines


def token_fit_lines(fits: dict[str, fits_lib.Fit] | None, configurations: int) -> list[str]:
  """The loss-against-(N_active, tokens) fit from the decay branches, as lines of the claims page."""
  lines = ['### Loss against N_active and training tokens (decay branches)', '',
           'Chinchilla\'s form L = E + A / N^alpha + B / D^beta fitted to one point per default-design configuration '
           'and decay-branch budget (seed means; D = tokens per run at the branch), by the same Huber / L-BFGS-B '
           'method from SCIENCE.md §3.1\'s start grid. N is the non-embedding **N_active**: SCIENCE.md §1 fits '
           'non-embedding counts, and the MoE laws with a Chinchilla-type N term (Krajewski et al. 2024, Ludziejewski '
           'et al. 2025; §3.2) put the active count there, the parameters every token pays for (6 N_active D training '
           'FLOPs); what N_total adds at fixed N_active is C-B1\'s and C-A3\'s question, not this fit\'s. E, alpha '
           'and beta are bounded at 0; a parameter on its bound is reported there, without an interval. Intervals: a '
           'bootstrap over configurations (all budgets of a configuration together); leave-one-out leaves a whole '
           'configuration out; extrapolation refits without the largest-N_active 20% of configurations. Baselines: '
           'the constant and ln L linear in ln N_active and ln D.', '']
  need = fits_lib.POINTS_PER_PARAMETER * len(fits_lib.TOKEN_FORMS['chinchilla'].raw_names)
  short = [] if 'chinchilla' in (fits or {}) else [f'Chinchilla\'s form not fitted: it needs {need} default-design '
                                                   f'configurations (here {configurations}) and '
                                                   f'{fits_lib.MIN_TOKEN_BUDGETS} token budgets (decay branches).', '']
  if not fits:
    return lines + short
  better = [n for n in fits if n not in fits_lib.TOKEN_BASELINES
            and fits_lib.beats_baselines(fits, n, baselines=fits_lib.TOKEN_BASELINES)]
  return lines + short + [fits_table(list(fits.values()), largest='N_active'),
                  comparisons_table(fits, baselines=fits_lib.TOKEN_BASELINES),
                  f'Forms that beat both baselines: {", ".join(better) or "none"}.', '']


def best_expert_lines(rows: list[dict] | None) -> list[str]:
  """The best expert size against N_active (`summaries.best_expert_rows`), as lines of the claims page."""
  if not rows:
    return []
  lines = ['## Best expert size against N_active', '',
           'Loss against the expert size d_exp at constant k · d_exp (grids B2 and B2s32 at one active scale and two '
           's, B2p at a wider model). The interval of the argmin comes from simulated experiments under the seed noise '
           '(`statistics.argmin_interval`, as C-B2 and C-B2a use it); P(argmin) is the share of those experiments '
           'in which each size has the lowest loss. Paper B: the best size is set by N_active and not by s.', '',
           '| grid | s | N_active (non-embedding) | N_active | loss by d_exp | best d_exp | 95% interval | P(argmin) by '
           'd_exp | argmin per seed |', '|---|---:|---:|---:|---|---:|---|---|---|']
  for r in rows:
    losses = ', '.join(f'{d:g}: {x:.4f}' for d, x in zip(r['sizes'], r['losses']))
    iv = '-' if r['lo'] is None else f'[{r["lo"]:.3g}, {r["hi"]:.3g}]'
    p = '-' if r['p_best'] is None else ', '.join(f'{d:g}: {x:.2f}' for d, x in zip(r['sizes'], r['p_best']))
    seeds = ', '.join(f'{verdicts.seed_label(k)}: {v:g}' for k, v in r['seed_argmins'].items()) or '-'
    lines.append(f'| {r["grid"]} | {r["sparsity"]:g} | {accounting.human(r["n_active_nonembed"])} | '
                 f'{accounting.human(r["n_active"])} | {losses} | {r["best"]:g} | {iv} | {p} | {seeds} |')
  return lines + ['', '![best expert size against N_active](best_expert.png)', '']


def noise_classes(classes: dict) -> str:
  """Each noise class's paired and pooled σ with their degrees of freedom (`claims.evaluate`'s 'classes'), saying
  where the paired σ has too few degrees of freedom to be used."""
  fmt = lambda x, d: '-' if x is None else f'{x:.4f} nats ({d} degrees of freedom)'
  unused = lambda c: (' (too few to use: the pooled σ decides)'
                      if c['paired_sigma'] is not None and c['paired_dof'] < statistics.MIN_DOF else '')
  return '; '.join(f'**{name}** ({c["configurations"]} configurations): paired σ = '
                   f'{fmt(c["paired_sigma"], c["paired_dof"])}{unused(c)}, pooled σ = {fmt(c["sigma"], c["dof"])}'
                   for name, c in classes.items())


def claims_markdown(claims: list[Claim], noise: dict, fits: dict[str, dict[str, fits_lib.Fit]], header: str = '',
                    families: dict[str, list[dict]] | None = None, speedup: dict | None = None,
                    lr: tuple[list[float], list[dict]] | None = None, effects: list[dict] | None = None,
                    token_fits: dict | None = None, best_expert: list[dict] | None = None, forest: bool = False) -> str:
  """The claims page: the claims table, the forest plot, the claims at every budget, the literature, the speedup,
  the best expert size, the LR sweep, the fits per family and against (N_active, tokens)."""
  threshold = '-' if noise['threshold'] is None else f'{noise["threshold"]:.4f}'
  survives = statistics.holm(claims)
  decided = sum(c.verdict != 'inconclusive' for c in claims)
  tested = sum(c.p is not None for c in claims)
  classes = noise_classes(noise['classes'])
  lines = [header, '## Claims', '',
           'Seed noise, per noise class declared in the grid files before the runs (experiments/papers.py: points '
           'that perturb routing, i.e. capacity factors, other balancing modes and heterogeneous experts, are '
           '"routing-perturbed"): ' + classes + '. A seed sets both initialization and data order, so configurations '
           'of one class run at the same seeds are paired (a randomized complete block design, seeds as blocks) and '
           'use the paired σ; others use the pooled σ; a difference across classes uses a Welch interval '
           f'(Welch-Satterthwaite degrees of freedom). Small-effect margin T = {threshold}, fixed in advance per scale '
           '(experiments/papers.py `EQUIVALENCE_MARGIN`, with its source; never estimated from these runs). '
           'Intervals are 95% t intervals (± t(0.975, dof) σ √(1/n_a + 1/n_b)); with fewer than '
           f'{statistics.MIN_DOF} degrees of freedom there are none and the verdict is inconclusive. Trend claims '
           '("monotone") are a regression-slope t-test over the ordered points (one-sided 2.5%); a trend verdict that '
           'changes when any single point is dropped is reported inconclusive. Small effects are equivalence tests '
           '(TOST at 5%: the 90% interval inside ±T). p is the one-sided p-value of the decided direction (for '
           'equivalence: the larger of the two TOST p-values). "To decide" gives seeds per point for 80% power.', '',
           *noise_check_lines(noise.get('check')),
           f'Multiple comparisons: {decided} of {len(claims)} verdicts are decided, each at the 2.5% one-sided level on '
           f'its own (equivalence: 5% per one-sided test). Under Holm\'s step-down correction over all {tested} '
           f'tested claims (family-wise 2.5%, every p-value as it is), {sum(survives.values())} of the '
           f'{len(survives)} decided verdicts with a p-value survive (column "Holm"; the argmin verdicts C-B2/C-B2a rest '
           'on simulated intervals, not a p-value). A sign verdict that flips when any one seed is left out rests on that '
           'seed and is inconclusive. "Per seed" is the claim\'s contrast in each seed alone (seed: Δ; trend claims end '
           'to end; C-A4 the mean over the random designs; C-B2/C-B2a each seed\'s argmin d_exp in the two grids).', '',
           '| claim | statement | expected | measured Δ (nats) | 95% interval | per seed | verdict | p | Holm | '
           'detail | to decide at this scale |',
           '|---|---|---|---:|---|---|---|---:|---|---|---|']
  for i, c in enumerate(claims):
    p = '-' if c.p is None else f'{c.p:.2g}'
    h = {True: 'yes', False: 'no'}.get(survives.get(statistics.key(c, i)), '-')
    detail = c.detail + ''.join(f'; **{f}**' for f in c.flags)
    lines.append(f'| {c.id} | {c.statement} | {c.expected} | {c.measured} | {c.interval} | {per_seed_cell(c)} | '
                 f'**{c.verdict}** | {p} | {h} | {detail} | {c.needs or "-"} |')
  lines += ['', *effects_lines(effects, forest), '## The literature and ours', '',
            'Each claim\'s side in the literature ([R]: SCIENCE.md §0-§4, not re-checked here) and our verdict at this '
            'scale.', '', literature_table(summaries.literature_rows(claims))]
  if speedup is not None:
    lines += ['## Effective speedup over dense', '', speedup_table(speedup)]
  lines += best_expert_lines(best_expert)
  if lr is not None and lr[1]:
    lines += ['## Learning-rate sweep (grid LR)', '', 'Held-out loss at seed 0 for every rate (the rate the scale '
              'uses is the grid point itself; its seed-1 run is not in this table).', '', lr_table(*lr)]
  lines += ['## Fitted scaling laws', '',
            'Non-embedding counts, one point per configuration (seed mean); MoE runs with the default design '
            '(global-batch balancing, dropless, no shared or heterogeneous experts); see moejax/scaling.py. '
            'Fitted per grid family: A (paper A\'s grids), B (paper B\'s count grids B1/B2), and all together. '
            f'A form is fitted only with at least {fits_lib.POINTS_PER_PARAMETER} configurations per free parameter, always '
            'beside the constant and log-linear baselines; it is scored by leave-one-out RMSE and by refitting without '
            'the largest-N_total 20% of configurations and predicting them. A form beats a baseline when the 95% '
            'interval of its held-out RMSE minus the baseline\'s (a bootstrap over configurations, paired) lies below 0; '
            'a form that does not beat both baselines on both scores supports no verdict.', '']
  for fam, fam_fits in (fits or {}).items():
    n = len((families or {}).get(fam, []))
    lines += [f'### Family {fam} ({n} configurations)', '']
    if not fam_fits:
      lines += ['Too few configurations to fit any form.', '']
      continue
    lines += [fits_table(list(fam_fits.values()))]
    short = fits_lib.missing_points(n)
    if short:
      lines += ['Not fitted (too few configurations at ' + f'{fits_lib.POINTS_PER_PARAMETER} per free parameter): '
                + ', '.join(f'{name} needs {k} more' for name, k in short.items()) + '.', '']
    better = [name for name in fam_fits if name not in fits_lib.BASELINES and fits_lib.beats_baselines(fam_fits, name)]
    lines += [comparisons_table(fam_fits)]
    lines += [f'Forms that beat both baselines: {", ".join(better) or "none"}.', '',
              'Mean residual by top-k (prediction − measurement, nats; configurations in brackets):', '',
              residuals_table(fits_lib.residuals_by_k(fam_fits, (families or {}).get(fam, [])))]
  if token_fits is not None:
    lines += token_fit_lines(token_fits, len((families or {}).get('all', [])))
  return '\n'.join(lines)



def _cell(value: Any, key: str) -> str:
  if value is None:
    return '-'
  if key in ('n_total', 'n_active', 'n_total_nonembed', 'n_active_nonembed', 'n_active_measured', 'tokens'):
    return accounting.human(value)
  if key in ('loss_mean', 'loss_std', 'bits_per_byte_mean'):
    return f'{value:.4f}'
  if isinstance(value, float):
    return f'{value:.3g}'
  return str(value)


MD_COLUMNS = (('config_hash', 'hash'), ('name', 'name'), ('n_total', 'N_total'), ('n_active', 'N_active'),
              ('sparsity', 's'), ('granularity', 'G'), ('num_experts', 'E'), ('experts_per_token', 'k'),
              ('expert_hidden', 'd_exp'), ('num_shared_experts', 'shared'), ('load_balancing', 'LB'),
              ('drop_policy', 'drop'), ('eval_drop_policy', 'eval drop'), ('tokens', 'tokens'), ('loss_mean', 'loss'), ('loss_std', '± std'),
              ('seeds', 'n'), ('bits_per_byte_mean', 'bits/byte'), ('load_max_over_mean', 'max/mean load'),
              ('dead_experts', 'dead'), ('drop_fraction', 'dropped'))
# Training-time routing (result.json train.routing: the last 10% of steps), shown when any row has it.
TRAIN_COLUMNS = (('train_drop_fraction', 'train dropped'), ('train_load_max_over_mean', 'train max/mean'))


def results_markdown(rows: list[dict], varied: list[str], gathered=None) -> str:
  """The table (and failed/unreadable lists) as Markdown."""
  cols = list(MD_COLUMNS[:2]) + [(k, k) for k in varied] + list(MD_COLUMNS[2:])
  cols += [c for c in TRAIN_COLUMNS if any(r.get(c[0]) is not None for r in rows)]  # (runs before issue 31 lack them)
  lines = ['| ' + ' | '.join(title for _, title in cols) + ' |',
           '|' + '|'.join('---' if k in ('config_hash', 'name') or k in varied else '---:' for k, _ in cols) + '|']
  for r in rows:
    lines.append('| ' + ' | '.join(_cell(r.get(k), k) for k, _ in cols) + ' |')
  out = '\n'.join(lines) + '\n'
  out += ('\nLoss: held-out nats/token, mean over n seeds (± sample std). s = E/k; G = d_model*E/sum(d_exp) '
          '(d/d_exp for equal experts). Routing columns: held-out pass, mean over MoE layers (train: last 10% of steps).\n')
  repro = [(r['name'], x) for r in rows for x in r.get('reproductions') or []]
  if repro:
    out += ('\n**Reproductions** (re-runs of a seed already counted, e.g. by `moejax.reproduce`; not counted as seeds)'
            '\n\n' + ''.join(f'- {name} seed {x["seed"]}: {x["loss"]:.6f} ({x["difference"]:+.3e} from the seed\'s run), '
                            f'{x["path"]}\n' for name, x in repro))
  if gathered and gathered.failed:
    out += '\n**Failed points**\n\n' + ''.join(f'- {f.get("name", "?")}: {f.get("error", "?")}\n'
                                               for f in gathered.failed)
  if gathered and gathered.unreadable:
    out += '\n**Skipped files**\n\n' + ''.join(f'- {p}: {why}\n' for p, why in gathered.unreadable)
  return out


def design_table(result, top: int) -> str:
  """The top rows as Markdown."""
  d = result.designs
  lines = ['| rank | L | d | heads | d_exp | G | E | k | s | shared | N_total | memory | N_active | GFLOPs/token (fwd) '
           '| decode bytes/step | binds |', '|' + '---:|' * 15 + '---|']
  for i in range(min(top, len(d['n_total']))):
    lines.append(
        f'| {i + 1} | {d["layers"][i]:.0f} | {d["width"][i]:.0f} | {d["heads"][i]:.0f} | {d["expert_hidden"][i]:.0f} '
        f'| {d["granularity"][i]:g} | {d["experts"][i]:.0f} | {d["topk"][i]:.0f} | '
        f'{d["experts"][i] / d["topk"][i]:g} | {d["shared"][i]:.0f} | {accounting.human(d["n_total"][i])} | '
        f'{human_bytes(d["memory_bytes"][i])} | {accounting.human(d["n_active"][i])} | '
        f'{d["flops"][i] / 1e9:.3g} | {human_bytes(d["decode_bytes"][i])} | {result.binding[i]} |')
  return '\n'.join(lines) + '\n'


def human_bytes(b: float) -> str:
  for unit, scale in (('TB', 1e12), ('GB', 1e9), ('MB', 1e6), ('KB', 1e3)):
    if b >= scale:
      return f'{b / scale:.2f}{unit}'
  return f'{b:.0f}B'


def report_page(root: str, rows: list[dict], varied: list[str], gathered, drawn: list[str], extra: str = '',
                figure_note: str = '') -> str:
  """OUT/report.md: the figures (`drawn`: the grids with a figure), `extra` Markdown, then the results table."""
  seeds = sum(r['seeds'] for r in rows)
  lines = [f'# Results under `{root}`', '',
           f'{seeds} runs in {len(rows)} configurations; {len(gathered.failed)} failed; '
           f'{len(gathered.unreadable)} files skipped. Lines are fixed active-parameter budgets '
           f'(N_active within {figures.BUDGET_TOLERANCE:.0%}; the line joins the mean at each x); error bars are one seed '
           f'standard deviation.{" " + figure_note if figure_note else ""}', '']
  for _, label, name in figures.PLOTS:
    lines += [f'![held-out loss vs {label}]({name})', '']
  if drawn:
    lines += ['## Per grid', '', 'Left: each configuration\'s held-out loss against the grid\'s variable (seed mean, 95% t '
              'interval from the pooled σ). Right: held-out loss against training tokens, from the decay branches '
              '(error bars: one seed standard deviation).', '']
    for grid in drawn:
      lines += [f'![grid {grid}](grid_{grid}.png)', '']
  if extra:
    lines += [extra, '']
  lines += ['## Table', '', results_markdown(rows, varied, gathered)]
  return '\n'.join(lines)

"""The study report: gather a results root, evaluate the claims and fits, and write OUT/claims.md, OUT/report.md
and the figures.

  `study(root, scale)`   -> `Study`, every row the pages are rendered from (claims, the claims at every decay-branch
                            budget, noise, fits, loss against N_active and tokens, speedup, best expert size, LR sweep)
  `write_claims(...)`    -> renders a `Study` to OUT/claims.md, OUT/report.md and the PNGs
  `write_report(...)`    -> OUT/report.md and the figures for any root (no paper grids needed)
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os

from moejax import config as config_lib, files
from moejax.errors import ConfigError, DataError, WorkdirError
from moejax.studies import (budgets as budgets_lib, claims as claims_lib, emitted, figures, fits as fits_lib, grids,
                            plan as plan_lib, render, render_plan, results, summaries, verdicts)
from moejax.studies.verdicts import Claim


@dataclasses.dataclass
class Study:
  """Everything the claims page shows, as rows."""
  root: str
  scale: str
  gathered: results.Gathered
  rows: list[dict]
  grids: dict[str, list[dict | None]]
  families: dict[str, list[dict]]
  fits: dict[str, dict[str, fits_lib.Fit]]
  claims: list[Claim]
  noise: dict
  speedup: dict | None
  lr: tuple[list[float], list[dict]]
  compute: dict
  plan: plan_lib.Plan | None = None
  stages: list[budgets_lib.Stage] = dataclasses.field(default_factory=list)  # the claims at every budget
  effects: list[dict] = dataclasses.field(default_factory=list)  # claim x budget (`budgets.effect_rows`)
  token_fits: dict[str, fits_lib.Fit] | None = None  # loss against (N_active, tokens) from the decay branches
  best_expert: list[dict] = dataclasses.field(default_factory=list)  # `summaries.best_expert_rows`
  pilot: tuple[str, list[Claim]] | None = None  # (scale, claims) of the plan's pilot runs, when not these runs


def study(root: str, scale: str, bootstrap: int = 100, fit_starts: int = 32, loo: bool = True,
          gathered: results.Gathered | None = None) -> Study:
  """Every claim, fit and summary of the paper-grid runs under `root` at `scale`.

  loo=False skips the leave-one-out refits (then no fit beats its baselines and C-A3 is inconclusive).
  """
  gathered = gathered or results.gather(root)
  if not gathered.records:
    raise DataError(f'no complete result.json under {root}; run the paper grids first')
  rows, _ = results.table(gathered.records)
  g = grids.grid_rows(rows, scale)
  families = grids.family_rows(rows, g)
  fits = {fam: fits_lib.fit_laws(fam_rows, bootstrap, fit_starts, loo) for fam, fam_rows in families.items()}
  claims, noise = claims_lib.evaluate(rows, scale, fits)
  stages = budgets_lib.by_budget(rows, scale, (claims, noise))
  x, y, configurations = budgets_lib.token_points(families['all'])
  token_fits = fits_lib.fit_token_laws(x, y, configurations, bootstrap, fit_starts, loo) if len(y) else {}
  speedup = summaries.speedup_rows(g, {st.tokens: st.noise['noise'] for st in stages})
  return Study(root, scale, gathered, rows, g, families, fits, claims, noise, speedup, summaries.lr_rows(g),
               summaries.compute_summary(rows), stages=stages, effects=budgets_lib.effect_rows(stages, rows, scale),
               token_fits=token_fits, best_expert=summaries.best_expert_rows(g, noise['noise']))


def claims_page(s: Study) -> str:
  """The claims page of a `Study` as Markdown."""
  records = s.gathered.records
  platforms = sorted({f'{r["platform"]["device_kind"]} ({r["platform"]["backend"]}, jax {r["platform"]["jax"]})'
                      for r in records if r.get('platform')})
  fingerprints = sorted({r['data']['fingerprint'][:12] for r in records if r.get('data')})
  header = (f'# Claims at scale `{s.scale}`\n\n{len(records)} runs in {len(s.rows)} configurations under '
            f'`{s.root}`; machine: {", ".join(platforms) or "?"}; corpus sha256 {", ".join(fingerprints) or "?"}; '
            f'evaluated {datetime.date.today().isoformat()}. {render.compute_line(s.compute)} Figures and the full '
            'table: [report.md](report.md).\n')
  text = render.claims_markdown(s.claims, s.noise, s.fits, header, s.families, s.speedup, s.lr, s.effects,
                                s.token_fits, s.best_expert, forest=bool(figures.forest_rows(s.effects)))
  return text + ('\n' + render_plan.plan_markdown(s.plan, s.claims, s.pilot) if s.plan is not None else '')


def write_claims(s: Study, out: str) -> str:
  """Writes OUT/claims.md, OUT/report.md and the figures of a `Study` as one set (`files.output`); returns the claims
  Markdown."""
  text = claims_page(s)
  with files.output(out, 'the claims report', last='claims.md') as path:
    if figures.forest_rows(s.effects):
      figures.forest_figure(figures.forest_rows(s.effects), s.noise['threshold'], path('forest.png'))
    if s.best_expert:
      figures.best_expert_figure(s.best_expert, path('best_expert.png'))
    _report_files(path, s.root, s.gathered, extra=text.split('\n', 2)[2], figure_rows=lambda _: s.families['all'],
                  figure_note='Figures show the default-design MoE grid points (as the fits); the table has every run.',
                  grids=s.grids, noise=s.noise['noise'])
    with open(path('claims.md'), 'w') as f:
      f.write(text)
  return text


def run(root: str, scale: str, out: str, bootstrap: int = 100, fit_starts: int = 32, loo: bool = True,
        budget: str | None = None, pilot_root: str | None = None, pilot_scale: str | None = None,
        calibrate: list[dict] | None = None) -> str:
  """`study` then `write_claims`: what `python -m moejax.claims` does; returns the claims Markdown. With `budget`
  ('10h', '1e15FLOPs'), the power plan is shown beside the verdicts: made from the runs under `pilot_root` at
  `pilot_scale` (the plan the runs followed: tiny2's from the tiny runs), by default from the runs under `root`;
  `calibrate`: the records of `calibration_runs` its prices are calibrated on."""
  value, unit = plan_lib.parse_budget(budget) if budget else (None, None)  # (a bad budget fails first)
  s = study(root, scale, bootstrap, fit_starts, loo)
  results.warn_unreadable(s.gathered)  # (report.md lists them too)
  if budget:
    pilot = results.gather(pilot_root) if pilot_root else s.gathered
    s.plan = plan_lib.plan(pilot, scale, value, unit, lengths=(1.0,) if pilot_scale else plan_lib.LENGTHS,
                           pilot_scale=pilot_scale, calibrate=calibrate or [])
    if pilot_root:
      s.pilot = (pilot_scale or scale, claims_lib.evaluate(results.table(pilot.records)[0], pilot_scale or scale)[0])
      note_unplanned(s.claims, s.plan, s.pilot)
  return write_claims(s, out)


def note_unplanned(claims: list[Claim], plan: plan_lib.Plan, pilot: tuple[str, list[Claim]]) -> None:
  """Says, in each claim whose runs are missing here, whether the plan left it out, and what the pilot found."""
  rows = {r.key: r for r in plan.rows}
  before = {verdicts.plan_key(c): c.verdict for c in pilot[1] if c.kind != 'fit'}
  for c in claims:
    row = rows.get(verdicts.plan_key(c))
    if row is None or not verdicts.not_run(c):
      continue
    c.detail += (f'; not run at this scale: the plan leaves it out ({row.note or "not chosen"})'
                 if not row.decidable else '; in the plan, not run yet')
    if verdicts.plan_key(c) in before:
      c.detail += f'; the pilot at `{pilot[0]}`: {before[verdicts.plan_key(c)]}'


def calibration_runs(directories: list[str] | None) -> list[dict]:
  """The result.json records of the run directories a plan's prices are calibrated on (`--calibrate`), each with
  what a price needs (a finished run's positive wall time and tokens, its FLOPs per token and optimizer), or one
  DataError line naming the run and what it lacks."""
  out = []
  for d in directories or ():
    path = os.path.join(d, 'result.json')
    r = files.read_json(path, 'calibration run')
    try:
      numbers = (r['train']['wall_s'], r['train']['tokens'], r['accounting']['flops_per_token'])
      r['config']['optim'], r['config']['train']['steps'], r['config']['data']['seq_len']  # pylint: disable=pointless-statement
    except (KeyError, TypeError) as e:
      raise DataError(f'calibration run {path} lacks {e} (not a finished run\'s result.json)') from None
    if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in numbers):
      raise DataError(f'calibration run {path}: wall time, tokens and FLOPs per token must be positive numbers, '
                      f'not {numbers}')
    out.append(r)
  return out


def lr_rule_page(root: str, scale: str) -> str:
  """The learning-rate rule of `scale` fitted to its grid LR runs under `root` (`python -m moejax.claims
  --lr_rule`): the grid's table with each anchor's argmin and the joint fit (`summaries.lr_rule`), and the
  `papers.LR_RULE` entry to record. Needs every point of grid LR (the grids refuse to run before the rule)."""
  points = grids.grid_points(scale, ['LR']).get('LR') or []
  if not points:
    raise ConfigError(f'scale {scale!r} has no grid LR')
  gathered = results.gather(root)
  rows, _ = results.table(gathered.records)
  by_hash = {r['config_hash']: r for r in rows}
  missing = [p['point']['name'] for p in points if p['config_hash'] not in by_hash]
  if missing:
    bad = (f'; unreadable: {", ".join(f"{p} ({why})" for p, why in gathered.unreadable[:2])}'
           if gathered.unreadable else '')
    raise DataError(f'grid LR at {scale} has {len(points) - len(missing)} of {len(points)} points under {root} '
                    f'(missing: {", ".join(missing[:4])}{" ..." if len(missing) > 4 else ""}{bad}); run it first')
  for p in points:  # the anchor's width and top-k from its overrides (a results row shows only varied keys)
    by_hash[p['config_hash']].update({'model.model_dim': p['config'].model.model_dim,
                                      'experts_per_token': p['config'].moe.experts_per_token})
  rates, table = summaries.lr_rows({'LR': [by_hash[p['config_hash']] for p in points]})
  if 'rule_error' in table[0]:
    raise DataError(f'grid LR at {scale}: {table[0]["rule_error"]}')
  if 'rule' not in table[0]:
    raise DataError(f'grid LR at {scale} has one width: no rule between widths to fit')
  outside = [r for r in table if r['rule']['clamped']]
  if outside:
    r = outside[0]
    raise DataError(f'grid LR at {scale}: the fitted rate at d={r["width"]}, k={r["topk"]} ({r["rule"]["fitted"]:.2g}) '
                    f'lies outside the rates swept there ({min(r["losses"]):g}..{max(r["losses"]):g}); extend '
                    'LR_ANCHORS\' sweep at that width and run the new points')
  rule = {}
  for r in table:
    rule.setdefault(r['topk'], {})[r['width']] = r['rule']['rate']  # (the anchors' top-k are the rule's classes)
  fit, cost = table[0]['rule_fit'], max(r['rule']['cost'] for r in table)
  return (f'# Learning-rate rule at scale `{scale}` (grid LR, seed 0; {datetime.date.today().isoformat()})\n\n'
          + render.lr_table(rates, table)
          + f'\nJoint fit (`summaries.lr_rule`): the optimal rate scales as width^({fit["slope"]:.2f} ± '
          f'{fit["slope_se"]:.2f}); a rate a factor 2 off the optimum costs {fit["curvature"]:.4f} ± '
          f'{fit["curvature_se"]:.4f} nats (the bowls\' curvature; compare the seed noise), residual '
          f'{fit["residual_rms"]:.4f} nats (± one standard error). Each anchor takes the rate it swept nearest the '
          f'fit (so its grid point is its grid LR run), predicted to cost at most {cost:.4f} nats against the fitted '
          f'optimum.\n\nRecord in experiments/papers.py: `LR_RULE[{scale!r}] = {rule}`\n')


class PlanEmitError(DataError):
  """The plan was made (and written) but has no runs to emit; `page` is the plan, which the command prints first."""

  def __init__(self, message: str, page: str):
    super().__init__(message)
    self.page = page


def plan_page(root: str, scale: str, budget: str, out: str | None = None, pilot_scale: str | None = None,
              emit: str | None = None, done_root: str | None = None, command: str = '',
              calibrate: list[dict] | None = None) -> str:
  """The power plan for `scale` with the runs under `root` as the pilot (`python -m moejax.claims --plan`), as
  Markdown; written to OUT/plan.md when `out` is given. `pilot_scale`: the scale of the pilot runs when it is
  not `scale`; `emit`: also write the plan's runs as an experiment file (`emitted.plan_sweep`), without the runs
  already under `done_root`; `calibrate`: the records of `calibration_runs` its prices are calibrated on."""
  value, unit = plan_lib.parse_budget(budget)  # a bad budget fails before the runs are read
  gathered = results.gather(root)
  if not gathered.records:
    raise DataError(f'no complete result.json under {root}; a plan needs pilot runs')
  p = plan_lib.plan(gathered, scale, value, unit, lengths=(1.0,) if pilot_scale else plan_lib.LENGTHS,
                    pilot_scale=pilot_scale, calibrate=calibrate or [])
  pilot = f' at scale `{pilot_scale}`' if pilot_scale else ''
  text = (f'# Power plan at scale `{scale}`\n\nPilot: {len(gathered.records)} runs under `{root}`{pilot}; planned '
          f'{datetime.date.today().isoformat()}.\n\n' + render_plan.plan_markdown(p))
  def write(text):
    if out:
      try:
        os.makedirs(out, exist_ok=True)
        files.atomic_write(os.path.join(out, 'plan.md'), text)
      except OSError as e:
        raise WorkdirError(f'cannot write the plan under {out}: {e.strerror or e}') from None
  write(text)  # the plan is kept (and printed, `emit_error`) even when there is nothing to emit
  if emit:
    done = set()
    if done_root:
      made = results.gather(done_root).records
      length = lambda c: c['train']['steps'] * c['train']['batch_size'] * c['data']['seq_len']  # noqa: E731
      at = [r for r in made if length(r['config']) == p.tokens]
      if made and not at:
        raise PlanEmitError(f'--done_root={done_root} holds no run of the plan\'s length ({p.steps} steps, '
                            f'{p.tokens} tokens per run): runs of another scale? nothing emitted', text)
      for r in at:
        done.add((results.config_hash(config_lib.flatten(r['config'])), results.seed_key(r['config'])))
    papers = os.path.join(grids.experiments_dir(), 'papers.py')
    try:
      runs = emitted.plan_sweep(emit, p, papers, command, done)
    except DataError as e:
      raise PlanEmitError(str(e), text) from None
    text += f'\nThe plan\'s {len(runs)} runs: `{emit}` (`python -m moejax.sweep --config={emit} --root=...`).\n'
    if p.beyond_grids:
      text += (f'Not emitted: the runs of {", ".join(p.beyond_grids)} beyond the grids\' points (more random designs '
               'than experiments/paper_a.py A4_RANDOM draws).\n')
    write(text)
  return text


def write_report(root: str, out: str, extra: str = '', figure_rows=None, figure_note: str = '',
                 gathered: results.Gathered | None = None, grids: dict | None = None, noise=None) -> str:
  """Writes OUT/report.md (figures, then `extra` Markdown, then the table); returns its path.

  `figure_rows(rows)` may select the rows the figures show (default: all); `figure_note` says which.
  `gathered` saves reading ROOT again when the caller already has it. `grids` ({grid id: rows})
  adds one figure per grid (`figures.grid_figure`) with intervals from `noise` (a `statistics.Noise`).
  """
  gathered = gathered or results.gather(root)
  if not gathered.records:
    raise DataError(f'no complete result.json under {root}; nothing to report')
  with files.output(out, 'the report', last='report.md') as path:
    _report_files(path, root, gathered, extra, figure_rows, figure_note, grids, noise)
  return os.path.join(out, 'report.md')


def _report_files(path, root, gathered, extra='', figure_rows=None, figure_note='', grids=None, noise=None) -> None:
  """The figures and report.md of `write_report`, each written to `path(name)` (a `files.output` set)."""
  rows, varied = results.table(gathered.records)
  shown = figure_rows(rows) if figure_rows else rows
  for key, label, name in figures.PLOTS:
    figures.plot(shown or rows, key, label, path(name))
  drawn = []
  for grid, points in (grids or {}).items():
    present = [p for p in points if p is not None]
    if len(present) >= 2:  # one point of a grid (a centre it shares with a grid that ran) compares nothing
      figures.grid_figure(grid, present, noise, path(f'grid_{grid}.png'))
      drawn.append(grid)
  with open(path('report.md'), 'w') as f:
    f.write(render.report_page(root, rows, varied, gathered, drawn, extra, figure_note))

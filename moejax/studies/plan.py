"""Power planning before compute (`python -m moejax.claims --plan --budget=8h`): seeds per point and run length so
that every claim reaches 80% power, within a compute budget in hours on the machine at hand or in FLOPs.

Inputs, all written down before the runs it plans:
  - pilot results at the scale (a results root): the seed noise of each declared noise class (experiments/papers.py
    `noise_class`) at each decay-branch budget (the per-seed decay curves), and each configuration's recorded
    training wall time per token (`train.wall_s`, compilation and decay branches included) and FLOPs per token;
  - each claim's effect of interest and its source (experiments/papers.py `EFFECT_OF_INTEREST`);
  - the claims' verdict rules (moejax/studies/verdicts.py, claims.py), simulated here exactly as they decide.

Power of a claim at n seeds per point is the probability that its rule decides the right way when the truth is the
effect of interest (equivalence claims: a true difference of 0 against the margin T): pair differences and
equivalence (TOST) with the class sigma estimated on (C - 1)(n - 1) degrees of freedom (C: the class's grid
configurations; Welch across classes); trend claims by the regression-slope test over a series linear in rank, every
drop-one subseries deciding the same way (a verdict never rests on one point); the argmin claims by the argmin
interval of bowls of the stated depth; A4 by the mean over random designs with their spread from the pilot. n is
the smallest seed count with power >= 0.8 (Monte Carlo, fixed seed). Noise at run lengths beyond the pilot's is the
pilot's full-length noise (it fell with tokens in the pilot; assuming it keeps falling would be optimistic).

The power of each rule is simulated in moejax/studies/power.py. A scale may be planned from a pilot made at another
scale (`pilot_scale`: tiny2 from the tiny runs): noise from the pilot, points and prices from the planned scale at its
own run length.

The plan tries run lengths of 0.5, 1, 2 and 4 times the pilot's (shorter ones only where a decay branch measured
the noise there), adds claims cheapest first while the budget lasts (configurations shared by claims run once, at
the most seeds any chosen claim asks), and keeps the length that decides the most claims, the longer on a tie
(fewer early-training transients). Claims no plan within the budget decides are named with what they would need.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from moejax import config as config_lib
from moejax.errors import ConfigError, DataError
from moejax.studies import budgets as budgets_lib, grids, power, results, statistics, verdicts

POWER = statistics.POWER
MAX_SEEDS = power.MAX_SEEDS
LENGTHS = (0.5, 1.0, 2.0, 4.0)  # run lengths tried, as multiples of the pilot's


@dataclasses.dataclass(frozen=True)
class Spec:
  """A claim as the plan sees it: its key in EFFECT_OF_INTEREST, its rule and its points ((grid, indices) groups)."""
  key: str
  kind: str  # pair | equivalence | trend | argmin | shift | designs | fit
  groups: tuple = ()


SPECS = (
    Spec('C-A1', 'trend', ((('A1', None),),)),
    Spec('C-A2', 'trend', ((('A2a', None),),)),
    Spec('C-A2b', 'trend', ((('A2b', None),),)),
    Spec('C-A3', 'fit'),
    Spec('C-A4', 'designs', ((('A4', None),),)),
    Spec('C-B1', 'trend', ((('B1', (1, 2, 3)),),)),
    Spec('prior', 'pair', ((('B1', (0, 1)),),)),
    Spec('C-B2', 'argmin', ((('B2', None),), (('B2s32', None),))),
    Spec('C-B2a', 'shift', ((('B2', None),), (('B2p', None),))),
    Spec('C-B3', 'equivalence', ((('B3', (0, 1)),),)),
    Spec('C-B4', 'equivalence', ((('B1', (2,)), ('B4', (1,))),)),
    Spec('C-B5/sequence', 'equivalence', ((('B1', (2,)), ('B5', (1,))),)),
    Spec('C-B5/aux_free', 'equivalence', ((('B1', (2,)), ('B5', (2,))),)),
    Spec('C-B5n', 'pair', ((('B1', (2,)), ('B5', (3,))),)),
    Spec('C-B6', 'trend', ((('B6', None),),)),
)


@dataclasses.dataclass
class PlanRow:
  """One claim's plan at the chosen run length."""
  key: str
  kind: str
  effect: float | None
  source: str
  noise_class: str
  sigma: float | None  # the seed sigma the plan assumes (the noisiest class of the claim's points)
  seeds: int | None  # per point, for 80% power (A4: per design); None: no count up to MAX_SEEDS
  points: int  # configurations (A4: the top design and the random designs needed)
  runs: int
  hours: float | None  # standalone cost at the chosen length
  flops: float | None
  power: float | None
  decidable: bool  # chosen within the budget
  note: str = ''
  pilot_trend: str = '-'  # the pilot's effect between its last two budgets ('shrinks': the effect may be optimistic)


@dataclasses.dataclass
class Plan:
  scale: str
  budget: float
  unit: str  # 's' (wall time) or 'FLOPs'
  factor: float  # run length / the pilot's
  tokens: int
  steps: int
  rows: list[PlanRow]
  lengths: list[dict]  # per length tried: {'factor', 'tokens', 'decided', 'hours', 'flops', 'plannable', 'all_hours',
  #                      'all_flops' (the cost of deciding every claim some seed count decides)}
  noise: dict  # {class: {fraction of the pilot's length: (sigma, configurations)}}
  hours: float  # the chosen plan's total
  flops: float
  seeds: dict  # {configuration name: seeds} of the chosen plan
  pilot_scale: str = ''
  points: list = dataclasses.field(default_factory=list)  # [(grid point at seed 0, seeds, config hash)] chosen
  # chosen claims with runs beyond the grids' points (C-A4's extra random designs): not in `points`
  beyond_grids: list = dataclasses.field(default_factory=list)
  calibration: tuple = (1.0, ())  # (price factor, the runs it was measured on)

  def price_note(self) -> str:
    factor, runs = self.calibration
    return (f' x {factor:.2f}, the measured / priced wall time of {len(runs)} run(s) at this scale made with the '
            f'machine to itself ({", ".join(runs)})') if runs else ''


def parse_budget(text: str) -> tuple[float, str]:
  """'8h' / '30m' / '5400s' / '1.5d' -> (seconds, 's'); '1e15FLOPs' -> (1e15, 'FLOPs'). One-line errors."""
  match = re.fullmatch(r'\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*', str(text or ''))
  hint = 'use e.g. --budget=8h (training wall time on this machine), 90m, or --budget=1e15FLOPs'
  if not match:
    raise ConfigError(f'cannot parse the budget {text!r}; {hint}')
  try:
    value = float(match.group(1))
  except ValueError:
    raise ConfigError(f'cannot parse the budget {text!r}; {hint}') from None
  unit = match.group(2).lower()
  if not unit:
    raise ConfigError(f'the budget {text!r} needs a unit (h, m, s or FLOPs); {hint}')
  seconds = {'s': 1, 'sec': 1, 'm': 60, 'min': 60, 'h': 3600, 'hr': 3600, 'd': 86400}
  if unit not in seconds and unit not in ('flop', 'flops'):
    raise ConfigError(f'unknown unit {match.group(2)!r} in the budget {text!r}; {hint}')
  value *= seconds.get(unit, 1)
  if not math.isfinite(value) or value <= 0:
    raise ConfigError(f'the budget {text!r} must be a finite positive amount; {hint}')
  return value, ('s' if unit in seconds else 'FLOPs')


def _members(spec: Spec, points: dict) -> list[list[dict]]:
  out = []
  for group in spec.groups:
    members = []
    for grid, idx in group:
      got = points.get(grid) or []
      members += got if idx is None else [got[i] for i in idx if i < len(got)]
    out.append(members)
  return out


def class_noise_by_length(rows: list[dict], records: list[dict], g: dict) -> dict:
  """{class: {fraction: (sigma, configurations)}}: each noise class's seed sigma (paired where usable) at every
  fraction of the run a decay branch measured, from the pilot's per-seed decay curves."""
  by_path = {r['_path']: r for r in records}
  noise = grids.noise_rows(g)
  fractions = sorted({p['step'] / by_path[path]['train']['steps'] for r in noise for path in r.get('paths') or []
                      for p in by_path[path].get('decay_curve') or [] if (by_path[path].get('train') or {}).get('steps')})
  fractions = [f for f in fractions if f < 1] + [1.0]
  out: dict = {}
  for f in fractions:
    at = []
    for r in noise:
      losses = {}
      for path in r.get('paths') or []:
        rec = by_path[path]
        curve = {p['step']: p['loss'] for p in rec.get('decay_curve') or [] if p.get('loss') is not None}
        loss = rec['eval']['loss'] if f == 1.0 else curve.get(round(f * rec['train']['steps']))
        if loss is not None:
          losses[results.seed_key(rec['config'])] = loss
      if len(losses) >= 2:
        v = list(losses.values())
        at.append(dict(r, seed_losses=losses, seeds=len(v), loss_std=float(np.std(v, ddof=1))))
    for name, n in statistics.make_class_noise(at).classes.items():
      use = n.paired if n.paired is not None and n.paired.usable else n
      if use.sigma is not None:
        out.setdefault(name, {})[f] = (use.sigma, sum(1 for r in at if r.get('noise_class', 'default') == name))
  return out


def _needs(spec, members, effect, margin, sigma_of, spread):
  """(seeds per point, power, points) for 80% power; seeds None when no count up to MAX_SEEDS gets there."""
  classes = [(sigma_of(p['noise_class'])) + (p['noise_class'],) for group in members for p in group]
  flat = [p for group in members for p in group]
  if spec.kind in ('pair', 'equivalence'):
    a, b = classes
    n, pw = power.smallest(lambda k: power.power_pair(k, effect, a, b, spec.kind == 'equivalence', margin))
    return n, pw, len(flat)
  noisiest = max(classes, key=lambda c: c[0])  # a series mixing classes uses the noisiest (ClassNoise.for_pair)
  if spec.kind == 'trend':
    n, pw = power.smallest(lambda k: power.power_trend(k, effect, len(flat), noisiest[0], noisiest[1]))
    return n, pw, len(flat)
  if spec.kind in ('argmin', 'shift'):
    sizes = [[p['point']['moe.expert_hidden'] for p in group] for group in members]
    n, pw = power.smallest(lambda k: power.power_argmin(k, effect, sizes[0], sizes[1], noisiest[0], noisiest[1],
                                            spec.kind == 'shift'))
    return n, pw, len(flat)
  if spread is None:  # designs
    return None, None, len(flat)
  m, pw = power.smallest(lambda k: power.power_designs(k, effect, spread, noisiest[0]), low=statistics.MIN_DOF + 1)
  return m, pw, (m + 1 if m else len(flat))


def _overhead(optim) -> float:
  """Training tokens of a run with its decay branches per token of the run (`optim`: its config section)."""
  branches = [float(x) for x in str(optim.get('decay_branches') or '').split(',') if x.strip()]
  return 1 + float(optim.get('decay_fraction') or 0) * sum(branches)


def pilot_rate(rows, overhead: float) -> float:
  """The pilot's median seconds per training FLOP from its recorded wall times (`overhead`: `_overhead`)."""
  per_flop = [r['wall_s'] / (r['tokens'] * r['seeds'] * r['flops_per_token'] * overhead)
              for r in rows if r.get('wall_s') and r.get('tokens') and r.get('flops_per_token')]
  if not per_flop:
    raise DataError('the pilot runs record no train.wall_s: nothing to price a plan with')
  return float(np.median(per_flop))


def calibration(rows: list[dict], records: list[dict]) -> float:
  """Measured / priced wall time of `records` (runs at the planned scale made with the machine to itself), median,
  priced at the speed of the pilot's results rows: what that speed misses at the scale (tiny2: held-out scoring
  every 150 steps, more heads)."""
  ratios = []
  for r in records:
    overhead = _overhead(r['config']['optim'])
    ratios.append(r['train']['wall_s'] / (r['train']['tokens'] * r['accounting']['flops_per_token'] * overhead
                                          * pilot_rate(rows, overhead)))
  return float(np.median(ratios))


def _costs(g_points, rows, base_cfg, pilot_tokens):
  """{config_hash: (seconds, FLOPs) per pilot-length run}: the recorded wall time per token where the pilot ran the
  configuration, else its FLOPs per token at the pilot's median seconds per FLOP."""
  overhead = _overhead(base_cfg.optim)
  by_hash = {r['config_hash']: r for r in rows}
  rate = pilot_rate(rows, overhead)
  from moejax.model import accounting  # pylint: disable=import-outside-toplevel  (only for configurations not run)
  out = {}
  for pts in g_points.values():
    for p in pts:
      r = by_hash.get(p['config_hash'])
      fpt = (r or {}).get('flops_per_token') or accounting.count(config_lib.validate(p['config']))['flops_per_token']
      flops = fpt * pilot_tokens * overhead
      seconds = (r['wall_s'] / r['seeds'] * pilot_tokens / r['tokens']) if r and r.get('wall_s') else flops * rate
      out[p['config_hash']] = (seconds, flops)
  return out


def _select(needs, costs, budget, unit, factor):
  """Claims chosen cheapest-marginal-first within the budget: ({key}, {config_hash: seeds}, seconds, FLOPs)."""
  index = 0 if unit == 's' else 1
  seeds, spent, chosen = {}, [0.0, 0.0], set()
  while True:
    best = None
    for key, want in needs.items():
      if key in chosen:
        continue
      extra = [sum(max(0, n - seeds.get(h, 0)) * costs[h][i] * factor for h, n in want.items()) for i in (0, 1)]
      if spent[index] + extra[index] <= budget and (best is None or extra[index] < best[1][index]):
        best = (key, extra)
    if best is None:
      return chosen, seeds, spent[0], spent[1]
    key, extra = best
    chosen.add(key)
    spent = [spent[0] + extra[0], spent[1] + extra[1]]
    for h, n in needs[key].items():
      seeds[h] = max(seeds.get(h, 0), n)


def pilot_trends(rows: list[dict], scale: str) -> dict[str, str]:
  """{plan key: how the claim's effect changed between the pilot's last two decay-branch budgets} (`budgets`'s
  'shrinks', 'grows', 'no change resolved', ...): an effect of interest taken from a pilot effect that still shrank
  is likely too large for a longer run, and the plan's power for it optimistic."""
  effects = budgets_lib.effect_rows(budgets_lib.by_budget(rows, scale), rows, scale)
  return {verdicts.plan_key(e['cells'][-1]['claim']): e['tendency'] for e in effects if e['cells']}


def plan(gathered: results.Gathered, scale: str, budget: float, unit: str, lengths=LENGTHS,
         pilot_scale: str | None = None, calibrate: list[dict] | None = None) -> Plan:
  """The power plan for the claims at `scale` from the pilot runs in `gathered` (see the module docstring).

  `pilot_scale` (default `scale`): the scale the pilot ran at, when it differs (tiny2 planned from the tiny runs):
  noise and the A4 spread come from the pilot's grids, points and prices from `scale`'s at its own run length
  (lengths are then multiples of `scale`'s run; its noise is the pilot's at the same multiple of the pilot's tokens,
  its full-length noise beyond). `calibrate`: result records of runs at `scale` made with the machine to itself;
  every price is multiplied by their measured / priced wall time (`calibration`)."""
  pilot_scale = pilot_scale or scale
  effects = grids.effects_of_interest(scale)
  if not effects:
    raise ConfigError(f'no effects of interest are declared for scale {scale!r} (experiments/papers.py '
                      'EFFECT_OF_INTEREST): declare them before planning')
  rows, _ = results.table(gathered.records)
  g = grids.grid_rows(rows, pilot_scale)
  g_points = grids.grid_points(scale)
  noise = class_noise_by_length(rows, gathered.records, g)
  if not noise:
    raise DataError(f'the pilot runs hold no configuration with two or more seeds at scale {pilot_scale!r}: no noise '
                    'to plan with')
  configs = {}
  for grid, pts in g_points.items():
    for p in pts:
      if grid != 'LR' and p['point'].get('moe.load_balancing') != 'none':
        configs[p['config_hash']] = p['noise_class']
  count = {c: sum(1 for v in configs.values() if v == c) for c in set(configs.values())}
  tokens = lambda c: c.train.steps * c.train.batch_size * c.data.seq_len  # noqa: E731
  base_cfg = next(p['config'] for pts in g_points.values() for p in pts)  # every point shares the run length
  run_tokens = tokens(base_cfg)  # the planned scale's run: lengths are multiples of it
  ratio = run_tokens / tokens(next(p['config'] for pts in grids.grid_points(pilot_scale).values() for p in pts))
  if calibrate and pilot_scale == scale:
    raise ConfigError('--calibrate prices a scale the pilot did not run (give --pilot_scale): runs the pilot made '
                      'are priced by their own recorded wall time')
  for r in calibrate or ():
    if (r['config']['train']['steps'], r['config']['data']['seq_len']) != (base_cfg.train.steps, base_cfg.data.seq_len):
      raise DataError(f'--calibrate run {r.get("name")} has {r["config"]["train"]["steps"]} steps of '
                      f'{r["config"]["data"]["seq_len"]} tokens, not the {scale} run\'s {base_cfg.train.steps} of '
                      f'{base_cfg.data.seq_len}: not a run at this scale')
  factor_c = calibration(rows, calibrate) if calibrate else 1.0
  costs = {h: (sec * factor_c, fl) for h, (sec, fl) in _costs(g_points, rows, base_cfg, run_tokens).items()}
  a4 = [r for r in (g.get('A4') or [])[1:] if r is not None]
  spread = float(np.std([r['loss_mean'] for r in a4], ddof=1)) if len(a4) >= 2 else None
  margin = grids.equivalence_margin(scale)
  tried = []
  for factor in lengths:
    at = factor * ratio  # the run length as a multiple of the pilot's
    if not _measured(noise, at):
      continue
    sigma_of = lambda c, f=at: (_sigma_at(noise, c, f), count.get(c, 2))
    made = {}
    for spec in SPECS:
      made[spec.key] = _row(spec, _members(spec, g_points), effects.get(spec.key), margin, sigma_of, spread, costs,
                            factor, a4)
    needs = {k: r.seeds for k, r in made.items() if r.seeds is not None}
    chosen, seeds, seconds, flops = _select(needs, costs, budget, unit, factor)
    every = _select(needs, costs, math.inf, unit, factor)  # what deciding every plannable claim would cost
    tried.append({'factor': factor, 'tokens': int(run_tokens * factor), 'decided': len(chosen),
                  'hours': seconds / 3600, 'flops': flops, 'made': made, 'chosen': chosen, 'seeds': seeds,
                  'all_hours': every[2] / 3600, 'all_flops': every[3], 'plannable': len(needs)})
  if not tried:
    raise DataError(f'no run length of {lengths} x the {scale} run has pilot noise measured at or below it')
  best = max(tried, key=lambda t: (t['decided'], t['factor']))
  by_hash = {p['config_hash']: p['point'] for pts in g_points.values() for p in pts}
  names = {h: p['name'] for h, p in by_hash.items()}
  out_rows, trend = [], pilot_trends(rows, pilot_scale)
  for key, r in best['made'].items():
    r.row.decidable, r.row.pilot_trend = key in best['chosen'], trend.get(key, '-')
    if not r.row.decidable and r.seeds is not None:
      r.row.note = (r.row.note + '; ' if r.row.note else '') + (
          f'needs {_amount(r.row, unit)} on its own at this length, beyond what the budget leaves after the cheaper '
          'claims')
    out_rows.append(r.row)
  return Plan(scale, budget, unit, best['factor'], best['tokens'], int(base_cfg.train.steps * best['factor']),
              out_rows, [{k: t[k] for k in ('factor', 'tokens', 'decided', 'hours', 'flops', 'all_hours', 'all_flops',
                                            'plannable')} for t in tried], noise,
              best['hours'], best['flops'], {names.get(h, h): n for h, n in best['seeds'].items()}, pilot_scale,
              [(by_hash[h], n, h) for h, n in best['seeds'].items() if h in by_hash],
              sorted({h.split('#')[0] for h in best['seeds'] if h not in by_hash}),
              (factor_c, tuple(r['name'] for r in calibrate or ())))


def _amount(row, unit):
  return f'{row.hours:.3g} h' if unit == 's' else f'{row.flops:.3g} FLOPs'


def _measured(noise, at) -> bool:
  """Whether every class's sigma is known at `at` (a multiple of the pilot's length): measured there below the
  pilot's full length, at or below it beyond."""
  for by in noise.values():
    below = [f for f in by if f <= at]
    if not below or (at < 1 and max(below) != at):
      return False
  return True


def _sigma_at(noise, cls, factor):
  """The class sigma at a run length: measured at or below the pilot's length, the pilot's full length beyond; None
  for a class the pilot did not measure (another class's sigma says nothing of it: tiny's routing-perturbed points
  were 4x noisier than its default ones), so its claims are not planned."""
  if cls not in noise:
    return None
  at = noise[cls]
  return at[max(f for f in at if f <= factor)][0]


@dataclasses.dataclass
class _Made:
  row: PlanRow
  seeds: dict | None  # {config_hash: seeds}


def _row(spec, members, declared, margin, sigma_of, spread, costs, factor, a4):
  effect, source = declared if declared else (None, 'no effect of interest declared')
  classes = sorted({p['noise_class'] for group in members for p in group})
  flat = [p for group in members for p in group]
  hashes = tuple(dict.fromkeys(p['config_hash'] for p in flat))
  cls = ' / '.join(classes) or '-'
  unmeasured = [c for c in classes if sigma_of(c)[0] is None]
  sigma = max((sigma_of(c)[0] for c in classes if c not in unmeasured), default=None)
  if spec.kind == 'fit':
    return _Made(PlanRow(spec.key, spec.kind, None, 'a fit, not a contrast', '-', None, None, 0, 0, None, None, None,
                         False, 'more seeds do not widen the N_total range a fit needs to beat its baselines: a '
                         'larger scale'), None)
  if effect is None or (spec.kind == 'equivalence' and margin is None) or any(not g for g in members) or unmeasured:
    why = (source if effect is None else 'no equivalence margin T for this scale' if margin is None and
           spec.kind == 'equivalence' else 'grid points missing' if any(not g for g in members) else
           f'the pilot measured no seed noise of the {" / ".join(unmeasured)} class: a pilot of it first')
    return _Made(PlanRow(spec.key, spec.kind, effect, source, cls, sigma, None, len(flat), 0, None, None, None, False,
                         why), None)
  n, pw, points = _needs(spec, members, effect, margin, sigma_of, spread if a4 else None)
  if n is None:
    note = (f'no seed count up to {MAX_SEEDS} reaches {POWER:.0%} power at this scale' if spec.kind != 'designs'
            else f'no number of random designs up to {MAX_SEEDS} reaches {POWER:.0%} power against the spread '
            f'between the pilot\'s random designs ({spread:.3f})' if spread
            else 'fewer than 2 random designs in the pilot: no spread to plan with')
    return _Made(PlanRow(spec.key, spec.kind, effect, source, cls, sigma, None, points, 0, None, None, None, False,
                         note), None)
  per_run = [sum(costs[h][i] for h in hashes) / len(hashes) for i in (0, 1)]
  want = {h: n for h in hashes}
  if spec.kind == 'designs':  # m random designs at the pilot's 2 seeds (beyond its own: priced as its average), m on top
    want = {h: (n if i == 0 else 2) for i, h in enumerate(hashes)}
    for i in range(points - len(hashes)):
      want[f'{spec.key}#{i}'] = 2
      costs.setdefault(f'{spec.key}#{i}', tuple(per_run))
  runs = sum(want.values())
  row = PlanRow(spec.key, spec.kind, effect, source, cls, sigma, n, points, runs,
                runs * per_run[0] * factor / 3600, runs * per_run[1] * factor, pw, False,
                f'{points - 1} random designs at 2 seeds, the top design at {n}' if spec.kind == 'designs' else '')
  return _Made(row, want)

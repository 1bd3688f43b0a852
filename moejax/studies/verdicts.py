"""A claim's evaluation (`Claim`, a row) and the generic verdict rules: directional, trend and small-effect.

  holds          directional claims: the interval excludes zero on the expected side and
                 every step of the series goes that way; small-effect claims: an
                 equivalence test, the 90% interval lies inside +-T (TOST at 5%);
  contradicted   the interval excludes zero on the other side and every step goes that
                 way (small effects: |difference| minus the 95% half-width exceeds T);
  inconclusive   otherwise, or the runs are missing, or the noise estimate has fewer than
                 MIN_DOF = 6 degrees of freedom.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from moejax.studies import power
from moejax.studies.statistics import ALPHA, t_sf, trend_test

@dataclasses.dataclass
class Claim:
  """One claim's evaluation."""
  id: str
  statement: str
  expected: str
  measured: str
  interval: str
  verdict: str
  detail: str = ''
  p: float | None = None  # one-sided p-value of the decided direction (TOST: the larger of its two)
  alpha: float = ALPHA  # the level its verdict is decided at (TOST: 5% per one-sided test)
  flags: list[str] = dataclasses.field(default_factory=list)
  needs: str = ''  # what would decide an inconclusive verdict at this scale
  kind: str = ''  # direction | trend | equivalence | argmin | fit ('' when the runs are missing)
  delta: float | None = None  # the measured difference (nats), as `measured` shows it
  half_width: float | None = None  # its 95% half-width (None: no usable noise)
  dof: int = 0  # the degrees of freedom of that interval
  per_seed: dict = dataclasses.field(default_factory=dict)  # {seed: the contrast in that seed alone} (argmin: d_exp)


def label(c: Claim) -> str:
  """The claim's id, with the variant where one id has several rows ('C-B5 (sequence)')."""
  m = re.search(r'\((\w+) instead of', c.statement)
  return f'{c.id} ({m.group(1)})' if m else c.id


def plan_key(c: Claim) -> str:
  """The claim's key in a power plan (`plan.SPECS`): its id, with the variant after a slash ('C-B5/sequence')."""
  return label(c).replace(' (', '/').rstrip(')')


def expected_sign(c: Claim) -> str:
  """The expected outcome in short: 'Δ > 0', 'Δ < 0', '|Δ| < T' (equivalence) or '' (argmin and fit claims)."""
  if c.kind == 'equivalence':
    return '|Δ| < T'
  m = re.search(r'([<>≥≤]) 0\b', c.expected)
  return f'Δ {m.group(1)} 0' if m and c.kind in ('direction', 'trend') else ''


def seed_label(key: str) -> str:
  """'3/3' (seed/data.seed, results.seed_key) -> '3'; otherwise as it is."""
  a, _, b = key.partition('/')
  return a if a == b else key


def seed_contrast(a: dict, b: dict) -> dict[str, float]:
  """{seed: L_b - L_a at that seed} over the seeds both rows ran (a paired design: the same data order)."""
  la, lb = a.get('seed_losses') or {}, b.get('seed_losses') or {}
  return {k: lb[k] - la[k] for k in sorted(la, key=_seed_order) if k in lb}


def _seed_order(key: str):
  return tuple(int(x) if x.isdigit() else x for x in key.split('/'))


def seed_argmins(points: list[dict], key: str = 'expert_hidden') -> dict[str, float]:
  """{seed: `key` of the point with the lowest loss in that seed alone} over the seeds every point ran."""
  common = set.intersection(*(set(p.get('seed_losses') or {}) for p in points)) if points else set()
  return {k: min(points, key=lambda p: p['seed_losses'][k])[key] for k in sorted(common, key=_seed_order)}


def set_numbers(c: Claim, delta: float, noise, a: dict, b: dict, kind: str) -> Claim:
  """`c` with its numbers filled in: delta, 95% half-width and dof under `noise` (a `statistics.Noise` for the
  pair a, b), the per-seed contrast L_b - L_a and the claim's kind."""
  c.kind, c.delta, c.per_seed = kind, float(delta), seed_contrast(a, b)
  c.half_width, c.dof = noise.half_width(a, b), noise.dof if noise.usable else 0
  return c


def fmt_delta(delta, hw):
  return f'{delta:+.4f}', ('-' if hw is None else f'[{delta - hw:+.4f}, {delta + hw:+.4f}]')


def direction(delta, hw, sign):
  """Verdict for 'delta has sign `sign`' (+1: positive expected)."""
  if hw is None:
    return 'inconclusive'
  if sign * delta - hw > 0:
    return 'holds'
  if sign * delta + hw < 0:
    return 'contradicted'
  return 'inconclusive'


def p_direction(delta, se, dof, sign) -> float | None:
  """One-sided p-value that delta has sign `sign` (None without noise)."""
  return None if se is None or se == 0 else t_sf(sign * delta / se, dof)


def missing(cid, statement, expected, grid):
  return Claim(cid, statement, expected, '-', '-', 'inconclusive', f'runs of grid {grid} are missing')


def not_run(c: Claim) -> bool:
  """Whether the claim's runs are missing (`missing`, or an argmin claim's 'runs of grids ... are missing'): it was
  not run here, which is not a verdict on runs."""
  return c.detail.startswith('runs of grid')


def ordered(points, key):
  return sorted(points, key=lambda r: r[key])


def trend_verdict(pts, sign, noise):
  """(verdict, delta, hw, monotone, p) of an ordered series: a regression-slope t-test over the series' positions
  (`statistics.trend_test`) decides; delta and hw are the end-to-end difference and its 95% half-width; monotone
  (every step the same way) is reported, not tested; p is the one-sided p-value of the decided direction."""
  delta = pts[-1]['loss_mean'] - pts[0]['loss_mean']
  hw = noise.for_pair(pts[0], pts[-1]).half_width(pts[0], pts[-1])
  steps = [b['loss_mean'] - a['loss_mean'] for a, b in zip(pts, pts[1:])]
  series = noise.for_pair(*pts)
  test = trend_test([p['loss_mean'] for p in pts], [p['seeds'] for p in pts], series)
  if test is None or test[1] == 0:
    return 'inconclusive', delta, hw, all(x * sign > 0 for x in steps), None
  t = test[0] / test[1]
  p_exp, p_opp = t_sf(sign * t, series.dof), t_sf(-sign * t, series.dof)
  verdict = 'holds' if p_exp < ALPHA else 'contradicted' if p_opp < ALPHA else 'inconclusive'
  decided = -sign if verdict == 'contradicted' else sign
  return verdict, delta, hw, all(x * decided > 0 for x in steps), (p_opp if verdict == 'contradicted' else p_exp)


def trend_claim(cid, statement, expected, grid, points, key, sign, noise, note=''):
  """A trend claim. A verdict that changes when any single point is dropped rests on that point and is reported
  inconclusive (flagged), never decided on one point."""
  if not points or any(p is None for p in points):
    return missing(cid, statement, expected, grid)
  pts = ordered(points, key)
  verdict, delta, hw, monotone, p = trend_verdict(pts, sign, noise)
  series = ', '.join(f'{key}={x[key]:g}: {x["loss_mean"]:.4f}' for x in pts)
  measured, interval = fmt_delta(delta, hw)
  c = Claim(cid, statement, expected, measured, interval, verdict,
            f'{series}; slope test over {len(pts)} points; {"monotone" if monotone else "not monotone"}'
            + (f'; {note}' if note else ''), p=p)
  set_numbers(c, delta, noise.for_pair(pts[0], pts[-1]), pts[0], pts[-1], 'trend')
  if verdict != 'inconclusive' and len(pts) >= 3:  # does the verdict rest on a single point?
    hinges = [f'{x["name"]} ({key}={x[key]:g})' for i, x in enumerate(pts)
              if trend_verdict(pts[:i] + pts[i + 1:], sign, noise)[0] != verdict]
    if hinges:
      c.flags.append(f'{verdict} only with ' + ', '.join(hinges) + ': rests on one point, so inconclusive')
      c.verdict = 'inconclusive'
  if c.verdict == 'inconclusive':
    c.needs = needs_trend(pts, noise.for_pair(*pts))
  return c


def needs_trend(pts, noise) -> str:
  """Seeds per point at which the slope test and every drop-one subseries decide the direction of the series'
  measured slope with 80% power (`power.power_trend`): the measured seed means taken as the truth, the sigma that
  decides now (pooled or paired) taken as the truth too, its degrees of freedom counted on the series' own
  configurations (conservative: the class has more). The pair formula of `needs_direction` ignores the drop-one
  check and the series' shape."""
  if not noise.usable:
    return 'a noise estimate with >= 6 degrees of freedom'
  means = np.array([p['loss_mean'] for p in pts])
  r = np.arange(len(means)) - (len(means) - 1) / 2
  profile = (means - means[0]) * (1 if np.dot(r, means) >= 0 else -1)  # the slope's direction, upwards
  n, _ = power.smallest(lambda k: power.power_trend(k, None, len(pts), noise.sigma, len(pts), profile=profile))
  if n is None:
    return (f'no seed count up to {power.MAX_SEEDS} per point: the series as measured is too flat, or one of its '
            'drop-one series is')
  return (f'≈ {n} seeds per point for 80% power if the series is as measured (the slope test and every drop-one '
          'series, at the σ that decides now)')


def seed_check(claims: list[Claim]) -> None:
  """A decided direction or trend verdict whose sign flips when any one seed is left out (the mean of the other
  seeds' contrasts, `per_seed`) rests on that seed: it is reported inconclusive and flagged, as a trend that rests
  on one point is. Needs per-seed contrasts at two or more seeds; equivalence, argmin and fit claims are not
  sign claims and are left as they are."""
  for c in claims:
    n = len(c.per_seed)
    if c.verdict == 'inconclusive' or c.kind not in ('direction', 'trend') or n < 2:
      continue
    expected = {'Δ > 0': 1, 'Δ < 0': -1}.get(expected_sign(c))
    decided = (expected if c.verdict == 'holds' else -expected) if expected else math.copysign(1, c.delta or 0.0)
    total = sum(c.per_seed.values())
    alone = [seed_label(k) for k, v in c.per_seed.items() if (total - v) / (n - 1) * decided <= 0]
    if alone:
      c.flags.append(f'{c.verdict} only with seed {", ".join(alone)}: rests on one seed, so inconclusive')
      c.verdict = 'inconclusive'
      c.needs = c.needs or f'more seeds: without seed {alone[0]} the other seeds\' mean contrast has the other sign'


def needs_direction(delta, noise, monotone=True) -> str:
  n = noise.seeds_to_resolve(delta)
  if n is None:
    return 'a noise estimate with >= 6 degrees of freedom'
  text = f'≈ {n} seeds per point for 80% power if the end-to-end difference is as measured'
  return text + ('' if monotone else ', and a series whose every step agrees (it is not monotone now)')


def small_effect(cid, grid, statement, center, variant, threshold, noise, extra=''):
  if center is None or variant is None:
    return missing(cid, statement, 'abs(Δ) < T', grid)
  delta = variant['loss_mean'] - center['loss_mean']
  noise = noise.for_pair(center, variant)
  hw = noise.half_width(center, variant)
  hw90 = noise.half_width(center, variant, level=0.90)  # TOST at 5%: both one-sided tests = the 90% interval
  se, p = noise.se(center, variant), None
  if threshold is None or hw is None:
    verdict = 'inconclusive'
  elif abs(delta) + hw90 < threshold:
    verdict = 'holds'  # equivalent within the margin T
  elif abs(delta) - hw > threshold:
    verdict = 'contradicted'
  else:
    verdict = 'inconclusive'
  if se and threshold is not None:
    p = (max(t_sf((delta + threshold) / se, noise.dof), t_sf((threshold - delta) / se, noise.dof))
         if verdict != 'contradicted' else t_sf((abs(delta) - threshold) / se, noise.dof))
  measured, interval = fmt_delta(delta, hw)
  t = '-' if threshold is None else f'{threshold:.4f}'
  c = Claim(cid, statement, f'abs(Δ) < T = {t}', measured, interval, verdict,
            f'{variant["name"]} {variant["loss_mean"]:.4f} vs {center["name"]} {center["loss_mean"]:.4f}' + extra, p=p,
            alpha=0.05 if verdict != 'contradicted' else ALPHA)
  set_numbers(c, delta, noise, center, variant, 'equivalence')
  if verdict == 'inconclusive' and threshold is not None and noise.usable:
    if abs(delta) < threshold:
      n = noise.seeds_to_resolve(delta, threshold, level=0.90)
      c.needs = f'≈ {n} seeds per point to show equivalence if Δ is as measured'
    else:
      c.needs = f'≈ {noise.seeds_to_resolve(delta, threshold)} seeds per point to show |Δ| > T if Δ is as measured'
  return c

"""Evaluate the two papers' checkable claims (SCIENCE.md §4) on a results root.

  python -m moejax.claims --root=docs/results/tiny/runs --scale=tiny --out=docs/results/tiny

Runs are matched to the grids of experiments/paper_a.py and paper_b.py at --scale by
configuration hash (`moejax.results.config_hash`), so names and seeds do not matter and a
point shared by two grids is one row. Every point of a grid differs from its neighbours
only in the variables its claim names (experiments/papers.py). For every claim the report
gives the expected direction, the measured difference in held-out loss (nats/token), a 95%
interval, a one-sided p-value and a verdict:

  holds          directional claims: the interval excludes zero on the expected side and
                 every step of the series goes that way; small-effect claims: an
                 equivalence test, the 90% interval lies inside +-T (TOST at 5%);
  contradicted   the interval excludes zero on the other side and every step goes that
                 way (small effects: |difference| minus the 95% half-width exceeds T);
  inconclusive   otherwise, or the runs are missing, or the noise estimate has fewer than
                 MIN_DOF = 6 degrees of freedom.

Noise: a seed sets initialization and data order, so the configurations run at one seed set
are paired: seeds are the blocks of a randomized complete block design. A difference between
two such configurations uses the residual sigma of the additive model loss = configuration +
seed (`block_sigma`, dof = (C-1)(S-1)), in which the seed's shared effect cancels; any other
comparison uses the pooled sample standard deviation of every configuration with two or more
seeds. A difference of seed means over n_a and n_b seeds gets the t interval
+-t(0.975, dof) * sigma * sqrt(1/n_a + 1/n_b).
T = 0.25 |L(s=16) - L(s=4)| from B1: half the mean gain of one doubling of E at this scale.

Also reported: which decided verdicts survive a Holm correction over all decided ones; for
trend claims, whether the verdict hinges on one point (dropping any single point changes
it); for undecided claims, how many seeds per point would decide them at this scale if the
effect is as measured; the literature's side of each claim; the effective speedup of each
B1 MoE over the dense baseline from the decay-branch curves; the scaling-law fits per grid
family beside their baselines. Outputs: OUT/claims.md, OUT/report.md, OUT/*.png.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys

import numpy as np
from absl import app, flags

from moejax import files
from moejax import accounting, config as config_lib, metrics as metrics_lib, report, results, scaling
from moejax.errors import DataError

FLAGS = flags.FLAGS

EXPERIMENTS = ('paper_a', 'paper_b')
MIN_DOF = 6  # fewer pooled degrees of freedom than this: no interval, every verdict inconclusive
ALPHA = 0.025  # one-sided level of a directional verdict (the 95% two-sided interval excludes 0)


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


def _experiments_dir() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments')


def grid_rows(rows: list[dict], scale: str) -> dict[str, list[dict | None]]:
  """{grid id: [results row or None per configuration]} for the paper grids at `scale`."""
  by_hash = {r['config_hash']: r for r in rows}
  out = {}
  for name in EXPERIMENTS:
    module = config_lib.load_module(os.path.join(_experiments_dir(), f'{name}.py'))
    base = module.get_config(scale)
    for grid, points in module.grids(scale).items():
      found, seen = [], set()
      for p in points:
        cfg = config_lib.apply_overrides(base, p)
        digest = results.config_hash(config_lib.flatten(json.loads(cfg.to_json_best_effort())))
        if digest not in seen:  # seeds of one configuration are one row
          seen.add(digest)
          found.append(by_hash.get(digest))
      out[grid] = found
  return out


def pooled_sigma(rows: list[dict]) -> tuple[float | None, int]:
  """Pooled seed standard deviation over configurations with >= 2 seeds, and its degrees of freedom."""
  num = dof = 0.0
  for r in rows:
    if r['seeds'] >= 2 and r['loss_std'] is not None:
      num += (r['seeds'] - 1) * r['loss_std'] ** 2
      dof += r['seeds'] - 1
  return (math.sqrt(num / dof), int(dof)) if dof else (None, 0)


def _block_residuals(rows: list[dict]) -> tuple[list[dict], np.ndarray | None, frozenset]:
  """(configurations at the most common seed set of two or more seeds, their residuals [C, S] under the additive
  model loss = configuration + seed, that seed set); residuals None when there is no such set."""
  sets: dict[frozenset, list[dict]] = {}
  for r in rows:
    seeds = frozenset((r.get('seed_losses') or {}).keys())
    if len(seeds) >= 2:
      sets.setdefault(seeds, []).append(r)
  if not sets:
    return [], None, frozenset()
  seeds, chosen = max(sets.items(), key=lambda kv: (len(kv[1]), len(kv[0])))
  order = sorted(seeds)
  m = np.array([[r['seed_losses'][k] for k in order] for r in chosen], np.float64)
  return chosen, m - m.mean(axis=1, keepdims=True) - m.mean(axis=0, keepdims=True) + m.mean(), seeds


def block_sigma(rows: list[dict]) -> tuple[float | None, int, frozenset]:
  """Residual sigma of the additive model loss = configuration + seed, its degrees of freedom, and the seed set.

  A seed sets the data order of every point (paired runs), so seeds are blocks of a randomized
  complete block design: the seed's shared effect (one data order is harder than another for
  every configuration) cancels in a difference of two configurations' means over the same seeds.
  Uses the configurations run at the most common seed set of two or more seeds; dof = (C-1)(S-1).
  """
  _, resid, seeds = _block_residuals(rows)
  if resid is None:
    return None, 0, seeds
  dof = (resid.shape[0] - 1) * (resid.shape[1] - 1)
  if dof == 0:
    return None, 0, seeds
  return float(math.sqrt(np.sum(resid ** 2) / dof)), int(dof), seeds


def noise_check(rows: list[dict], family_level: float = 0.05) -> dict:
  """Is the seed noise the same for every configuration? A diagnostic beside the verdicts, not used by them.

  Over the configurations at the blocked seed set (as `block_sigma`), each configuration's share of the
  residual sum of squares, c_i, is about sigma^2 (C-1)/C chi^2_(S-1) when the noise is homogeneous. The
  robust sigma comes from the median c_i; a configuration whose c_i exceeds the 1 - family_level / C quantile
  at that sigma (a false flag among C homogeneous configurations at most `family_level` of the time) is listed
  with its seed spread (max - min of its seeds' losses). Returns {'robust_sigma', 'outliers': [(name, spread)],
  'configurations'}.
  """
  from scipy import stats  # pylint: disable=import-outside-toplevel
  chosen, resid, _ = _block_residuals(rows)
  if len(chosen) < 3:
    return {'robust_sigma': None, 'outliers': [], 'configurations': len(chosen)}
  C, S = resid.shape
  share = np.sum(resid ** 2, axis=1) * C / (C - 1)  # ~ sigma^2 chi^2_(S-1) each under homogeneous noise
  robust = math.sqrt(float(np.median(share)) / stats.chi2.ppf(0.5, S - 1))
  cut = robust ** 2 * stats.chi2.ppf(1 - family_level / C, S - 1)
  spread = lambda r: max(r['seed_losses'].values()) - min(r['seed_losses'].values())
  outliers = sorted(((r.get('name') or r.get('config_hash'), float(spread(r))) for r, c in zip(chosen, share)
                     if c > cut), key=lambda x: -x[1])
  return {'robust_sigma': robust, 'outliers': outliers, 'configurations': C}


@dataclasses.dataclass(frozen=True)
class Noise:
  """The seed noise: pooled sigma and its degrees of freedom; with `paired`, the block-design sigma used for
  differences between configurations run at the same seeds (`seed_set`)."""
  sigma: float | None
  dof: int
  paired: 'Noise | None' = None
  seed_set: frozenset = frozenset()

  def for_pair(self, *points: dict) -> 'Noise':
    """The noise that applies to a comparison of `points`: paired when all were run at the blocked seed set."""
    if self.paired is not None and self.paired.usable and all(
        frozenset((p.get('seed_losses') or {}).keys()) == self.seed_set for p in points):
      return self.paired
    return self

  @property
  def usable(self) -> bool:
    return self.sigma is not None and self.dof >= MIN_DOF

  def se(self, a: dict, b: dict) -> float | None:
    """Standard error of a difference of seed means over a['seeds'] and b['seeds'] runs."""
    return self.sigma * math.sqrt(1 / a['seeds'] + 1 / b['seeds']) if self.usable else None

  def half_width(self, a: dict, b: dict, level: float = 0.95) -> float | None:
    """Two-sided `level` t-interval half-width of a difference of seed means over a['seeds'] and b['seeds'] runs."""
    if not self.usable:
      return None
    return t_quantile(0.5 + level / 2, self.dof) * self.se(a, b)

  def seeds_to_resolve(self, delta: float, margin: float = 0.0, level: float = 0.95) -> int | None:
    """Seeds per point (both sides) at which a difference `delta` would clear `margin` by the t half-width."""
    gap = abs(abs(delta) - margin)
    if not self.usable or gap == 0:
      return None
    return max(2, math.ceil(2 * (t_quantile(0.5 + level / 2, self.dof) * self.sigma / gap) ** 2))


def t_quantile(p: float, dof: int) -> float:
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(stats.t.ppf(p, dof))


def t_sf(x: float, dof: int) -> float:
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(stats.t.sf(x, dof))


def _fmt(delta, hw):
  return f'{delta:+.4f}', ('-' if hw is None else f'[{delta - hw:+.4f}, {delta + hw:+.4f}]')


def _direction(delta, hw, sign):
  """Verdict for 'delta has sign `sign`' (+1: positive expected)."""
  if hw is None:
    return 'inconclusive'
  if sign * delta - hw > 0:
    return 'holds'
  if sign * delta + hw < 0:
    return 'contradicted'
  return 'inconclusive'


def _p_direction(delta, se, dof, sign) -> float | None:
  """One-sided p-value that delta has sign `sign` (None without noise)."""
  return None if se is None or se == 0 else t_sf(sign * delta / se, dof)


def _missing(cid, statement, expected, grid):
  return Claim(cid, statement, expected, '-', '-', 'inconclusive', f'runs of grid {grid} are missing')


def _ordered(points, key):
  return sorted(points, key=lambda r: r[key])


def _trend_verdict(pts, sign, noise):
  """(verdict, delta, hw, monotone) of an ordered series: the end-to-end interval plus the step rule."""
  delta = pts[-1]['loss_mean'] - pts[0]['loss_mean']
  hw = noise.for_pair(pts[0], pts[-1]).half_width(pts[0], pts[-1])
  steps = [b['loss_mean'] - a['loss_mean'] for a, b in zip(pts, pts[1:])]
  verdict = _direction(delta, hw, sign)
  # The same rule both ways: a verdict needs every step in its own direction.
  monotone = all(s * (sign if verdict != 'contradicted' else -sign) > 0 for s in steps)
  if verdict != 'inconclusive' and not monotone:
    verdict = 'inconclusive'
  return verdict, delta, hw, monotone


def _trend_claim(cid, statement, expected, grid, points, key, sign, noise, note=''):
  if not points or any(p is None for p in points):
    return _missing(cid, statement, expected, grid)
  pts = _ordered(points, key)
  verdict, delta, hw, monotone = _trend_verdict(pts, sign, noise)
  series = ', '.join(f'{key}={p[key]:g}: {p["loss_mean"]:.4f}' for p in pts)
  measured, interval = _fmt(delta, hw)
  decided_sign = -sign if verdict == 'contradicted' else sign
  ends = noise.for_pair(pts[0], pts[-1])
  c = Claim(cid, statement, expected, measured, interval, verdict,
            f'{series}; {"monotone" if monotone else "not monotone"}' + (f'; {note}' if note else ''),
            p=_p_direction(delta, ends.se(pts[0], pts[-1]), ends.dof, decided_sign))
  if verdict != 'inconclusive' and len(pts) >= 3:  # does the verdict rest on a single point?
    hinges = [p['name'] for i, p in enumerate(pts) if _trend_verdict(pts[:i] + pts[i + 1:], sign, noise)[0] != verdict]
    if hinges:
      c.flags.append('hinges on ' + ', '.join(hinges))
  if verdict == 'inconclusive':
    c.needs = _needs_direction(delta, ends, monotone)
  return c


def _needs_direction(delta, noise, monotone=True) -> str:
  n = noise.seeds_to_resolve(delta)
  if n is None:
    return 'a noise estimate with >= 6 degrees of freedom'
  text = f'≈ {n} seeds per point if the end-to-end difference is as measured'
  return text + ('' if monotone else ', and a series whose every step agrees (it is not monotone now)')


def _small_effect(cid, grid, statement, center, variant, threshold, noise, extra=''):
  if center is None or variant is None:
    return _missing(cid, statement, 'abs(Δ) < T', grid)
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
  measured, interval = _fmt(delta, hw)
  t = '-' if threshold is None else f'{threshold:.4f}'
  c = Claim(cid, statement, f'abs(Δ) < T = {t}', measured, interval, verdict,
            f'{variant["name"]} {variant["loss_mean"]:.4f} vs {center["name"]} {center["loss_mean"]:.4f}' + extra, p=p,
            alpha=0.05 if verdict != 'contradicted' else ALPHA)
  if verdict == 'inconclusive' and threshold is not None and noise.usable:
    if abs(delta) < threshold:
      n = noise.seeds_to_resolve(delta, threshold, level=0.90)
      c.needs = f'≈ {n} seeds per point to show equivalence if Δ is as measured'
    else:
      c.needs = f'≈ {noise.seeds_to_resolve(delta, threshold)} seeds per point to show |Δ| > T if Δ is as measured'
  return c


def evaluate(rows: list[dict], scale: str, fits: dict[str, dict[str, scaling.Fit]] | None = None
             ) -> tuple[list[Claim], dict]:
  """Every claim of SCIENCE.md §4 on `rows` (results.table rows); returns (claims, noise info)."""
  g = grid_rows(rows, scale)
  noise = make_noise(noise_rows(g))
  claims = []
  claims.append(_trend_claim('C-A1', 'At fixed N_total and core, loss rises monotonically with s (A1).',
                             'Δ = L(s_max) − L(s_min) > 0', 'A1', g.get('A1'), 'sparsity', +1, noise))
  claims.append(_trend_claim('C-A2', 'At fixed N_total, s and G, loss rises slightly with E (A2a: width shrinks).',
                             'Δ = L(E_max) − L(E_min) > 0, small', 'A2a', g.get('A2a'), 'num_experts', +1, noise))
  a2b = _trend_claim('C-A2b', 'Expert size free (fixed L, d, N_total, N_active, s): paper A predicts equal or worse '
                     'loss with more experts; fine-grained MoE work predicts better.',
                     'Δ = L(E_max) − L(E_min) ≥ 0 (A)', 'A2b', g.get('A2b'), 'num_experts', +1, noise)
  if a2b.verdict == 'contradicted':
    a2b.detail += '; finer experts win (Krajewski/OLMoE/DeepSeekMoE side)'
  elif a2b.verdict == 'holds':
    a2b.detail += '; fewer experts win (paper A side)'
  if g.get('A2b') and all(g['A2b']):
    best = min(g['A2b'], key=lambda r: r['loss_mean'])
    a2b.detail += f'; lowest loss at E = {best["num_experts"]:g} (d_exp {best["expert_hidden"]:g})'
  claims.append(a2b)
  claims.append(_kappa_claim(fits))
  claims.append(_a4_claim(g.get('A4'), noise))
  b1_all = g.get('B1')
  dense, b1 = (b1_all[0], b1_all[1:]) if b1_all else (None, None)  # B1 starts with the true dense baseline
  claims.append(_trend_claim('C-B1', 'At fixed N_active, loss falls monotonically with E (B1), diminishing returns.',
                             'Δ = L(E_max) − L(E_min) < 0', 'B1', b1, 'num_experts', -1, noise,
                             note=_diminishing(b1)))
  threshold = None
  if b1 and all(b1):
    by_s = {r['sparsity']: r for r in b1}
    lo, hi = by_s.get(4.0), by_s.get(16.0)
    if lo and hi:  # half the mean gain of one doubling of E (s = 4 -> 16 is two doublings)
      threshold = 0.25 * abs(hi['loss_mean'] - lo['loss_mean'])
  statement = 'MoE beats the active-matched dense model (B1: dense FFN of hidden k * d_exp vs s = 4).'
  lo4 = next((r for r in (b1 or []) if r and r['sparsity'] == 4.0), None)
  if dense is None or lo4 is None:
    claims.append(_missing('prior', statement, 'Δ = L(s=4) − L(dense) < 0', 'B1'))
  else:
    pair = noise.for_pair(dense, lo4)
    delta, hw = lo4['loss_mean'] - dense['loss_mean'], pair.half_width(dense, lo4)
    m, i = _fmt(delta, hw)
    verdict = _direction(delta, hw, -1)
    c = Claim('prior', statement, 'Δ = L(s=4) − L(dense) < 0', m, i, verdict,
              f'dense {dense["loss_mean"]:.4f}, s=4 {lo4["loss_mean"]:.4f}',
              p=_p_direction(delta, pair.se(dense, lo4), pair.dof, +1 if verdict == 'contradicted' else -1))
    if verdict == 'inconclusive':
      c.needs = _needs_direction(delta, pair)
    claims.append(c)
  claims.extend(_b2_claims(g, noise))
  center = next((r for r in (b1 or []) if r and r['sparsity'] == 16.0), None)  # B1 at s = 16, the B4-B6 reference
  b3, b4, b5, b6 = (g.get(k) or [] for k in ('B3', 'B4', 'B5', 'B6'))
  claims.append(_small_effect('C-B3', 'B3', 'A shared expert instead of one routed expert changes loss little.',
                              b3[0] if b3 else None, b3[1] if len(b3) > 1 else None, threshold, noise))
  claims.append(_small_effect('C-B4', 'B4', 'Heterogeneous expert sizes change loss little.', center,
                              b4[1] if len(b4) > 1 else None, threshold, noise, _measured_active(b4)))
  for variant, kind in zip(b5[1:3] + [None, None], ('sequence', 'aux_free')):
    claims.append(_small_effect('C-B5', 'B5', f'Load balancing ({kind} instead of global-batch) changes loss little.',
                                center, variant, threshold, noise, _load_note(variant, center)))
  claims.append(_collapse_check(center, b5[3] if len(b5) > 3 else None, noise))
  claims.append(_b6_claim(b6, noise))
  return claims, {'sigma': noise.sigma, 'dof': noise.dof, 'threshold': threshold,
                  'paired_sigma': noise.paired.sigma if noise.paired else None,
                  'paired_dof': noise.paired.dof if noise.paired else 0, 'noise': noise,
                  'check': noise_check(noise_rows(g))}


def noise_rows(g: dict) -> list[dict]:
  """The rows the noise is estimated from: every grid point (deduplicated) but the learning-rate sweep's and the
  no-balancing collapse check's (whose variance is its own)."""
  out = {}
  for grid, rows in g.items():
    for r in rows:
      if r is not None and grid != 'LR' and r.get('load_balancing') != 'none':
        out[r['config_hash']] = r
  return list(out.values())


def make_noise(rows: list[dict]) -> Noise:
  """The unpaired pooled noise with the paired (block-design) noise attached."""
  sigma, dof, seeds = block_sigma(rows)
  return Noise(*pooled_sigma(rows), paired=Noise(sigma, dof), seed_set=seeds)


def _load_note(variant, center):
  if variant is None or center is None or variant.get('load_max_over_mean') is None \
      or center.get('load_max_over_mean') is None:
    return ''
  return f'; max/mean load {variant["load_max_over_mean"]:.2f} (centre {center["load_max_over_mean"]:.2f})'


def _measured_active(b4):
  het = b4[1] if len(b4) > 1 else None
  if het is None or het.get('n_active_measured') is None:
    return ''
  return (f'; N_active measured {accounting.human(het["n_active_measured"])} vs {accounting.human(het["n_active"])} '
          'expected under uniform routing')


def _collapse_check(center, none, noise):
  statement = 'Check (not a paper claim): without load balancing the router collapses: load concentrates, loss rises.'
  expected = 'Δ = L(none) − L(global-batch) > 0, max/mean load higher'
  if center is None or none is None:
    return _missing('C-B5n', statement, expected, 'B5')
  noise = noise.for_pair(center, none)
  delta, hw = none['loss_mean'] - center['loss_mean'], noise.half_width(center, none)
  verdict = _direction(delta, hw, +1)
  load_up = (none.get('load_max_over_mean') or 0) > (center.get('load_max_over_mean') or 0)
  if verdict == 'holds' and not load_up:
    verdict = 'inconclusive'
  m, i = _fmt(delta, hw)
  dead = none.get('dead_experts')
  c = Claim('C-B5n', statement, expected, m, i, verdict,
            f'{none["name"]} {none["loss_mean"]:.4f} vs {center["name"]} {center["loss_mean"]:.4f}'
            + _load_note(none, center) + ('' if dead is None else f'; dead experts per layer {dead:g}'),
            p=_p_direction(delta, noise.se(center, none), noise.dof, -1 if verdict == 'contradicted' else +1))
  if verdict == 'inconclusive':
    c.needs = _needs_direction(delta, noise)
  return c


def _diminishing(b1):
  if not b1 or not all(b1):
    return ''
  pts = _ordered(b1, 'num_experts')
  gains = [(a['loss_mean'] - b['loss_mean']) / math.log2(b['num_experts'] / a['num_experts']) for a, b in zip(pts, pts[1:])]
  shrinking = all(x >= y for x, y in zip(gains, gains[1:]))
  return 'gain per doubling of E: ' + ', '.join(f'{x:+.4f}' for x in gains) + (' (diminishing)' if shrinking else '')


def _a4_claim(points, noise):
  statement = ('The top design of the §5 ranking beats the median of random feasible designs of matched N_total '
               '(within 3%) (A4).')
  expected = 'Δ = median L(random) − L(top) > 0'
  if not points or any(p is None for p in points):
    return _missing('C-A4', statement, expected, 'A4')
  top, rand = points[0], sorted(points[1:], key=lambda r: r['loss_mean'])
  if not rand:
    return Claim('C-A4', statement, expected, '-', '-', 'inconclusive',
                 'no random design within 3% of the top design\'s N_total: widen the A4 search grid')
  median = rand[len(rand) // 2] if len(rand) % 2 else None
  noise = noise.for_pair(top, *rand)
  delta = float(np.median([r['loss_mean'] for r in rand])) - top['loss_mean']
  hw = noise.half_width(top, median or {'seeds': min(r['seeds'] for r in rand)})
  se = noise.se(top, median or {'seeds': min(r['seeds'] for r in rand)})
  m, i = _fmt(delta, hw)
  verdict = _direction(delta, hw, +1)
  c = Claim('C-A4', statement, expected, m, i, verdict,
            f'top {top["name"]} {top["loss_mean"]:.4f} (N_total {accounting.human(top["n_total"])}); random: ' +
            ', '.join(f'{r["name"]} {r["loss_mean"]:.4f} ({accounting.human(r["n_total"])})' for r in rand),
            p=_p_direction(delta, se, noise.dof, -1 if verdict == 'contradicted' else +1))
  if verdict == 'inconclusive':
    c.needs = _needs_direction(delta, noise)
  return c


def _kappa_claim(fits):
  statement = 'Across the runs, the fitted κ < 1: total parameters matter beyond the active ones (§3.3).'
  family, fit = None, None
  for fam in ('all', 'A', 'B'):
    if 'effective_params' in (fits or {}).get(fam, {}):
      family, fit = fam, fits[fam]['effective_params']
      break
  if fit is None:
    return Claim('C-A3', statement, 'κ < 1', '-', '-', 'inconclusive',
                 f'no effective_params fit (needs {POINTS_PER_PARAMETER} configurations per parameter)',
                 needs=f'{POINTS_PER_PARAMETER * 5} default-design configurations')
  if not beats_baselines(fits[family], 'effective_params'):
    return Claim('C-A3', statement, 'κ < 1', f'κ = {fit.values["kappa"]:.3f}', '-', 'inconclusive',
                 f'the effective_params fit ({family} runs) does not predict held-out configurations (leave-one-out '
                 'and the largest N_total) better than the constant and log-linear baselines, so no verdict rests on it',
                 needs='configurations spanning a wider N_total range than the seed noise hides (a larger scale)')
  kappa = fit.values['kappa']
  lo, hi = fit.intervals.get('kappa', (None, None))
  interval = '-' if lo is None else f'[{lo:.3f}, {hi:.3f}]'
  verdict = 'inconclusive' if hi is None else 'holds' if hi < 0.95 else 'contradicted' if lo > 0.95 else 'inconclusive'
  return Claim('C-A3', statement, 'κ < 1 (95% upper bound < 0.95)', f'κ = {kappa:.3f}', interval, verdict,
               f'fit over {fit.n} configurations ({family} runs), LOO RMSE {fit.loo_rmse:.4f}')


# ---- C-B2: where the best expert size sits, from the seed noise ----

B2_DRAWS = 4000


def argmin_interval(points: list[dict], noise: Noise, seed: int = 0) -> tuple[float, float, np.ndarray] | None:
  """95% interval of the best expert size (d_exp at the lowest loss) under the seed noise, and P(argmin) per point.

  Each draw perturbs every point's seed mean by sigma/sqrt(n) times a t-distributed shock with
  the pooled degrees of freedom (one chi-square per draw: sigma is one shared estimate); the
  interval is the 2.5 and 97.5 percentiles of log2 d_exp at the draws' minima.
  """
  noise = noise.for_pair(*points)  # the seed's shared effect moves every point alike: it never moves the argmin
  if not noise.usable:
    return None
  rng = np.random.default_rng(seed)
  means = np.array([p['loss_mean'] for p in points])
  scale = noise.sigma / np.sqrt([p['seeds'] for p in points])
  shocks = rng.standard_normal((B2_DRAWS, len(points))) * np.sqrt(noise.dof / rng.chisquare(noise.dof, (B2_DRAWS, 1)))
  best = np.argmin(means + shocks * scale, axis=1)
  sizes = np.log2([p['expert_hidden'] for p in points])
  lo, hi = np.percentile(sizes[best], [2.5, 97.5])
  return float(2 ** lo), float(2 ** hi), np.bincount(best, minlength=len(points)) / B2_DRAWS


def _b2_group(points, noise):
  pts = _ordered(points, 'expert_hidden')
  interval = argmin_interval(pts, noise)
  text = ', '.join(f'{p["expert_hidden"]:g}: {p["loss_mean"]:.4f}' for p in pts)
  return pts, interval, text


def _b2_claims(g, noise):
  statement = ('The best expert size depends on the active scale, not on s: at one active scale, the argmin d_exp '
               'intervals at s = 8 and s = 32 overlap (B2, B2s32).')
  expected = 'overlapping, informative argmin intervals'
  s8, s32, wide = g.get('B2'), g.get('B2s32'), g.get('B2p')
  out = []
  if not s8 or not s32 or any(r is None for r in s8 + s32):
    out.append(Claim('C-B2', statement, expected, '-', '-', 'inconclusive', 'runs of grids B2 and B2s32 are missing'))
  else:
    (p8, i8, t8), (p32, i32, t32) = _b2_group(s8, noise), _b2_group(s32, noise)
    if i8 is None or i32 is None:
      out.append(Claim('C-B2', statement, expected, '-', '-', 'inconclusive', 'no usable noise estimate'))
    else:
      # An interval is informative when it leaves out at least one end of its grid: pure noise spreads the
      # argmin over the whole grid, and "overlap" between two such intervals would say nothing.
      informative = [i[1] < p[-1]['expert_hidden'] or i[0] > p[0]['expert_hidden'] for i, p in ((i8, p8), (i32, p32))]
      disjoint = i8[1] < i32[0] or i32[1] < i8[0]
      verdict = 'contradicted' if disjoint else 'holds' if all(informative) else 'inconclusive'
      measured = f'argmin d_exp s=8: [{i8[0]:.3g}, {i8[1]:.3g}]; s=32: [{i32[0]:.3g}, {i32[1]:.3g}]'
      c = Claim('C-B2', statement, expected, measured, '(95% intervals of the argmin)', verdict,
                f's=8 (d_exp: loss) {t8}; s=32 {t32}' + ('' if all(informative) else
                                                          '; an interval covers its whole grid (noise dominates)'))
      if verdict == 'inconclusive':
        c.needs = 'more seeds, or a scale where the loss curvature over d_exp exceeds the seed noise'
      out.append(c)
  statement2 = ('The best expert size moves with the active scale (B2 vs B2p at a 1.5x wider model, s = 8): '
                'the argmin d_exp intervals are disjoint.')
  if not s8 or not wide or any(r is None for r in s8 + wide):
    out.append(Claim('C-B2a', statement2, 'disjoint argmin intervals', '-', '-', 'inconclusive',
                     'runs of grids B2 and B2p are missing'))
  else:
    (p8, i8, t8), (pw, iw, tw) = _b2_group(s8, noise), _b2_group(wide, noise)
    if i8 is None or iw is None:
      out.append(Claim('C-B2a', statement2, 'disjoint argmin intervals', '-', '-', 'inconclusive',
                       'no usable noise estimate'))
    else:
      disjoint = i8[1] < iw[0] or iw[1] < i8[0]
      na, nw = accounting.human(p8[0]['n_active']), accounting.human(pw[0]['n_active'])
      c = Claim('C-B2a', statement2, 'disjoint argmin intervals',
                f'argmin d_exp at N_active {na}: [{i8[0]:.3g}, {i8[1]:.3g}]; at {nw}: [{iw[0]:.3g}, {iw[1]:.3g}]',
                '(95% intervals of the argmin)', 'holds' if disjoint else 'inconclusive',
                f'N_active {na} (d_exp: loss) {t8}; N_active {nw} {tw}')
      if not disjoint:
        c.needs = 'active scales further apart (the gpu scale spans 2.3x in N_active with 7 sizes)'
      out.append(c)
  return out


def _b6_claim(b6, noise):
  statement = ('Dropless training beats token dropping, dose-response: loss falls as the training capacity factor '
               'rises towards dropless (all evaluated dropless) (B6).')
  expected = 'Δ = L(dropless) − L(CF_min) < 0, every step down'
  if len(b6) < 3 or any(r is None for r in b6):
    return _missing('C-B6', statement, expected, 'B6')
  evals = {r.get('eval_drop_policy', 'dropless') for r in b6}
  if evals != {'dropless'}:  # the claim compares training policies under one dropless evaluation
    return Claim('C-B6', statement, expected, '-', '-', 'inconclusive',
                 f'not every B6 run was evaluated dropless ({", ".join(sorted(evals))})')
  pts = [dict(r, capacity=(r.get('train_capacity_factor') or math.inf)) for r in b6]
  c = _trend_claim('C-B6', statement, expected, 'B6', pts, 'capacity', -1, noise)
  c.detail = c.detail.replace('capacity=inf', 'dropless') + ' (all evaluated dropless)'
  return c


# ---- beyond single claims: multiple comparisons, literature, speedup over dense ----

def holm(claims: list[Claim], family_alpha: float = ALPHA) -> dict[str, bool]:
  """{claim key: survives} for the decided verdicts under Holm's step-down correction.

  The family is every claim with a p-value (inconclusive ones included: they were tested too).
  Each p is first put on the family's scale, p * family_alpha / alpha_i, since equivalence
  verdicts are decided at 5% per one-sided test and directional ones at 2.5%.
  """
  tested = sorted((c.p * family_alpha / c.alpha, i) for i, c in enumerate(claims) if c.p is not None)
  out, m, stopped = {}, len(tested), False
  for rank, (p, i) in enumerate(tested):
    stopped = stopped or p > family_alpha / (m - rank)
    if claims[i].verdict != 'inconclusive':
      out[_key(claims[i], i)] = not stopped
  return out


def _key(c: Claim, i: int) -> str:
  return f'{c.id}#{i}'


# The literature's side of each claim ([R]: from SCIENCE.md's reading of the sources, not re-checked here).
LITERATURE = {
    'C-A1': ('holds (their main finding)', 'n/a (fixes N_active)', '-', '-', 'n/a (fixes E_K)'),
    'C-A2': ('holds, small (more experts shrink depth and width)', '-', '-', '-', '-'),
    'C-A2b': ('fewer experts ("minimize n_exp")', 'best d_exp set by N_active', 'finer experts help',
              'finer segmentation helps', 'finer helps up to G_K ≈ 8-16'),
    'C-A3': ('κ < 1 (loss = f(N_total, s))', 'κ < 1 (total helps at fixed active)', '-', '-',
             'law in N_active and G only'),
    'C-A4': ('their ranking', '-', '-', '-', '-'),
    'C-B1': ('implied (N_total drives loss)', 'holds to active-expert ratio 128', '-', '-', '-'),
    'prior': ('-', 'holds', 'holds', 'holds', 'holds at almost any budget'),
    'C-B2': ('-', 'holds (optimum set by N_active)', '-', '-', 'optimal G grows with compute'),
    'C-B2a': ('-', 'holds', '-', '-', 'holds (optimal G moves with compute)'),
    'C-B3': ('-', 'small effect', 'no gain from a shared expert', 'shared experts help', '-'),
    'C-B4': ('-', 'small effect', '-', '-', '-'),
    'C-B5': ('-', 'small effect', 'LB loss matters', 'aux-free bias beats aux loss', '-'),
    'C-B5n': ('-', '-', 'no LB: routing collapses', '-', '-'),
    'C-B6': ('-', 'dropless gives a consistent gain', 'dropless', 'no token dropping (V3)', '-'),
}
LITERATURE_COLUMNS = ('paper A', 'paper B', 'OLMoE', 'DeepSeekMoE', 'Krajewski et al.')


def literature_table(claims: list[Claim]) -> str:
  lines = ['| claim | ' + ' | '.join(LITERATURE_COLUMNS) + ' | ours |', '|---|' + '---|' * (len(LITERATURE_COLUMNS) + 1)]
  seen = set()
  for c in claims:
    if c.id in seen:
      continue
    seen.add(c.id)
    ours = '; '.join(f'{x.verdict}' + (f' ({x.detail.split(" ")[0]})' if x.id == 'C-B5' else '')
                     for x in claims if x.id == c.id)
    lines.append(f'| {c.id} | ' + ' | '.join(LITERATURE.get(c.id, ('-',) * 5)) + f' | {ours} |')
  return '\n'.join(lines) + '\n'


def tokens_to_reach(curve: list[dict], target: float) -> tuple[float | None, str]:
  """Tokens at which a decay curve reaches loss `target` (log-linear interpolation between its points).

  Returns (tokens, '') inside the curve, (first tokens, '<') if its first point is already below,
  (None, '>') if it never gets there.
  """
  pts = [(p['tokens'], p['loss']) for p in curve if p.get('tokens') and p.get('loss') is not None]
  if not pts:
    return None, '>'
  if pts[0][1] <= target:
    return float(pts[0][0]), '<'
  for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
    if l1 <= target < l0:
      frac = (l0 - target) / (l0 - l1)
      return float(math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))), ''
  return None, '>'


def speedup_table(g: dict) -> str:
  """Effective speedup of each B1 MoE over the dense baseline: dense's tokens / the MoE's tokens to reach dense's loss."""
  b1 = g.get('B1') or []
  if len(b1) < 2 or b1[0] is None or not b1[0].get('decay_curve'):
    return 'No B1 runs with decay curves: no speedup to report.\n'
  dense = b1[0]
  d_tokens, d_loss = dense['decay_curve'][-1]['tokens'], dense['decay_curve'][-1]['loss']
  lines = [f'Dense baseline `{dense["name"]}`: {d_loss:.4f} nats after {accounting.human(d_tokens)} tokens. '
           'Speedup = dense tokens / tokens the MoE needs to reach that loss, read off the MoE\'s decay-branch curve '
           '(held-out loss after decays branched at 1/4, 1/2 and the full run; log-linear between them).', '',
           '| MoE | s | N_total | loss by tokens (mean of seeds) | tokens to reach dense | speedup |',
           '|---|---:|---:|---|---:|---:|']
  for r in b1[1:]:
    if r is None or not r.get('decay_curve'):
      continue
    tokens, where = tokens_to_reach(r['decay_curve'], d_loss)
    curve = ', '.join(f'{accounting.human(p["tokens"])}: {p["loss"]:.4f}' for p in r['decay_curve'])
    if where == '>':
      reach, speed = 'not reached', '< 1x'
    elif where == '<':
      reach, speed = f'≤ {accounting.human(tokens)}', f'≥ {d_tokens / tokens:.1f}x'
    else:
      reach, speed = accounting.human(tokens), f'{d_tokens / tokens:.2f}x'
    lines.append(f'| {r["name"]} | {r["sparsity"]:g} | {accounting.human(r["n_total"])} | {curve} | {reach} | {speed} |')
  return '\n'.join(lines) + '\n'


def lr_table(g: dict) -> str:
  """The learning-rate sweep (grid LR): loss per anchor and rate, the best rate, and the vertex of a parabola
  in log2(rate) through the best point and its neighbours (only when the best is interior: a bracketed optimum)."""
  anchors: dict[str, list[dict]] = {}
  for r in g.get('LR') or []:
    if r is not None:
      anchors.setdefault(r['name'].split('-lr')[0].split('-seed')[0], []).append(r)
  seed0 = lambda r: (r.get('seed_losses') or {}).get('0/0', r['loss_mean'])  # every column at seed 0
  if not anchors:
    return 'No runs of grid LR.\n'
  rates = sorted({r['peak_learning_rate'] for rs in anchors.values() for r in rs})
  lines = ['| anchor | N_total | ' + ' | '.join(f'LR {x:g}' for x in rates) + ' | best | parabola vertex |',
           '|---|---:|' + '---:|' * len(rates) + '---:|---:|']
  for name, rs in anchors.items():
    by_rate = {r['peak_learning_rate']: seed0(r) for r in rs}
    best = min(by_rate, key=by_rate.get)
    known = sorted(by_rate)
    i = known.index(best)
    vertex = '-'
    if 0 < i < len(known) - 1:  # three points around an interior minimum
      x = np.log2(known[i - 1:i + 2])
      y = [by_rate[k] for k in known[i - 1:i + 2]]
      a, b, _ = np.polyfit(x, y, 2)
      vertex = f'{2 ** (-b / (2 * a)):.2g}' if a > 0 else '-'
    else:
      vertex = 'not bracketed'
    cells = ' | '.join(f'{by_rate[x]:.4f}' if x in by_rate else '-' for x in rates)
    lines.append(f'| {name} | {accounting.human(rs[0]["n_total"])} | {cells} | {best:g} | {vertex} |')
  return '\n'.join(lines) + '\n'


def compute_summary(rows: list[dict]) -> str:
  """The measured compute of everything under the root: runs, wall time, training FLOPs."""
  runs = sum(r['seeds'] for r in rows)
  wall = sum(r.get('wall_s') or 0.0 for r in rows)
  flops = sum((r.get('flops_per_token') or 0) * (r.get('tokens') or 0) * r['seeds'] for r in rows)
  return (f'Compute: {runs} runs, {wall / 3600:.2f} h of training wall time (summed `train.wall_s`, which includes '
          f'compilation, decay branches and their held-out scoring), {flops:.3g} training FLOPs (6 N_active-style '
          'accounting, `moejax.accounting`).')


def scaling_rows(rows: list[dict]) -> list[dict]:
  """The MoE rows with the default design choices (global-batch balancing, dropless, no shared and uniform
  experts): the B3-B6 variants change other axes than the counts the laws are about."""
  return [r for r in rows if (r.get('num_experts') or 0) > 0 and r.get('load_balancing') == 'global_batch'
          and r.get('drop_policy') == 'dropless' and r.get('eval_drop_policy') == 'dropless'
          and not r.get('num_shared_experts')
          and not r.get('moe.expert_size_classes')]


POINTS_PER_PARAMETER = 5  # a form is fitted only with at least this many configurations per free parameter
BASELINES = ('constant', 'log_linear')
FAMILIES = {'A': ('A1', 'A2a', 'A2b', 'A4'), 'B': ('B1', 'B2', 'B2s32', 'B2p')}


def family_rows(rows: list[dict], g: dict) -> dict[str, list[dict]]:
  """{'A': paper A's grids, 'B': paper B's count grids, 'all': both} (default-design MoE rows, deduplicated).

  Only grid points enter: runs outside the grids (the learning-rate sweep's other rates) would mix protocols.
  """
  default = {r['config_hash'] for r in scaling_rows(rows)}
  out, every = {}, {}
  for fam, grids in FAMILIES.items():
    chosen = {r['config_hash']: r for grid in grids for r in (g.get(grid) or []) if r and r['config_hash'] in default}
    out[fam] = list(chosen.values())
    every.update(chosen)
  out['all'] = list(every.values())
  return out


def fit_laws(rows: list[dict], bootstrap: int = 100, starts: int = 32, loo: bool = True) -> dict[str, scaling.Fit]:
  """The baselines and every form the default-design MoE rows support (>= 5 configurations per free parameter)."""
  x, y = scaling.inputs_from_rows(rows)
  fits = {}
  for name, form in scaling.FORMS.items():
    if len(y) >= POINTS_PER_PARAMETER * len(form.raw_names) and len(y) > len(form.raw_names) + 1:
      fits[name] = scaling.fit(name, x, y, max_starts=starts, bootstrap=bootstrap, loo=loo)
  return fits


def beats_baselines(fits: dict[str, scaling.Fit], name: str) -> bool:
  """Whether form `name` predicts held-out configurations better than every baseline fitted beside it:
  lower leave-one-out RMSE and, where scored, lower RMSE on the largest-N_total configurations."""
  fit = fits.get(name)
  if fit is None or fit.loo_rmse is None:
    return False
  rivals = [fits[b] for b in BASELINES if b in fits and fits[b].loo_rmse is not None]
  if not rivals:
    return False
  if fit.loo_rmse >= min(r.loo_rmse for r in rivals):
    return False
  extrap = [r.extrapolation_rmse for r in rivals if r.extrapolation_rmse is not None]
  return fit.extrapolation_rmse is None or not extrap or fit.extrapolation_rmse < min(extrap)


def residuals_by_k(fits: dict[str, scaling.Fit], rows: list[dict]) -> str:
  """Mean in-sample residual (prediction - measurement, nats) of each form by top-k: a k-dependent bias shows here."""
  ks = sorted({r.get('experts_per_token') or 0 for r in rows})
  lines = ['| form | ' + ' | '.join(f'k={k}' for k in ks) + ' |', '|---|' + '---:|' * len(ks)]
  for name, f in fits.items():
    if f.residuals is None:
      continue
    cells = []
    for k in ks:
      res = [e for e, r in zip(f.residuals, rows) if (r.get('experts_per_token') or 0) == k]
      cells.append(f'{np.mean(res):+.4f} ({len(res)})' if res else '-')
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _noise_check_lines(check: dict | None) -> list[str]:
  if not check or check['robust_sigma'] is None:
    return []
  if not check['outliers']:
    return [f'Noise check: no configuration\'s seed spread is out of line (beyond the 1 − 0.05/C quantile at the '
            'median-based '
            f'σ = {check["robust_sigma"]:.4f} ({check["configurations"]} configurations): the noise looks homogeneous.',
            '']
  listed = ', '.join(f'{name} ({spread:.3f})' for name, spread in check['outliers'])
  return [f'Noise check (a diagnostic; verdicts use σ above): {len(check["outliers"])} of {check["configurations"]} '
          f'configurations have seed spreads beyond the 1 − 0.05/C quantile (5% family-wise) expected at the '
          f'median-based σ = '
          f'{check["robust_sigma"]:.4f}: {listed} (max − min over seeds, nats). The noise is not homogeneous; these '
          'points inflate the pooled σ, so verdicts on the other points are conservative, and verdicts involving '
          'these points may understate their own noise.', '']


def markdown(claims: list[Claim], noise: dict, fits: dict[str, dict[str, scaling.Fit]], header: str = '',
             families: dict[str, list[dict]] | None = None, speedup: str = '', lr: str = '') -> str:
  sigma = '-' if noise['sigma'] is None else f'{noise["sigma"]:.4f}'
  threshold = '-' if noise['threshold'] is None else f'{noise["threshold"]:.4f}'
  survives = holm(claims)
  decided = sum(c.verdict != 'inconclusive' for c in claims)
  tested = sum(c.p is not None for c in claims)
  paired = ('-' if noise.get('paired_sigma') is None else
            f'{noise["paired_sigma"]:.4f} nats ({noise["paired_dof"]} degrees of freedom)')
  lines = [header, '## Claims', '',
           f'Seed noise: a seed sets both initialization and data order, so configurations run at the same seeds '
           f'are paired (a randomized complete block design, seeds as blocks). Differences between such '
           f'configurations use the residual σ of the model loss = configuration + seed: σ = {paired}; others '
           f'use the pooled seed standard deviation σ = {sigma} nats ({noise["dof"]} degrees of freedom), which also '
           'carries the seed\'s shared effect. Small-effect margin '
           f'T = {threshold} (half the mean gain of one doubling of E in B1). Intervals are 95% t intervals '
           f'(± t(0.975, dof) σ √(1/n_a + 1/n_b)); with fewer than {MIN_DOF} degrees of freedom there are none and '
           'every verdict is inconclusive. Small effects are equivalence tests (TOST at 5%: the 90% interval inside '
           '±T). The monotonicity rule applies to "holds" and "contradicted" alike. p is the one-sided p-value of '
           'the decided direction (for equivalence: the larger of the two TOST p-values).', '',
           *_noise_check_lines(noise.get('check')),
           f'Multiple comparisons: {decided} of {len(claims)} verdicts are decided, each at the 2.5% one-sided level on '
           f'its own (equivalence: 5% per one-sided test). Under Holm\'s step-down correction over all {tested} '
           f'tested claims (family-wise 2.5%, equivalence p-values put on that scale), {sum(survives.values())} of the '
           f'{len(survives)} decided verdicts with a p-value survive (column "Holm"; the argmin verdicts C-B2/C-B2a rest '
           'on simulated intervals, not a p-value). A verdict marked "hinges" changes if one point of its series is '
           'dropped.', '',
           '| claim | statement | expected | measured Δ (nats) | 95% interval | verdict | p | Holm | detail | '
           'to decide at this scale |',
           '|---|---|---|---:|---|---|---:|---|---|---|']
  for i, c in enumerate(claims):
    p = '-' if c.p is None else f'{c.p:.2g}'
    h = {True: 'yes', False: 'no'}.get(survives.get(_key(c, i)), '-')
    detail = c.detail + ''.join(f'; **{f}**' for f in c.flags)
    lines.append(f'| {c.id} | {c.statement} | {c.expected} | {c.measured} | {c.interval} | **{c.verdict}** | {p} | '
                 f'{h} | {detail} | {c.needs or "-"} |')
  lines += ['', '## The literature and ours', '',
            'Each claim\'s side in the literature ([R]: SCIENCE.md §0-§4, not re-checked here) and our verdict at this '
            'scale.', '', literature_table(claims)]
  if speedup:
    lines += ['## Effective speedup over dense', '', speedup]
  if lr:
    lines += ['## Learning-rate sweep (grid LR)', '', 'Held-out loss at seed 0 for every rate (the rate the scale '
              'uses is the grid point itself; its seed-1 run is not in this table).', '', lr]
  lines += ['## Fitted scaling laws', '',
            'Non-embedding counts, one point per configuration (seed mean); MoE runs with the default design '
            '(global-batch balancing, dropless, no shared or heterogeneous experts); see moejax/scaling.py. '
            'Fitted per grid family: A (paper A\'s grids), B (paper B\'s count grids B1/B2), and all together. '
            f'A form is fitted only with at least {POINTS_PER_PARAMETER} configurations per free parameter, always '
            'beside the constant and log-linear baselines; it is scored by leave-one-out RMSE and by refitting without '
            'the largest-N_total 20% of configurations and predicting them. A form that does not beat both baselines '
            'on both supports no verdict.', '']
  for fam, fam_fits in (fits or {}).items():
    n = len((families or {}).get(fam, []))
    lines += [f'### Family {fam} ({n} configurations)', '']
    if not fam_fits:
      lines += ['Too few configurations to fit any form.', '']
      continue
    lines += [scaling.markdown(list(fam_fits.values()))]
    better = [name for name in fam_fits if name not in BASELINES and beats_baselines(fam_fits, name)]
    lines += [f'Forms that beat both baselines: {", ".join(better) or "none"}.', '',
              'Mean residual by top-k (prediction − measurement, nats; configurations in brackets):', '',
              residuals_by_k(fam_fits, (families or {}).get(fam, []))]
  return '\n'.join(lines)


def run(root: str, scale: str, out: str, bootstrap: int = 100, fit_starts: int = 32, loo: bool = True) -> str:
  """Writes OUT/claims.md (claims + fits), OUT/report.md and the figures; returns the claims Markdown.

  loo=False skips the leave-one-out refits (then no fit beats its baselines and C-A3 is inconclusive).
  """
  gathered = results.gather(root)
  if not gathered.records:
    raise DataError(f'no complete result.json under {root}; run the paper grids first')
  rows, _ = results.table(gathered.records)
  g = grid_rows(rows, scale)
  families = family_rows(rows, g)
  fits = {fam: fit_laws(fam_rows, bootstrap, fit_starts, loo) for fam, fam_rows in families.items()}
  claims, noise = evaluate(rows, scale, fits)
  platforms = sorted({f'{r["platform"]["device_kind"]} ({r["platform"]["backend"]}, jax {r["platform"]["jax"]})'
                      for r in gathered.records if r.get('platform')})
  fingerprints = sorted({r['data']['fingerprint'][:12] for r in gathered.records if r.get('data')})
  header = (f'# Claims at scale `{scale}`\n\n{len(gathered.records)} runs in {len(rows)} configurations under '
            f'`{root}`; machine: {", ".join(platforms) or "?"}; corpus sha256 {", ".join(fingerprints) or "?"}; '
            f'evaluated {datetime.date.today().isoformat()}. {compute_summary(rows)} Figures and the full table: '
            '[report.md](report.md).\n')
  text = markdown(claims, noise, fits, header, families, speedup_table(g), lr_table(g))
  report.write_report(root, out, extra=text.split('\n', 2)[2], figure_rows=lambda _: families['all'],
                      figure_note='Figures show the default-design MoE grid points (as the fits); the table has '
                      'every run.',
                      gathered=gathered, grids=g, noise=noise['noise'])
  files.atomic_write(os.path.join(out, 'claims.md'), text)
  return text


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.root or not FLAGS.out:
    raise app.UsageError('--root and --out are required')
  sys.stdout.write(run(FLAGS.root, FLAGS.scale, FLAGS.out, FLAGS.bootstrap))


if __name__ == '__main__':
  from moejax import cli  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('root', None, 'Results root holding the paper-grid runs.')
  flags.DEFINE_string('scale', 'tiny', 'Scale the runs were made at (tiny, gpu, paper).')
  flags.DEFINE_string('out', None, 'Directory for claims.md, report.md and the figures.')
  flags.DEFINE_integer('bootstrap', 100, 'Bootstrap resamples for the fit intervals.')
  cli.cli(_main)

"""The two papers' checkable claims (SCIENCE.md §4), evaluated on the paper grids' rows.

For every claim: the expected direction, the measured difference in held-out loss (nats/token),
a 95% interval, a one-sided p-value and a verdict (`moejax.studies.verdicts`), with the noise of
`moejax.studies.statistics`. T = 0.25 |L(s=16) - L(s=4)| from B1: half the mean gain of one
doubling of E at this scale. For trend claims, whether the verdict hinges on one point; for
undecided claims, how many seeds per point would decide them at this scale.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moejax.model import accounting
from moejax.studies import fits as fits_lib, grids
from moejax.studies.statistics import MIN_DOF, argmin_interval, make_class_noise, noise_check, t_quantile, t_sf
from moejax.studies.verdicts import (Claim, direction, fmt_delta, missing, needs_direction, ordered, p_direction,
                                     seed_argmins, seed_check, seed_contrast, set_numbers, small_effect, trend_claim)

def evaluate(rows: list[dict], scale: str, fits: dict[str, dict[str, fits_lib.Fit]] | None = None
             ) -> tuple[list[Claim], dict]:
  """Every claim of SCIENCE.md §4 on `rows` (results.table rows); returns (claims, noise info)."""
  g = grids.grid_rows(rows, scale)
  noise = make_class_noise(grids.noise_rows(g))
  claims = []
  claims.append(trend_claim('C-A1', 'At fixed N_total and core, loss rises monotonically with s (A1).',
                             'Δ = L(s_max) − L(s_min) > 0', 'A1', g.get('A1'), 'sparsity', +1, noise))
  claims.append(trend_claim('C-A2', 'At fixed N_total, s and G, loss rises slightly with E (A2a: width shrinks).',
                             'Δ = L(E_max) − L(E_min) > 0, small', 'A2a', g.get('A2a'), 'num_experts', +1, noise))
  a2b = trend_claim('C-A2b', 'Expert size free (fixed L, d, N_total, N_active, s): paper A predicts equal or worse '
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
  claims.append(dataclasses.replace(_kappa_claim(fits), kind='fit'))
  claims.append(_a4_claim(g.get('A4'), noise))
  b1_all = g.get('B1')
  dense, b1 = (b1_all[0], b1_all[1:]) if b1_all else (None, None)  # B1 starts with the true dense baseline
  claims.append(trend_claim('C-B1', 'At fixed N_active, loss falls monotonically with E (B1), diminishing returns.',
                             'Δ = L(E_max) − L(E_min) < 0', 'B1', b1, 'num_experts', -1, noise,
                             note=_diminishing(b1)))
  threshold = grids.equivalence_margin(scale)  # fixed in advance by the grid files, never from these runs
  statement = 'MoE beats the active-matched dense model (B1: dense FFN of hidden k * d_exp vs s = 4).'
  lo4 = next((r for r in (b1 or []) if r and r['sparsity'] == 4.0), None)
  if dense is None or lo4 is None:
    claims.append(missing('prior', statement, 'Δ = L(s=4) − L(dense) < 0', 'B1'))
  else:
    pair = noise.for_pair(dense, lo4)
    delta, hw = lo4['loss_mean'] - dense['loss_mean'], pair.half_width(dense, lo4)
    m, i = fmt_delta(delta, hw)
    verdict = direction(delta, hw, -1)
    c = Claim('prior', statement, 'Δ = L(s=4) − L(dense) < 0', m, i, verdict,
              f'dense {dense["loss_mean"]:.4f}, s=4 {lo4["loss_mean"]:.4f}',
              p=p_direction(delta, pair.se(dense, lo4), pair.dof, +1 if verdict == 'contradicted' else -1))
    set_numbers(c, delta, pair, dense, lo4, 'direction')
    if verdict == 'inconclusive':
      c.needs = needs_direction(delta, pair)
    claims.append(c)
  claims.extend(_b2_claims(g, noise))
  center = next((r for r in (b1 or []) if r and r['sparsity'] == 16.0), None)  # B1 at s = 16, the B4-B6 reference
  b3, b4, b5, b6 = (g.get(k) or [] for k in ('B3', 'B4', 'B5', 'B6'))
  claims.append(small_effect('C-B3', 'B3', 'A shared expert instead of one routed expert changes loss little.',
                              b3[0] if b3 else None, b3[1] if len(b3) > 1 else None, threshold, noise))
  claims.append(small_effect('C-B4', 'B4', 'Heterogeneous expert sizes change loss little.', center,
                              b4[1] if len(b4) > 1 else None, threshold, noise, _measured_active(b4)))
  for variant, kind in zip(b5[1:3] + [None, None], ('sequence', 'aux_free')):
    claims.append(small_effect('C-B5', 'B5', f'Load balancing ({kind} instead of global-batch) changes loss little.',
                                center, variant, threshold, noise, _load_note(variant, center)))
  claims.append(_collapse_check(center, b5[3] if len(b5) > 3 else None, noise))
  claims.append(_b6_claim(b6, noise))
  seed_check(claims)  # no decided verdict rests on one seed either
  classes = {name: {'sigma': n.sigma, 'dof': n.dof, 'paired_sigma': n.paired.sigma if n.paired else None,
                    'paired_dof': n.paired.dof if n.paired else 0,
                    'configurations': sum(1 for r in grids.noise_rows(g) if (r.get('noise_class') or 'default') == name)}
             for name, n in noise.classes.items()}
  return claims, {'classes': classes, 'threshold': threshold, 'noise': noise, 'check': noise_check(grids.noise_rows(g))}


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
    return missing('C-B5n', statement, expected, 'B5')
  noise = noise.for_pair(center, none)
  delta, hw = none['loss_mean'] - center['loss_mean'], noise.half_width(center, none)
  verdict = direction(delta, hw, +1)
  load_up = (none.get('load_max_over_mean') or 0) > (center.get('load_max_over_mean') or 0)
  if verdict == 'holds' and not load_up:
    verdict = 'inconclusive'
  m, i = fmt_delta(delta, hw)
  dead = none.get('dead_experts')
  c = Claim('C-B5n', statement, expected, m, i, verdict,
            f'{none["name"]} {none["loss_mean"]:.4f} vs {center["name"]} {center["loss_mean"]:.4f}'
            + _load_note(none, center) + ('' if dead is None else f'; dead experts per layer {dead:g}'),
            p=p_direction(delta, noise.se(center, none), noise.dof, -1 if verdict == 'contradicted' else +1))
  set_numbers(c, delta, noise, center, none, 'direction')
  if verdict == 'inconclusive':
    c.needs = needs_direction(delta, noise)
  return c


def _diminishing(b1):
  if not b1 or not all(b1):
    return ''
  pts = ordered(b1, 'num_experts')
  gains = [(a['loss_mean'] - b['loss_mean']) / math.log2(b['num_experts'] / a['num_experts']) for a, b in zip(pts, pts[1:])]
  shrinking = all(x >= y for x, y in zip(gains, gains[1:]))
  return 'gain per doubling of E: ' + ', '.join(f'{x:+.4f}' for x in gains) + (' (diminishing)' if shrinking else '')


def _a4_claim(points, noise):
  """The top design against the distribution of random designs: d_i = L(random_i) - L(top); the mean of d over the
  random designs with se^2 = var(d) / n + sigma_top^2 / n_top (the spread between designs, then the top's own
  seed noise) on n - 1 degrees of freedom (so fewer than MIN_DOF + 1 random designs cannot decide)."""
  statement = ('The top design of the §5 ranking beats random feasible designs of matched N_total (within 3%): '
               'the mean over the random designs\' distribution (A4).')
  expected = 'Δ = mean L(random) − L(top) > 0'
  if not points or any(p is None for p in points):
    return missing('C-A4', statement, expected, 'A4')
  top, rand = points[0], sorted(points[1:], key=lambda r: r['loss_mean'])
  if not rand:
    return Claim('C-A4', statement, expected, '-', '-', 'inconclusive',
                 'no random design within 3% of the top design\'s N_total: widen the A4 search grid')
  d = np.array([r['loss_mean'] - top['loss_mean'] for r in rand])
  delta = float(d.mean())
  own = noise.of(top) if hasattr(noise, 'of') else noise
  dof = len(d) - 1
  hw = se = p = None
  if dof >= 1 and own.usable:
    se = math.sqrt(float(np.var(d, ddof=1)) / len(d) + own.sigma ** 2 / top['seeds'])
    if dof >= MIN_DOF:
      hw = t_quantile(0.975, dof) * se
  m, i = fmt_delta(delta, hw)
  verdict = direction(delta, hw, +1)
  if se:
    p = t_sf((delta if verdict != 'contradicted' else -delta) / se, dof)
  c = Claim('C-A4', statement, expected, m, i, verdict,
            f'top {top["name"]} {top["loss_mean"]:.4f} (N_total {accounting.human(top["n_total"])}); random: ' +
            ', '.join(f'{r["name"]} {r["loss_mean"]:.4f} ({accounting.human(r["n_total"])})' for r in rand) +
            (f'; spread between random designs {float(np.std(d, ddof=1)):.4f}' if len(d) > 1 else ''), p=p,
            kind='direction', delta=delta, half_width=hw, dof=dof if hw is not None else 0)
  by_seed = [seed_contrast(top, r) for r in rand]  # per seed: the mean over the random designs run at that seed
  seeds = dict.fromkeys(k for x in by_seed for k in x)
  c.per_seed = {k: float(np.mean([x[k] for x in by_seed if k in x])) for k in seeds}
  if verdict == 'inconclusive':
    c.needs = (f'at least {MIN_DOF + 1} random designs (have {len(d)}): the interval is over the designs\' spread'
               if dof < MIN_DOF else needs_direction(delta, noise.for_pair(top, rand[0])))
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
                 f'no effective_params fit (needs {fits_lib.POINTS_PER_PARAMETER} configurations per parameter)',
                 needs=f'{fits_lib.POINTS_PER_PARAMETER * 5} default-design configurations')
  if not fits_lib.beats_baselines(fits[family], 'effective_params'):
    return Claim('C-A3', statement, 'κ < 1', f'κ = {fit.values["kappa"]:.3f}', '-', 'inconclusive',
                 f'the effective_params fit ({family} runs) does not predict held-out configurations (leave-one-out '
                 'and the largest N_total) better than the constant and log-linear baselines, so no verdict rests on it',
                 needs='configurations spanning a wider N_total range than the seed noise hides (a larger scale)')
  kappa = fit.values['kappa']
  if 'kappa' in fit.at_bound:
    return Claim('C-A3', statement, 'κ < 1', f'κ = {kappa:.3f}', f'at its bound {fit.at_bound["kappa"]:g}',
                 'inconclusive', f'κ sits at its bound ({family} runs): the fit does not identify it, so no interval',
                 needs='configurations that separate N_total from N_active more widely')
  lo, hi = fit.intervals.get('kappa', (None, None))
  interval = '-' if lo is None else f'[{lo:.3f}, {hi:.3f}]'
  verdict = 'inconclusive' if hi is None else 'holds' if hi < 0.95 else 'contradicted' if lo > 0.95 else 'inconclusive'
  return Claim('C-A3', statement, 'κ < 1 (95% upper bound < 0.95)', f'κ = {kappa:.3f}', interval, verdict,
               f'fit over {fit.n} configurations ({family} runs), LOO RMSE {fit.loo_rmse:.4f}')


def _b2_group(points, noise):
  pts = ordered(points, 'expert_hidden')
  interval = argmin_interval(pts, noise)
  text = ', '.join(f'{p["expert_hidden"]:g}: {p["loss_mean"]:.4f}' for p in pts)
  return pts, interval, text


def _per_seed_argmins(a, b):
  ma, mb = seed_argmins(a), seed_argmins(b)
  return {k: f'{ma[k]:g} / {mb[k]:g}' for k in ma if k in mb}


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
      c.kind, c.per_seed = 'argmin', _per_seed_argmins(p8, p32)
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
      c.kind, c.per_seed = 'argmin', _per_seed_argmins(p8, pw)
      if not disjoint:
        c.needs = 'active scales further apart (the gpu scale spans 2.3x in N_active with 7 sizes)'
      out.append(c)
  return out


def _b6_claim(b6, noise):
  statement = ('Dropless training beats token dropping, dose-response: loss falls as the training capacity factor '
               'rises towards dropless (all evaluated dropless) (B6).')
  expected = 'Δ = L(dropless) − L(CF_min) < 0, every step down'
  if len(b6) < 3 or any(r is None for r in b6):
    return missing('C-B6', statement, expected, 'B6')
  evals = {r.get('eval_drop_policy', 'dropless') for r in b6}
  if evals != {'dropless'}:  # the claim compares training policies under one dropless evaluation
    return Claim('C-B6', statement, expected, '-', '-', 'inconclusive',
                 f'not every B6 run was evaluated dropless ({", ".join(sorted(evals))})')
  pts = [dict(r, capacity=(r.get('train_capacity_factor') or math.inf)) for r in b6]
  c = trend_claim('C-B6', statement, expected, 'B6', pts, 'capacity', -1, noise)
  c.detail = c.detail.replace('capacity=inf', 'dropless') + ' (all evaluated dropless)'
  return c

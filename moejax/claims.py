"""Evaluate the two papers' checkable claims (SCIENCE.md §4) on a results root.

  python -m moejax.claims --root=runs/papers-tiny --scale=tiny --out=docs/results/tiny

Runs are matched to the grids of experiments/paper_a.py and paper_b.py at --scale by
configuration hash (`moejax.results.config_hash`), so names and seeds do not matter and a
point shared by two grids is one row. For every claim the report gives the expected
direction, the measured difference in held-out loss (nats/token), a 95% interval and a
verdict:

  holds          the interval excludes zero on the expected side and every step of the
                 series goes that way (for "small effect" claims: an equivalence test,
                 the 90% interval lies inside +-T, i.e. TOST at 5%);
  contradicted   the interval excludes zero on the other side and every step goes that
                 way (small effects: |difference| minus the 95% half-width exceeds T);
  inconclusive   otherwise, or the runs are missing, or the noise estimate has fewer than
                 MIN_DOF = 6 degrees of freedom.

Noise: sigma is the pooled sample standard deviation of every configuration with two or
more seeds; a difference of seed means over n_a and n_b seeds gets the t interval
+-t(0.975, dof) * sigma * sqrt(1/n_a + 1/n_b). T = 0.25 |L(s=16) - L(s=4)| from B1: half
the mean gain of one doubling of E at this scale.
The fitted scaling laws (`moejax.scaling`) and the report figures (`moejax.report`)
are written alongside: OUT/claims.md, OUT/report.md, OUT/*.png.
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

from moejax import config as config_lib, metrics as metrics_lib, report, results, scaling
from moejax.errors import DataError

FLAGS = flags.FLAGS

EXPERIMENTS = ('paper_a', 'paper_b')
MIN_DOF = 6  # fewer pooled degrees of freedom than this: no interval, every verdict inconclusive


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


@dataclasses.dataclass(frozen=True)
class Noise:
  """The pooled seed noise: sigma and its degrees of freedom."""
  sigma: float | None
  dof: int

  @property
  def usable(self) -> bool:
    return self.sigma is not None and self.dof >= MIN_DOF

  def half_width(self, a: dict, b: dict, level: float = 0.95) -> float | None:
    """Two-sided `level` t-interval half-width of a difference of seed means over a['seeds'] and b['seeds'] runs."""
    if not self.usable:
      return None
    return t_quantile(0.5 + level / 2, self.dof) * self.sigma * math.sqrt(1 / a['seeds'] + 1 / b['seeds'])


def t_quantile(p: float, dof: int) -> float:
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(stats.t.ppf(p, dof))


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


def _missing(cid, statement, expected, grid):
  return Claim(cid, statement, expected, '-', '-', 'inconclusive', f'runs of grid {grid} are missing')


def _ordered(points, key):
  return sorted(points, key=lambda r: r[key])


def _trend_claim(cid, statement, expected, grid, points, key, sign, noise, note=''):
  if not points or any(p is None for p in points):
    return _missing(cid, statement, expected, grid)
  pts = _ordered(points, key)
  delta = pts[-1]['loss_mean'] - pts[0]['loss_mean']
  hw = noise.half_width(pts[0], pts[-1])
  steps = [b['loss_mean'] - a['loss_mean'] for a, b in zip(pts, pts[1:])]
  verdict = _direction(delta, hw, sign)
  # The same rule both ways: a verdict needs every step in its own direction.
  monotone = all(s * (sign if verdict != 'contradicted' else -sign) > 0 for s in steps)
  if verdict != 'inconclusive' and not monotone:
    verdict = 'inconclusive'
  series = ', '.join(f'{key}={p[key]:g}: {p["loss_mean"]:.4f}' for p in pts)
  measured, interval = _fmt(delta, hw)
  return Claim(cid, statement, expected, measured, interval, verdict,
               f'{series}; {"monotone" if monotone else "not monotone"}' + (f'; {note}' if note else ''))


def _small_effect(cid, grid, statement, center, variant, threshold, noise, extra=''):
  if center is None or variant is None:
    return _missing(cid, statement, 'abs(Δ) < T', grid)
  delta = variant['loss_mean'] - center['loss_mean']
  hw = noise.half_width(center, variant)
  hw90 = noise.half_width(center, variant, level=0.90)  # TOST at 5%: both one-sided tests = the 90% interval
  if threshold is None or hw is None:
    verdict = 'inconclusive'
  elif abs(delta) + hw90 < threshold:
    verdict = 'holds'  # equivalent within the margin T
  elif abs(delta) - hw > threshold:
    verdict = 'contradicted'
  else:
    verdict = 'inconclusive'
  measured, interval = _fmt(delta, hw)
  t = '-' if threshold is None else f'{threshold:.4f}'
  return Claim(cid, statement, f'abs(Δ) < T = {t}', measured, interval, verdict,
               f'{variant["name"]} {variant["loss_mean"]:.4f} vs {center["name"]} {center["loss_mean"]:.4f}' + extra)


def evaluate(rows: list[dict], scale: str, fits: dict[str, scaling.Fit] | None = None) -> tuple[list[Claim], dict]:
  """Every claim of SCIENCE.md §4 on `rows` (results.table rows); returns (claims, noise info)."""
  g = grid_rows(rows, scale)
  noise = Noise(*pooled_sigma(rows))
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
    delta, hw = lo4['loss_mean'] - dense['loss_mean'], noise.half_width(dense, lo4)
    m, i = _fmt(delta, hw)
    claims.append(Claim('prior', statement, 'Δ = L(s=4) − L(dense) < 0', m, i, _direction(delta, hw, -1),
                        f'dense {dense["loss_mean"]:.4f}, s=4 {lo4["loss_mean"]:.4f}'))
  claims.append(_b2_claim(g))
  center = next((r for r in (b1 or []) if r and r['sparsity'] == 16.0), None)  # B1 at s = 16, the B3-B6 reference
  b3, b4, b5, b6 = (g.get(k) or [] for k in ('B3', 'B4', 'B5', 'B6'))
  claims.append(_small_effect('C-B3', 'B3', 'A shared expert instead of one routed expert changes loss little.',
                              center, b3[1] if len(b3) > 1 else None, threshold, noise))
  claims.append(_small_effect('C-B4', 'B4', 'Heterogeneous expert sizes change loss little.', center,
                              b4[1] if len(b4) > 1 else None, threshold, noise))
  for variant in b5[1:]:
    extra = ''
    if variant is not None and variant.get('load_max_over_mean') is not None:
      extra = f'; max/mean load {variant["load_max_over_mean"]:.2f} (center {center["load_max_over_mean"]:.2f})' \
          if center and center.get('load_max_over_mean') is not None else ''
    claims.append(_small_effect('C-B5', 'B5', f'Load balancing ({(variant or {}).get("load_balancing", "?")}) changes loss '
                                'little (no LB may collapse).', center, variant, threshold, noise, extra))
  claims.append(_b6_claim(center, b6, noise))
  return claims, {'sigma': noise.sigma, 'dof': noise.dof, 'threshold': threshold}


def _diminishing(b1):
  if not b1 or not all(b1):
    return ''
  pts = _ordered(b1, 'num_experts')
  gains = [(a['loss_mean'] - b['loss_mean']) / math.log2(b['num_experts'] / a['num_experts']) for a, b in zip(pts, pts[1:])]
  shrinking = all(x >= y for x, y in zip(gains, gains[1:]))
  return 'gain per doubling of E: ' + ', '.join(f'{x:+.4f}' for x in gains) + (' (diminishing)' if shrinking else '')


def _a4_claim(points, noise):
  statement = 'The top design of the §5 ranking beats the median of feasible random designs (A4).'
  expected = 'Δ = median L(random) − L(top) > 0'
  if not points or any(p is None for p in points):
    return _missing('C-A4', statement, expected, 'A4')
  top, rand = points[0], sorted(points[1:], key=lambda r: r['loss_mean'])
  delta = float(np.median([r['loss_mean'] for r in rand])) - top['loss_mean']
  hw = noise.half_width(top, {'seeds': 1})  # the median is treated as one run
  m, i = _fmt(delta, hw)
  return Claim('C-A4', statement, expected, m, i, _direction(delta, hw, +1),
               f'top {top["name"]} {top["loss_mean"]:.4f}; random: ' +
               ', '.join(f'{r["name"]} {r["loss_mean"]:.4f}' for r in rand))


def _kappa_claim(fits):
  statement = 'Across the runs, the fitted κ < 1: total parameters matter beyond the active ones (§3.3).'
  fit = (fits or {}).get('effective_params')
  if fit is None:
    return Claim('C-A3', statement, 'κ < 1', '-', '-', 'inconclusive',
                 f'no effective_params fit (needs {POINTS_PER_PARAMETER} configurations per parameter)')
  if not beats_baselines(fits, 'effective_params'):
    return Claim('C-A3', statement, 'κ < 1', f'κ = {fit.values["kappa"]:.3f}', '-', 'inconclusive',
                 'the effective_params fit does not predict held-out configurations better than the constant and '
                 'log-linear baselines, so no verdict rests on it')
  kappa = fit.values['kappa']
  lo, hi = fit.intervals.get('kappa', (None, None))
  interval = '-' if lo is None else f'[{lo:.3f}, {hi:.3f}]'
  verdict = 'inconclusive' if hi is None else 'holds' if hi < 0.95 else 'contradicted' if lo > 0.95 else 'inconclusive'
  return Claim('C-A3', statement, 'κ < 1 (95% upper bound < 0.95)', f'κ = {kappa:.3f}', interval, verdict,
               f'fit over {fit.n} configurations, LOO RMSE {fit.loo_rmse if fit.loo_rmse is None else round(fit.loo_rmse, 4)}')


def _b2_claim(g):
  statement = 'The best expert size barely moves with s (argmin d_exp at s = 8 and s = 32 within one grid step).'
  expected = 'abs(Δ index) ≤ 1'
  points = (g.get('B2') or []) + (g.get('B2s32') or [])
  groups = {}
  for r in points:
    if r is not None:
      groups.setdefault(r['sparsity'], []).append(r)
  if 8.0 not in groups or 32.0 not in groups or any(r is None for r in points):
    return Claim('C-B2', statement, expected, '-', '-', 'inconclusive',
                 'needs B2 at both s = 8 and s = 32 (tiny: add grid B2s32)')
  best = {}
  for s in (8.0, 32.0):
    pts = _ordered(groups[s], 'expert_hidden')
    best[s] = (int(np.argmin([p['loss_mean'] for p in pts])), pts)
  shift = abs(best[8.0][0] - best[32.0][0])
  detail = '; '.join(f's={s:g}: ' + ', '.join(f'd_exp {p["expert_hidden"]:g}: {p["loss_mean"]:.4f}' for p in pts)
                     + f' (best d_exp {pts[i]["expert_hidden"]:g})' for s, (i, pts) in best.items())
  return Claim('C-B2', statement, expected, f'Δ index = {shift}', '-', 'holds' if shift <= 1 else 'contradicted', detail)


def _b6_claim(center, b6, noise):
  statement = 'Dropless training beats token dropping: dropless < CF 1.25 ≤ CF 1.0 (dropless eval).'
  expected = 'L(CF1.25) − L(dropless) > 0 and L(CF1.0) ≥ L(CF1.25)'
  if center is None or len(b6) < 3 or b6[1] is None or b6[2] is None:
    return _missing('C-B6', statement, expected, 'B6')
  cf10, cf125 = b6[1], b6[2]
  d1, hw1 = cf125['loss_mean'] - center['loss_mean'], noise.half_width(center, cf125)
  d2 = cf10['loss_mean'] - cf125['loss_mean']
  verdict = _direction(d1, hw1, +1)
  if verdict == 'holds' and hw1 is not None and d2 < -hw1:
    verdict = 'inconclusive'
  evals = {r.get('eval_drop_policy', 'dropless') for r in (center, cf10, cf125)}
  if evals != {'dropless'}:  # the claim compares training policies under one dropless evaluation
    return Claim('C-B6', statement, expected, '-', '-', 'inconclusive',
                 f'not every B6 run was evaluated dropless ({", ".join(sorted(evals))})')
  m, i = _fmt(d1, hw1)
  return Claim('C-B6', statement, expected, m, i, verdict,
               f'dropless {center["loss_mean"]:.4f}, CF1.25 {cf125["loss_mean"]:.4f}, CF1.0 {cf10["loss_mean"]:.4f} '
               '(all evaluated dropless)')


def scaling_rows(rows: list[dict]) -> list[dict]:
  """The MoE rows with the default design choices (global-batch balancing, dropless, no shared and uniform
  experts): the B3-B6 variants change other axes than the counts the laws are about."""
  return [r for r in rows if (r.get('num_experts') or 0) > 0 and r.get('load_balancing') == 'global_batch'
          and r.get('drop_policy') == 'dropless' and r.get('eval_drop_policy') == 'dropless'
          and not r.get('num_shared_experts')
          and not r.get('moe.expert_size_classes')]


POINTS_PER_PARAMETER = 5  # a form is fitted only with at least this many configurations per free parameter
BASELINES = ('constant', 'log_linear')


def fit_laws(rows: list[dict], bootstrap: int = 100, starts: int = 32) -> dict[str, scaling.Fit]:
  """The baselines and every form the default-design MoE rows support (>= 5 configurations per free parameter)."""
  moe_rows = scaling_rows(rows)
  x, y = scaling.inputs_from_rows(moe_rows)
  fits = {}
  for name, form in scaling.FORMS.items():
    if len(y) >= POINTS_PER_PARAMETER * len(form.raw_names) and len(y) > len(form.raw_names) + 1:
      fits[name] = scaling.fit(name, x, y, max_starts=starts, bootstrap=bootstrap)
  return fits


def beats_baselines(fits: dict[str, scaling.Fit], name: str) -> bool:
  """Whether form `name` predicts held-out configurations (LOO RMSE) better than every baseline fitted beside it."""
  fit = fits.get(name)
  rivals = [fits[b].loo_rmse for b in BASELINES if b in fits and fits[b].loo_rmse is not None]
  return fit is not None and fit.loo_rmse is not None and bool(rivals) and fit.loo_rmse < min(rivals)


def markdown(claims: list[Claim], noise: dict, fits: dict[str, scaling.Fit], header: str = '') -> str:
  sigma = '-' if noise['sigma'] is None else f'{noise["sigma"]:.4f}'
  threshold = '-' if noise['threshold'] is None else f'{noise["threshold"]:.4f}'
  lines = [header, '## Claims', '',
           f'Seed noise: σ = {sigma} nats (pooled, {noise["dof"]} degrees of freedom); small-effect threshold '
           f'T = {threshold} (half the mean gain of one doubling of E in B1). Intervals are 95% t intervals '
           f'(± t(0.975, dof) σ √(1/n_a + 1/n_b)); with fewer than {MIN_DOF} degrees of freedom there are none and '
           'every verdict is inconclusive. Small effects are equivalence tests (TOST at 5%: the 90% interval inside '
           '±T). The monotonicity rule applies to "holds" and "contradicted" alike. '
           f'{sum(c.verdict != "inconclusive" for c in claims)} of {len(claims)} verdicts are decided; each is at the '
           '5% level on its own, with no multiple-comparison correction: among that many, about one false verdict '
           'in 20 decided is expected by chance.', '',
           '| claim | statement | expected | measured Δ (nats) | 95% interval | verdict | detail |',
           '|---|---|---|---:|---|---|---|']
  for c in claims:
    lines.append(f'| {c.id} | {c.statement} | {c.expected} | {c.measured} | {c.interval} | **{c.verdict}** | {c.detail} |')
  lines += ['', '## Fitted scaling laws', '',
            'Non-embedding counts, one point per configuration (seed mean); MoE runs with the default design '
            '(global-batch balancing, dropless, no shared or heterogeneous experts); see moejax/scaling.py.', '',
            f'A form is fitted only with at least {POINTS_PER_PARAMETER} configurations per free parameter, always '
            'beside the constant and log-linear baselines; a form that does not beat both on leave-one-out RMSE '
            'supports no verdict.', '',
            scaling.markdown(list(fits.values())) if fits else 'Too few configurations to fit any form.\n']
  return '\n'.join(lines)


def run(root: str, scale: str, out: str, bootstrap: int = 100, fit_starts: int = 32) -> str:
  """Writes OUT/claims.md (claims + fits), OUT/report.md and the figures; returns the claims Markdown."""
  gathered = results.gather(root)
  if not gathered.records:
    raise DataError(f'no complete result.json under {root}; run the paper grids first')
  rows, _ = results.table(gathered.records)
  fits = fit_laws(rows, bootstrap, fit_starts)
  claims, noise = evaluate(rows, scale, fits)
  platforms = sorted({f'{r["platform"]["device_kind"]} ({r["platform"]["backend"]}, jax {r["platform"]["jax"]})'
                      for r in gathered.records if r.get('platform')})
  fingerprints = sorted({r['data']['fingerprint'][:12] for r in gathered.records if r.get('data')})
  header = (f'# Claims at scale `{scale}`\n\n{len(gathered.records)} runs in {len(rows)} configurations under '
            f'`{root}`; machine: {", ".join(platforms) or "?"}; corpus sha256 {", ".join(fingerprints) or "?"}; '
            f'evaluated {datetime.date.today().isoformat()}. Figures and the full table: [report.md](report.md).\n')
  text = markdown(claims, noise, fits, header)
  report.write_report(root, out, extra=text.split('\n', 2)[2], figure_rows=scaling_rows,
                      figure_note='Figures show the default-design MoE runs (as the fits); the table has every run.',
                      gathered=gathered)
  metrics_lib.atomic_write(os.path.join(out, 'claims.md'), text)
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


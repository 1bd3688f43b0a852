"""Rows beside the claims: the effective speedup over dense (with an interval), the best expert size at each active
scale, the learning-rate sweep, the compute spent, and each claim's side in the literature. Rendered by
`moejax.studies.render`."""

from __future__ import annotations

import math

import numpy as np

from moejax.errors import DataError
from moejax.studies import statistics
from moejax.studies.verdicts import Claim, label, not_run, seed_argmins


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


def tokens_interval(curve: list[dict], target: float, se_target: float, se_of, dof: int, level: float = 0.95
                    ) -> tuple[float, float] | None:
  """`level` interval of the tokens at which a decay curve reaches `target` (`tokens_to_reach` inside the curve),
  by the delta method on its log-linear interpolation between the two points around the crossing.

  ln t = ln t0 + (l0 - target) / (l0 - l1) * (ln t1 - ln t0); `se_of(point)` is the standard error of a point's
  seed mean, `se_target` the target's. The two curve points are one run's losses at two budgets, so they are taken
  perfectly correlated (their derivatives share a sign: the widest case); the target (another configuration) is
  taken independent (with a shared seed effect the true interval is narrower). None outside the curve.
  """
  pts = [p for p in curve if p.get('tokens') and p.get('loss') is not None]
  for p0, p1 in zip(pts, pts[1:]):
    (t0, l0), (t1, l1) = (p0['tokens'], p0['loss']), (p1['tokens'], p1['loss'])
    if l1 <= target < l0:
      c, d = math.log(t1) - math.log(t0), l0 - l1
      log_t = math.log(t0) + (l0 - target) / d * c
      se = math.hypot(c / d * se_target, c * (target - l1) / d ** 2 * se_of(p0) + c * (l0 - target) / d ** 2 * se_of(p1))
      hw = statistics.t_quantile(0.5 + level / 2, dof) * se
      return math.exp(log_t - hw), math.exp(log_t + hw)
  return None


def _point_se(row: dict, noise_at: dict):
  """se_of(curve point) for `row`'s decay curve under the class noise measured at each budget (None if unusable)."""
  def se(p):
    n = noise_at.get(p['tokens'])
    n = n.of(row) if n is not None else None
    if n is None or not n.usable:
      raise LookupError(p['tokens'])
    return n.sigma / math.sqrt(p.get('n') or row['seeds'])
  return se


def _dof(rows_points: list[tuple[dict, int]], noise_at: dict) -> int:
  """The fewest degrees of freedom among the usable noises of these (row, budget) points (conservative)."""
  usable = [n.dof for n in (noise_at[t].of(r) for r, t in rows_points if t in noise_at) if n.usable]
  if not usable:
    raise LookupError('no usable noise')
  return min(usable)


def speedup_rows(g: dict, noise_at: dict | None = None) -> dict | None:
  """Effective speedup of each B1 MoE over the dense baseline: dense's tokens / the MoE's tokens to reach dense's
  loss. {'dense': row, 'tokens': dense tokens, 'loss': dense loss, 'rows': [{'row', 'tokens', 'where', 'speedup',
  'interval'}]} ('where': '' inside the curve, '<' already below at its first point, '>' never reached); None without
  B1 curves. With `noise_at` ({tokens: `statistics.ClassNoise` at that budget}), 'interval' is the 95% interval of
  the speedup (`tokens_interval`, on the fewest degrees of freedom involved), else None."""
  b1 = g.get('B1') or []
  if len(b1) < 2 or b1[0] is None or not b1[0].get('decay_curve'):
    return None
  dense = b1[0]
  d_tokens, d_loss = dense['decay_curve'][-1]['tokens'], dense['decay_curve'][-1]['loss']
  out = []
  for r in b1[1:]:
    if r is None or not r.get('decay_curve'):
      continue
    tokens, where = tokens_to_reach(r['decay_curve'], d_loss)
    interval = None
    if noise_at and where == '' and tokens is not None:
      try:
        se_dense = _point_se(dense, noise_at)(dense['decay_curve'][-1])
        reach = tokens_interval(r['decay_curve'], d_loss, se_dense, _point_se(r, noise_at),
                                _dof([(dense, d_tokens)] + [(r, p['tokens']) for p in r['decay_curve']], noise_at))
        interval = None if reach is None else (d_tokens / reach[1], d_tokens / reach[0])
      except LookupError:  # no usable noise at a budget the crossing uses
        interval = None
    out.append({'row': r, 'tokens': tokens, 'where': where, 'speedup': None if tokens is None else d_tokens / tokens,
                'interval': interval})
  return {'dense': dense, 'tokens': d_tokens, 'loss': d_loss, 'rows': out}


B2_GRIDS = ('B2', 'B2s32', 'B2p')  # loss against the expert size at constant k * d_exp: two s, two active scales


def best_expert_rows(g: dict, noise) -> list[dict]:
  """The best expert size per B2 grid (SCIENCE.md §4, C-B2): [{'grid', 'sparsity', 'n_active', 'n_active_nonembed',
  'sizes', 'losses' (seed means), 'best' (d_exp at the lowest mean), 'lo', 'hi' (the 95% interval of the argmin,
  `statistics.argmin_interval`; None without usable noise), 'p_best' (P(argmin) per size), 'seed_argmins'}], in
  the order of B2_GRIDS; grids with a missing point are left out."""
  out = []
  for grid in B2_GRIDS:
    points = g.get(grid) or []
    if not points or any(p is None for p in points):
      continue
    pts = sorted(points, key=lambda p: p['expert_hidden'])
    interval = statistics.argmin_interval(pts, noise)
    out.append({'grid': grid, 'sparsity': pts[0]['sparsity'], 'n_active': pts[0]['n_active'],
                'n_active_nonembed': pts[0].get('n_active_nonembed') or pts[0]['n_active'],
                'sizes': [p['expert_hidden'] for p in pts], 'losses': [p['loss_mean'] for p in pts],
                'best': min(pts, key=lambda p: p['loss_mean'])['expert_hidden'],
                'lo': interval[0] if interval else None, 'hi': interval[1] if interval else None,
                'p_best': [float(x) for x in interval[2]] if interval else None, 'seed_argmins': seed_argmins(pts)})
  return out


def lr_rows(g: dict) -> tuple[list[float], list[dict]]:
  """The learning-rate sweep (grid LR): (every rate, [{'anchor', 'n_total', 'losses': {rate: seed-0 loss}, 'best',
  'vertex'}]); 'vertex' is the vertex of a parabola in log2(rate) through the best point and its neighbours (only
  when the best is interior: a bracketed optimum; else None and 'bracketed' False)."""
  anchors: dict[str, list[dict]] = {}
  for r in g.get('LR') or []:
    if r is not None:
      anchors.setdefault(r['name'].split('-lr')[0].split('-seed')[0], []).append(r)
  seed0 = lambda r: (r.get('seed_losses') or {}).get('0/0', r['loss_mean'])  # every column at seed 0
  rates = sorted({r['peak_learning_rate'] for rs in anchors.values() for r in rs})
  out = []
  for name, rs in anchors.items():
    by_rate = {r['peak_learning_rate']: seed0(r) for r in rs}
    best = min(by_rate, key=by_rate.get)
    known = sorted(by_rate)
    i = known.index(best)
    vertex, bracketed = None, 0 < i < len(known) - 1
    if bracketed:  # three points around an interior minimum
      x = np.log2(known[i - 1:i + 2])
      a, b, _ = np.polyfit(x, [by_rate[k] for k in known[i - 1:i + 2]], 2)
      vertex = float(2 ** (-b / (2 * a))) if a > 0 else None
    out.append({'anchor': name, 'n_total': rs[0]['n_total'], 'losses': by_rate, 'best': best, 'vertex': vertex,
                'bracketed': bracketed, 'width': rs[0].get('model.model_dim'), 'topk': rs[0].get('experts_per_token')})
  if len({r['width'] for r in out}) >= 2 and all(r['topk'] for r in out):  # widths vary: the joint rule (lr_rule)
    try:
      rule = lr_rule([{'width': r['width'], 'topk': r['topk'], 'lr': x, 'loss': y} for r in out
                      for x, y in r['losses'].items()], base_width=min(r['width'] for r in out))
    except DataError as e:  # not identified: the table says why (`claims --lr_rule` stops on it)
      out[0]['rule_error'] = str(e)
      return rates, out
    for r in out:
      r.update(rule=rule['choose'](r['width'], r['topk']),
               rule_fit={k: rule[k] for k in ('slope', 'slope_se', 'curvature', 'curvature_se', 'residual_rms')})
  return rates, out


def lr_rule(points: list[dict], base_width: int = 64, window: float = 1.0) -> dict:
  """The learning-rate rule read off a rate grid at several widths and top-k classes, jointly, so that no anchor's
  rate rests on its own single-seed argmin (at tiny2's d = 96, k = 2 the four rates spanned 0.002 nats).

  Each anchor's points within `window` factors of 2 of its argmin (the bowl around its minimum: the divergence
  side of a rate grid is not a parabola, and a flat floor alone carries no curvature) are fitted by least squares
  with

      loss = c_anchor + a * (log2(lr) - m_k - s * log2(d / base_width))^2,

  one offset c per anchor, one optimum m_k per top-k class at the base width, one width slope s shared by every
  class (muP-style transfer predicts s = -1 for Adam's hidden matrices) and one curvature a (nats per factor 2
  squared). `points`: [{'width', 'topk', 'lr', 'loss'}]. A DataError when the grid cannot identify the rule: no
  top-k class measured at two widths (the slope), or a curvature not 2 standard errors above 0 (flat bowls: no
  rate is better than another within the noise). Returns {'slope', 'slope_se', 'intercepts': {k: log2 rate at
  base width}, 'curvature', 'curvature_se', 'residual_rms', 'fitted': fitted(width, topk) (unclamped),
  'rate': rate(width, topk), the fitted rate clamped to the rates swept at the nearest anchor width (never an
  extrapolated rate), 'choose': choose(width, topk) at an anchor width: {'rate': the swept rate nearest the
  clamped fit (so an anchor's grid point is its grid LR run), 'fitted', 'clamped': the fit lies more than half
  a factor 2 outside that width's sweep (extend the sweep), 'cost': a * log2(rate / fitted)^2, the nats the
  choice is predicted to lose}}. The class of a top-k is the nearest measured in log2 (ties: the smaller, so
  with classes 2 and 8, k <= 4 takes 2's, as `papers.lr_for` does).
  """
  from scipy import optimize  # pylint: disable=import-outside-toplevel
  anchors = sorted({(p['width'], p['topk']) for p in points})
  topks = sorted({k for _, k in anchors})
  if not any(len({w for w, k2 in anchors if k2 == k}) >= 2 for k in topks):
    raise DataError('grid LR measures no top-k class at two widths: the width slope of the rate rule is not '
                    'identified')
  used = []
  for w, k in anchors:
    grid = [p for p in points if (p['width'], p['topk']) == (w, k)]
    best = math.log2(min(grid, key=lambda p: p['loss'])['lr'])
    used += [p for p in grid if abs(math.log2(p['lr']) - best) <= window + 1e-9]
  x = np.log2([p['lr'] for p in used])
  y = np.array([p['loss'] for p in used])
  a_idx = np.array([anchors.index((p['width'], p['topk'])) for p in used])
  k_idx = np.array([topks.index(p['topk']) for p in used])
  wl = np.log2([p['width'] / base_width for p in used])

  def residuals(theta):
    c, m, slope, a = theta[:len(anchors)], theta[len(anchors):len(anchors) + len(topks)], theta[-2], theta[-1]
    return c[a_idx] + a * (x - m[k_idx] - slope * wl) ** 2 - y

  start = np.concatenate([[min(p['loss'] for p in used if (p['width'], p['topk']) == an) for an in anchors],
                          [np.mean(x[k_idx == j]) for j in range(len(topks))], [0.0, 0.01]])
  fit = optimize.least_squares(residuals, start, method='lm' if len(y) > len(start) else 'trf')
  m, slope, curvature = fit.x[len(anchors):len(anchors) + len(topks)], float(fit.x[-2]), float(fit.x[-1])
  dof = len(y) - len(start)
  cov = (np.linalg.pinv(fit.jac.T @ fit.jac) * float(fit.fun @ fit.fun) / dof) if dof > 0 else None
  se = lambda i: float(np.sqrt(max(cov[i, i], 0.0))) if cov is not None else float('inf')  # noqa: E731
  if not curvature > 2 * se(-1):
    raise DataError(f'grid LR\'s bowls are flat within the noise (curvature {curvature:.2g} ± {se(-1):.2g} nats '
                    'per factor 2 squared): no rate is identified; sweep wider or add seeds')
  sweeps = {}
  for p in points:
    sweeps.setdefault(p['width'], set()).add(p['lr'])

  def fitted(width: int, topk: int) -> float:
    j = min(range(len(topks)), key=lambda i: (abs(math.log2(topk / topks[i])), topks[i]))  # nearest class
    return float(2.0 ** (m[j] + slope * math.log2(width / base_width)))

  def swept(width: int) -> list[float]:  # the rates swept at the anchor width nearest in log2
    return sorted(sweeps[min(sweeps, key=lambda w: (abs(math.log2(width / w)), w))])

  def rate(width: int, topk: int) -> float:
    rates = swept(width)
    return min(max(fitted(width, topk), rates[0]), rates[-1])

  def choose(width: int, topk: int) -> dict:
    raw, rates = fitted(width, topk), swept(width)
    pick = min(rates, key=lambda r: abs(math.log2(r / rate(width, topk))))
    return {'rate': pick, 'fitted': raw, 'clamped': not rates[0] / 2 ** 0.5 <= raw <= rates[-1] * 2 ** 0.5,
            'cost': curvature * math.log2(pick / raw) ** 2}
  return {'slope': slope, 'slope_se': se(-2), 'intercepts': {k: float(m[j]) for j, k in enumerate(topks)},
          'curvature': curvature, 'curvature_se': se(-1), 'fitted': fitted, 'rate': rate, 'choose': choose,
          'residual_rms': float(np.sqrt(np.mean(fit.fun ** 2)))}


def compute_summary(rows: list[dict]) -> dict:
  """The measured compute of everything under the root: {'runs', 'wall_h', 'flops'}."""
  return {'runs': sum(r['seeds'] for r in rows), 'wall_h': sum(r.get('wall_s') or 0.0 for r in rows) / 3600,
          'flops': sum((r.get('flops_per_token') or 0) * (r.get('tokens') or 0) * r['seeds'] for r in rows)}


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


def literature_rows(claims: list[Claim]) -> list[dict]:
  """[{'id', 'sides': the LITERATURE_COLUMNS' sides, 'ours': [verdicts]}], one per claim id in order."""
  out, seen = [], set()
  for c in claims:
    if c.id in seen:
      continue
    seen.add(c.id)
    ours = [('not run' if not_run(x) else x.verdict) + label(x)[len(x.id):]
            for x in claims if x.id == c.id]  # 'holds (sequence)'; a claim whose grid is missing was not run
    out.append({'id': c.id, 'sides': LITERATURE.get(c.id, ('-',) * len(LITERATURE_COLUMNS)), 'ours': ours})
  return out

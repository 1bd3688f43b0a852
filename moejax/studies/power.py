"""The power of each claim's verdict rule at n seeds per point, by Monte Carlo simulation of the rule as it decides
(moejax/studies/verdicts.py, claims.py), and the smallest seed count that reaches 80% power. The plan
(moejax/studies/plan.py) sizes a study with these; tests/plan_test.py checks them against simulated studies.

Each function takes the truth (the effect of interest; 0 for equivalence), the class sigma and the number of the
class's grid configurations (the sigma is estimated on (C - 1)(n - 1) degrees of freedom, so its uncertainty is
simulated too, chi-square), and returns the fraction of simulated studies whose verdict is the right one.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from moejax.studies import statistics

POWER = statistics.POWER
MAX_SEEDS = 512  # a claim needing more seeds per point than this is not decidable at this scale
DRAWS = 4000  # Monte Carlo draws per power evaluation (argmin claims: ARGMIN_OUTER x ARGMIN_INNER)
ARGMIN_OUTER, ARGMIN_INNER = 300, 800


def _dof(configurations: int, n: int) -> int:
  return max(configurations - 1, 1) * (n - 1)


def _sigma_hat(rng, sigma, dof, draws):
  return sigma * np.sqrt(rng.chisquare(max(dof, 1), draws) / max(dof, 1))


def _crit(p, dof):
  return np.where(np.asarray(dof) >= statistics.MIN_DOF, stats.t.ppf(p, np.maximum(dof, 1)), np.inf)


def power_pair(n, effect, a, b, equivalence=False, margin=None, seed=0, draws=None):
  """Power of a two-point verdict at n seeds per point. a, b: (sigma, configurations of the class, class name).
  Direction: the 95% interval excludes 0; equivalence (true difference 0): the 90% interval inside +-margin."""
  rng, draws = np.random.default_rng(seed), draws or DRAWS
  sa, sb = _sigma_hat(rng, a[0], _dof(a[1], n), draws), _sigma_hat(rng, b[0], _dof(b[1], n), draws)
  truth = 0.0 if equivalence else effect
  delta = truth + rng.standard_normal(draws) * math.sqrt((a[0] ** 2 + b[0] ** 2) / n)
  if a[2] == b[2]:
    se, dof = sa * math.sqrt(2 / n), np.full(draws, _dof(a[1], n))
  else:  # Welch, as statistics.welch
    va, vb = sa ** 2 / n, sb ** 2 / n
    se, dof = np.sqrt(va + vb), np.floor((va + vb) ** 2 / (va ** 2 / _dof(a[1], n) + vb ** 2 / _dof(b[1], n)))
  if equivalence:
    return float(np.mean(np.abs(delta) + _crit(0.95, dof) * se < margin))
  return float(np.mean(delta - _crit(0.975, dof) * se > 0))


def power_trend(n, effect, m, sigma, configurations, seed=0, draws=None, profile=None):
  """Power of a trend verdict over m points linear in rank (end to end `effect`), or with the true means
  `profile` (m values, the expected direction upwards): the slope t-test holds and so does every drop-one
  subseries (verdicts.trend_claim)."""
  rng, draws = np.random.default_rng(seed), draws or DRAWS
  dof = _dof(configurations, n)
  truth = np.linspace(0.0, effect, m) if profile is None else np.asarray(profile, np.float64)
  means = truth + rng.standard_normal((draws, m)) * sigma / math.sqrt(n)
  s_hat = _sigma_hat(rng, sigma, dof, draws)
  crit = _crit(1 - statistics.ALPHA, dof)
  subsets = [list(range(m))] + ([[j for j in range(m) if j != i] for i in range(m)] if m >= 3 else [])
  ok = np.ones(draws, bool)
  for keep in subsets:
    r = np.arange(len(keep), dtype=np.float64)
    w = (r - r.mean()) / np.sum((r - r.mean()) ** 2)
    with np.errstate(divide='ignore', invalid='ignore'):  # sigma 0 (noiseless data): t is +-inf, or nan for no slope
      ok &= (means[:, keep] @ w) / (s_hat * math.sqrt(np.sum(w ** 2) / n)) > crit
  return float(np.mean(ok))


def _bowl(sizes, depth):
  x = np.log2(np.asarray(sizes, np.float64))
  centre, half = (x.max() + x.min()) / 2, (x.max() - x.min()) / 2
  return x, depth * ((x - centre) / half) ** 2


def _argmin_intervals(rng, x, mu, n, sigma, s_hat, dof):
  """[outer, 2] percentile intervals (log2 d_exp) of the argmin, as statistics.argmin_interval computes them."""
  obs = mu + rng.standard_normal((ARGMIN_OUTER, len(x))) * sigma / math.sqrt(n)
  shock = rng.standard_normal((ARGMIN_OUTER, ARGMIN_INNER, len(x))) * np.sqrt(
      dof / rng.chisquare(dof, (ARGMIN_OUTER, ARGMIN_INNER, 1)))
  best = np.argmin(obs[:, None, :] + shock * (s_hat / math.sqrt(n))[:, None, None], axis=2)
  return np.percentile(x[best], [2.5, 97.5], axis=1).T


def power_argmin(n, depth, sizes_a, sizes_b, sigma, configurations, disjoint, seed=0):
  """Power of C-B2 (disjoint=False: informative intervals that overlap) or C-B2a (disjoint=True) for bowls of
  `depth` centred on each grid."""
  rng = np.random.default_rng(seed)
  dof = _dof(configurations, n)
  if dof < statistics.MIN_DOF:
    return 0.0
  s_hat = _sigma_hat(rng, sigma, dof, ARGMIN_OUTER)
  (xa, ma), (xb, mb) = _bowl(sizes_a, depth), _bowl(sizes_b, depth)
  ia, ib = _argmin_intervals(rng, xa, ma, n, sigma, s_hat, dof), _argmin_intervals(rng, xb, mb, n, sigma, s_hat, dof)
  apart = (ia[:, 1] < ib[:, 0]) | (ib[:, 1] < ia[:, 0])
  if disjoint:
    return float(np.mean(apart))
  informative = lambda i, x: (i[:, 1] < x.max()) | (i[:, 0] > x.min())
  return float(np.mean(~apart & informative(ia, xa) & informative(ib, xb)))


def power_designs(m, effect, spread, sigma, seed=0, draws=None):
  """Power of C-A4 with m random designs (their means spread by `spread`, the pilot's 2-seed spread) and m seeds of
  the top design: the mean of d = L(random) - L(top), se^2 = var(d)/m + sigma^2/m on m - 1 degrees of freedom
  (claims._a4_claim)."""
  rng, draws = np.random.default_rng(seed), draws or DRAWS
  d = effect + spread * rng.standard_normal((draws, m)) - (sigma / math.sqrt(m)) * rng.standard_normal((draws, 1))
  se = np.sqrt(np.var(d, axis=1, ddof=1) / m + sigma ** 2 / m)
  return float(np.mean(d.mean(axis=1) - _crit(0.975, m - 1) * se > 0))


def smallest(power_of, low: int = 2, high: int = MAX_SEEDS) -> tuple[int | None, float | None]:
  """The smallest n in [low, high] with power_of(n) >= POWER (doubling, then bisection); (None, None) if none."""
  if power_of(high) < POWER:
    return None, None
  n = low
  while power_of(n) < POWER:
    low, n = n, min(2 * n, high)
  lo, hi = low, n
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if power_of(mid) < POWER else (lo, mid)
  best = lo if lo >= 2 and power_of(lo) >= POWER else hi
  return best, power_of(best)

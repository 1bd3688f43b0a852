"""The statistics behind the verdicts: t quantiles, seed noise (pooled and block-design), a noise check,
the argmin interval of a series, and Holm's step-down correction.

Noise: a seed sets initialization and data order, so the configurations run at one seed set
are paired: seeds are the blocks of a randomized complete block design. A difference between
two such configurations uses the residual sigma of the additive model loss = configuration +
seed (`block_sigma`, dof = (C-1)(S-1)), in which the seed's shared effect cancels; any other
comparison uses the pooled sample standard deviation of every configuration with two or more
seeds. A difference of seed means over n_a and n_b seeds gets the t interval
+-t(0.975, dof) * sigma * sqrt(1/n_a + 1/n_b).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

MIN_DOF = 6  # fewer pooled degrees of freedom than this: no interval, every verdict inconclusive


ALPHA = 0.025  # one-sided level of a directional verdict (the 95% two-sided interval excludes 0)
POWER = 0.80  # the power seeds-to-decide plans for


def t_quantile(p: float, dof: int) -> float:
  return float(stats.t.ppf(p, dof))


def t_sf(x: float, dof: int) -> float:
  return float(stats.t.sf(x, dof))


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

  def seeds_to_resolve(self, delta: float, margin: float = 0.0, level: float = 0.95, power: float = POWER
                       ) -> int | None:
    """Seeds per point (both sides) at which a true difference `delta` clears `margin` with probability `power`:
    n = 2 ((t(1 - a/2) + t(power)) sigma / gap)^2 at this noise's degrees of freedom (a = 1 - level)."""
    gap = abs(abs(delta) - margin)
    if not self.usable or gap == 0:
      return None
    z = t_quantile(0.5 + level / 2, self.dof) + t_quantile(power, self.dof)
    return max(2, math.ceil(2 * (z * self.sigma / gap) ** 2))


def welch(a: Noise, b: Noise, na: int, nb: int) -> Noise:
  """The noise of a difference of means over na runs of class a and nb of class b (Welch-Satterthwaite): a
  Noise whose sigma * sqrt(1/na + 1/nb) is sqrt(sa^2/na + sb^2/nb), with the Welch degrees of freedom."""
  if not (a.usable and b.usable):
    return Noise(None, 0)
  va, vb = a.sigma ** 2 / na, b.sigma ** 2 / nb
  dof = (va + vb) ** 2 / (va ** 2 / a.dof + vb ** 2 / b.dof)
  return Noise(math.sqrt((va + vb) / (1 / na + 1 / nb)), int(math.floor(dof)))


@dataclasses.dataclass(frozen=True)
class ClassNoise:
  """Seed noise per declared noise class (`row['noise_class']`, from the grid files): each class its own sigma
  and degrees of freedom; comparisons across classes use a Welch interval. `for_pair` returns a `Noise`."""
  classes: dict

  def of(self, point: dict) -> Noise:
    return self.classes.get(point.get('noise_class') or 'default') or Noise(None, 0)

  def for_pair(self, *points: dict) -> Noise:
    kinds = {p.get('noise_class') or 'default' for p in points}
    if len(kinds) == 1:
      return self.of(points[0]).for_pair(*points)
    if len(points) != 2:  # a series mixing classes: the noisiest class (conservative)
      return max((self.of(p) for p in points), key=lambda n: n.sigma or math.inf)
    a, b = points
    return welch(self.of(a).for_pair(a), self.of(b).for_pair(b), a['seeds'], b['seeds'])

  @property
  def usable(self) -> bool:
    return any(n.usable for n in self.classes.values())


def make_class_noise(rows: list[dict]) -> ClassNoise:
  """`make_noise` within each declared noise class of `rows`."""
  by: dict[str, list[dict]] = {}
  for r in rows:
    by.setdefault(r.get('noise_class') or 'default', []).append(r)
  return ClassNoise({k: make_noise(v) for k, v in sorted(by.items())})


def trend_test(means: list[float], seeds: list[int], noise: Noise) -> tuple[float, float] | None:
  """Regression-slope t-test for a trend of seed means over the ordered positions 0..n-1 of a series.

  The slope b of the least-squares line through (rank, mean) has Var(b) = sum_i w_i^2 sigma^2 / n_i with
  w_i = (r_i - r_mean) / sum (r - r_mean)^2; t = b / se(b) has the noise's degrees of freedom. Ranks, not the
  values, so a log-spaced or categorical variable counts each step once. Returns (slope, se), None without noise.
  """
  if not noise.usable or len(means) < 2:
    return None
  r = np.arange(len(means), dtype=np.float64)
  w = (r - r.mean()) / np.sum((r - r.mean()) ** 2)
  slope = float(np.dot(w, means))
  se = float(noise.sigma * math.sqrt(np.sum(w ** 2 / np.asarray(seeds, np.float64))))
  return slope, se


def make_noise(rows: list[dict]) -> Noise:
  """The unpaired pooled noise with the paired (block-design) noise attached."""
  sigma, dof, seeds = block_sigma(rows)
  return Noise(*pooled_sigma(rows), paired=Noise(sigma, dof), seed_set=seeds)


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


def holm(claims: list, family_alpha: float = ALPHA) -> dict[str, bool]:
  """{claim key: survives} for the decided verdicts under Holm's step-down correction at `family_alpha`.

  The family is every claim with a p-value (inconclusive ones included: they were tested too). Each p is the
  claim's own p-value as it is (for an equivalence test, the larger of its two one-sided p-values), compared with
  family_alpha / (m - rank): rescaling equivalence p-values by their own level would give those tests double weight.
  """
  tested = sorted((c.p, i) for i, c in enumerate(claims) if c.p is not None)
  out, m, stopped = {}, len(tested), False
  for rank, (p, i) in enumerate(tested):
    stopped = stopped or p > family_alpha / (m - rank)
    if claims[i].verdict != 'inconclusive':
      out[key(claims[i], i)] = not stopped
  return out


def key(c, i: int) -> str:
  return f'{c.id}#{i}'

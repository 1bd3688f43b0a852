"""The statistics of the claims, each checked on synthetic data where the answer is known (power, size, coverage)."""

import numpy as np
import pytest
from scipy import stats

from moejax.studies import claims, fits, statistics, verdicts


def test_seeds_to_decide_give_80_percent_power():
  sigma, delta = 0.013, 0.02
  noise = statistics.Noise(sigma, 40)
  n = noise.seeds_to_resolve(delta)
  rng = np.random.default_rng(0)
  a = rng.normal(0, sigma, (4000, n)).mean(1)
  b = rng.normal(delta, sigma, (4000, n)).mean(1)
  hw = noise.half_width({'seeds': n}, {'seeds': n})
  power = np.mean(b - a - hw > 0)
  assert 0.76 < power < 0.86, (n, power)  # the old formula (t(0.975) alone) gave n with about 50%


@pytest.mark.slow
def test_welch_intervals_across_noise_classes_cover():
  rng = np.random.default_rng(1)
  sa, sb, na, nb, ka, kb = 0.013, 0.05, 2, 2, 29, 6  # default and routing-perturbed classes, as in the tiny runs
  hits = 0
  for _ in range(3000):
    est_a = statistics.Noise(sa * np.sqrt(rng.chisquare(ka) / ka), ka)
    est_b = statistics.Noise(sb * np.sqrt(rng.chisquare(kb) / kb), kb)
    diff = rng.normal(0, sa / np.sqrt(na)) - rng.normal(0, sb / np.sqrt(nb))
    w = statistics.welch(est_a, est_b, na, nb)
    hits += abs(diff) <= w.half_width({'seeds': na}, {'seeds': nb})
  assert 0.93 < hits / 3000 < 0.975
  classes = statistics.ClassNoise({'default': statistics.Noise(0.013, 29), 'routing-perturbed':
                                   statistics.Noise(0.05, 6)})
  a = {'seeds': 2, 'noise_class': 'default', 'seed_losses': {}}
  b = {'seeds': 2, 'noise_class': 'routing-perturbed', 'seed_losses': {}}
  assert classes.for_pair(a, a).sigma == 0.013 and classes.for_pair(b, b).sigma == 0.05
  assert 0.013 < classes.for_pair(a, b).sigma < 0.05 and classes.for_pair(a, b).dof < 29


def _series(rng, slope, sigma=0.02, seeds=2, points=4):
  return [{'name': f'p{i}', 'x': 2 ** i, 'seeds': seeds,
           'loss_mean': 2.0 + slope * i + rng.normal(0, sigma / np.sqrt(seeds))} for i in range(points)]


@pytest.mark.slow
@pytest.mark.parametrize('slope,low,high', [(0.0, 0.0, 0.045), (0.03, 0.8, 1.0)])
def test_trend_test_size_and_power(slope, low, high):
  """The slope t-test: about 2.5% false 'holds' under no trend (size), at least 80% under a real one (power)."""
  rng = np.random.default_rng(2)
  noise = statistics.Noise(0.02, 30)
  got = []
  for _ in range(1000):
    verdict = verdicts.trend_verdict(_series(rng, slope), +1, noise)[0]
    got.append(verdict == 'holds')
  assert low <= np.mean(got) <= high


def test_a_trend_verdict_never_rests_on_one_point():
  pts = [{'name': n, 'seeds': 2, 'x': x, 'loss_mean': m} for n, x, m in (('a', 1, 2.0), ('b', 2, 2.0), ('c', 4, 1.8))]
  c = verdicts.trend_claim('X', 's', 'e', 'g', pts, 'x', -1, statistics.Noise(0.01, 20))
  assert c.verdict == 'inconclusive' and 'rests on one point' in c.flags[0] and 'c' in c.flags[0]


def test_holm_uses_p_values_as_they_are():
  made = [verdicts.Claim('d', '', '', '', '', 'holds', p=0.001),
          verdicts.Claim('e', '', '', '', '', 'holds', p=0.03, alpha=0.05)]  # an equivalence test's TOST p
  assert statistics.holm(made) == {'d#0': True, 'e#1': False}  # halving 0.03 would have let it through


def test_a4_needs_the_spread_of_random_designs():
  top = {'name': 'top', 'loss_mean': 1.70, 'seeds': 2, 'n_total': 1e6}
  rand = [dict(top, name=f'r{i}', loss_mean=1.70 + d) for i, d in enumerate((0.0, 0.01, 0.15))]
  c = claims._a4_claim([top] + rand, statistics.Noise(0.01, 30))  # pylint: disable=protected-access
  assert c.verdict == 'inconclusive' and 'random designs' in c.needs  # 3 designs: 2 dof between them
  many = [dict(top, name=f'r{i}', loss_mean=1.75 + 0.01 * (i % 3)) for i in range(9)]
  assert claims._a4_claim([top] + many, statistics.Noise(0.01, 30)).verdict == 'holds'  # pylint: disable=protected-access


def test_held_out_refits_never_start_from_the_full_data_optimum(monkeypatch):
  seen = []
  real = fits._best  # pylint: disable=protected-access

  def spy(form, x, y, grid):
    seen.append((len(y), grid.copy()))
    return real(form, x, y, grid)

  monkeypatch.setattr(fits, '_best', spy)
  x = {'n_total': np.geomspace(1e5, 1e7, 12), 'n_active': np.full(12, 1e5)}
  y = 3.0 * x['n_total'] ** -0.05
  f = fits.fit('log_linear', x, y, max_starts=4, bootstrap=0, refit_starts=2)
  theta = f.theta
  held = [g for n, g in seen if n < 12]  # the LOO folds and the held-out-largest refit
  assert len(held) == 12 + 1
  assert not any(np.any(np.all(np.isclose(g, theta), axis=1)) for g in held)


def test_missing_points_name_what_each_form_needs():
  short = fits.missing_points(30)
  assert short['expert_size'] == 45 - 30 and 'effective_params' not in short and 'constant' not in short
  assert stats.t.ppf(0.8, 40) > 0  # (the power quantile the seeds-to-decide formula adds)


def _fake(name, loo, extra=None):
  return fits.Fit(name, {}, {}, np.zeros(1), 0.0, float(np.sqrt(np.mean(np.square(loo)))), 0.0, len(loo),
                  loo_errors=np.asarray(loo), extrapolation_errors=None if extra is None else np.asarray(extra))


def test_beating_the_baselines_needs_an_interval_below_zero_not_a_lower_point_rmse():
  rng = np.random.default_rng(5)
  base = rng.normal(0, 0.02, 30)
  lucky = base * 0.97 + rng.normal(0, 0.002, 30)  # lower RMSE on these points, no better a law
  family = {'constant': _fake('constant', base, base[:6]), 'log_linear': _fake('log_linear', base * 1.01, base[:6]),
            'total_sparsity': _fake('total_sparsity', lucky, base[:6] * 0.97)}
  assert family['total_sparsity'].loo_rmse < family['constant'].loo_rmse  # the old point rule said "beats"
  rows = fits.baseline_comparisons(family, 'total_sparsity')
  assert {(r['baseline'], r['score']) for r in rows} == {(b, s) for b in fits.BASELINES
                                                          for s in ('leave-one-out', 'largest N_total')}
  assert not fits.beats_baselines(family, 'total_sparsity')
  assert any(r['interval'][0] < 0 < r['interval'][1] for r in rows)
  family['total_sparsity'] = _fake('total_sparsity', base * 0.3, base[:6] * 0.3)  # really better everywhere
  assert fits.beats_baselines(family, 'total_sparsity')


@pytest.mark.slow
def test_a_real_law_beats_its_baselines_with_an_interval():
  rng = np.random.default_rng(6)
  x = {'n_total': np.geomspace(1e5, 1e7, 20), 'sparsity': np.tile([2.0, 4.0, 8.0, 16.0], 5)}
  y = 1.5 + 40 * x['n_total'] ** -0.3 * x['sparsity'] ** 0.1 + rng.normal(0, 0.002, 20)
  x['n_active'] = x['n_total'] / x['sparsity']
  got = {name: fits.fit(name, x, y, max_starts=6, bootstrap=0) for name in ('constant', 'log_linear', 'total_sparsity')}
  assert fits.beats_baselines(got, 'total_sparsity')
  assert all(r['interval'][1] < 0 for r in fits.baseline_comparisons(got, 'total_sparsity'))

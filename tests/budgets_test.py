"""The claims at every decay-branch budget and loss against (N_active, tokens) (moejax/studies/budgets.py, the token
forms of fits.py), on synthetic data where the answer is known."""

import json
import math
import os
import zlib

import numpy as np
import pytest

from moejax import config as config_lib
from moejax.model import accounting
from moejax.studies import budgets, figures, fits, render, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRACTIONS = (0.25, 0.5, 1.0)
A1 = ('e32k16f32', 'e32k8f32', 'e32k4f32', 'e32k2f32')  # s = 2, 4, 8, 16
B1 = ('e8k2f64', 'e32k2f64', 'e128k2f64')


def _loss(name, point, seed, fraction):
  """A1's rise with s shrinks as 1 / fraction (0.06 nats end to end at the full run, 0.24 at 1/4); B1's fall with E
  is 0.08 nats at every budget; a decay common to every configuration cancels in every contrast. Seed noise: a
  shared seed effect plus 0.003 nats per run and budget."""
  loss = 2.0 + 0.3 * (1 / fraction - 1) + {0: 0.0, 1: 0.01, 2: -0.01}[seed]
  if name in A1:
    loss += 0.02 * math.log2(point['moe.num_experts'] / point['moe.experts_per_token']) / fraction
  if name in B1:
    loss -= 0.02 * math.log2(point['moe.num_experts'] / 8)
  rng = np.random.default_rng(zlib.crc32(f'{name}/{seed}/{fraction}'.encode()))
  return loss + rng.normal(0, 0.003)


def _write(root, seeds=(0, 1, 2), steps=8, tokens_per_step=1000):
  """result.json for every tiny paper-grid point with decay branches at 1/4 and 1/2 of `steps` (`_loss`)."""
  for module_name in ('paper_a', 'paper_b'):
    module = config_lib.load_module(os.path.join(ROOT, 'experiments', f'{module_name}.py'))
    base = module.get_config('tiny')
    for points in module.designs('tiny').values():
      for p0 in points:
        name = p0['name'].split('-seed')[0]
        for seed in seeds:
          run = name + f'-seed{seed}'
          if os.path.exists(os.path.join(root, run)):
            continue
          p = dict(p0, seed=seed, name=run, **{'data.seed': seed})
          cfg = config_lib.validate(config_lib.apply_overrides(base, p))
          curve = [{'step': int(f * steps), 'tokens': int(f * steps * tokens_per_step),
                    'loss': _loss(name, p0, seed, f)} for f in FRACTIONS]
          record = {'name': run, 'config': json.loads(cfg.to_json_best_effort()), 'accounting': accounting.count(cfg),
                    'eval': {'loss': curve[-1]['loss'], 'bits_per_byte': 3.0}, 'decay_curve': curve,
                    'train': {'tokens': steps * tokens_per_step, 'steps': steps, 'wall_s': 1.0}}
          os.makedirs(os.path.join(root, run))
          with open(os.path.join(root, run, 'result.json'), 'w') as f:
            json.dump(record, f)


@pytest.fixture(scope='module')
def rows(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('budgets'))
  _write(root)
  return results.table(results.gather(root).records)[0]


def test_rows_at_a_budget_read_each_seeds_decay_branch():
  curve = lambda a, b: [{'step': 2, 'tokens': 200, 'loss': a}, {'step': 4, 'tokens': 400, 'loss': b}]
  row = {'name': 'x', 'tokens': 400, 'seed_losses': {'0/0': 2.0, '1/1': 2.2}, 'loss_mean': 2.1, 'seeds': 2,
         'seed_curves': {'0/0': curve(2.5, 2.0), '1/1': curve(2.9, 2.2)},
         'decay_curve': [{'tokens': 200, 'loss': 2.7}, {'tokens': 400, 'loss': 2.1}]}
  assert budgets.budgets([row]) == [200, 400]
  early = budgets.rows_at([row], 200)[0]
  assert early['seed_losses'] == {'0/0': 2.5, '1/1': 2.9} and early['loss_mean'] == pytest.approx(2.7)
  assert early['tokens'] == 200 and early['loss_std'] == pytest.approx(math.sqrt(0.08))
  assert early['decay_curve'] == [{'tokens': 200, 'loss': 2.7}]
  assert budgets.rows_at([row], 400)[0]['seed_losses'] == row['seed_losses']  # the full run: its own scores
  assert budgets.rows_at([row], 300) == []  # no branch there
  change = budgets.change_rows([row], 200, 400)[0]
  assert change['seed_losses'] == pytest.approx({'0/0': -0.5, '1/1': -0.7}) and change['seeds'] == 2
  diverged = dict(row, seed_curves={'0/0': curve(None, 2.0), '1/1': curve(2.9, 2.2)})
  assert budgets.rows_at([diverged], 200)[0]['seed_losses'] == {'1/1': 2.9}  # a diverged branch drops its seed


def test_the_claims_at_every_budget_find_the_shrinking_effect_and_the_steady_one(rows):
  stages = budgets.by_budget(rows, 'tiny')
  assert [s.tokens for s in stages] == [2000, 4000, 8000]
  listed = budgets.effect_rows(stages, rows, 'tiny')
  effects = {e['id']: e for e in listed}  # (C-B5's second row replaces its first here)
  a1, b1 = effects['C-A1'], effects['C-B1']
  assert [c['claim'].delta for c in a1['cells']] == pytest.approx([0.24, 0.12, 0.06], abs=0.012)
  assert [c['claim'].verdict for c in a1['cells']] == ['holds'] * 3
  assert a1['tendency'] == 'shrinks' and a1['change'].delta == pytest.approx(-0.06, abs=0.012)
  assert a1['change'].half_width < 0.03  # the changes' own noise, not the sum of two budgets' noise
  assert [c['claim'].delta for c in b1['cells']] == pytest.approx([-0.08] * 3, abs=0.012)
  assert b1['tendency'] == 'no change resolved' and b1['cells'][-1]['claim'].verdict == 'holds'
  assert effects['C-A3']['change'] is None and effects['C-B2']['tendency'] == '-'  # no single Δ to follow
  text = render.effects_table(listed)
  assert '2.00K tokens (0.25 of the run)' in text and '| C-A1 | Δ > 0 | +0.2' in text and '| shrinks |' in text
  forest = {r['label']: r for r in figures.forest_rows(listed)}
  assert 'C-B2' not in forest and 'C-A3' not in forest and 'C-B5 (sequence)' in forest
  assert [p[0] for p in forest['C-A1']['points']] == [2000, 4000, 8000] and forest['C-A1']['expected'] == 'Δ > 0'
  tokens, delta, low, high, verdict = forest['C-A1']['points'][-1]
  assert low < delta < high and verdict == 'holds' and forest['C-B3']['expected'] == '|Δ| < T'


def test_token_points_are_one_per_configuration_and_budget(rows):
  x, y, groups = budgets.token_points(rows[:5])
  assert len(y) == 15 and len(set(groups.tolist())) == 5 and sorted(set(x['tokens'].tolist())) == [2000, 4000, 8000]
  assert np.all(x['n_active'] <= x['n_total'])


def _law(rng, configurations=10, floor=1.6, sd=0.002):
  """L = floor + 60 / N^0.35 + 300 / D^0.4 at `configurations` N_active values, each at three budgets D."""
  n = np.repeat(np.geomspace(2e4, 2e6, configurations), 3)
  d = np.tile([2.5e5, 5e5, 1e6], configurations)
  x = {'n_total': 4 * n, 'n_active': n, 'tokens': d}
  y = floor + 60 * n ** -0.35 + 300 * d ** -0.4 + rng.normal(0, sd, len(n))
  return x, y, np.repeat(np.arange(configurations), 3)


@pytest.mark.slow  # a 5-parameter fit with bootstrap and leave-one-configuration-out: ~15 s on 2 busy cores
def test_the_token_law_recovers_known_exponents_and_beats_its_baselines():
  x, y, groups = _law(np.random.default_rng(0), configurations=25)  # 5 configurations per free parameter
  got = fits.fit_token_laws(x, y, groups, bootstrap=20, starts=16)
  c = got['chinchilla']
  for name, true in (('alpha', 0.35), ('beta', 0.4)):
    low, high = c.intervals[name]
    assert low < true < high and high - low < 0.3, (name, c.intervals[name])
  assert c.extrapolation_n == 5  # whole configurations held out (25 configurations, 20%)
  assert fits.beats_baselines(got, 'chinchilla', baselines=fits.TOKEN_BASELINES)
  assert 'largest N_active' in {r['score'] for r in fits.baseline_comparisons(got, 'chinchilla',
                                                                              baselines=fits.TOKEN_BASELINES)}


def test_a_parameter_on_its_bound_is_reported_there_without_an_interval():
  x, y, groups = _law(np.random.default_rng(1), floor=-0.3)  # a negative floor: E >= 0 sits at 0
  c = fits.fit('chinchilla', x, y, max_starts=2, bootstrap=1, refit_starts=1, loo=False, groups=groups,
               holdout='n_active')
  assert c.at_bound.get('E') == 0.0 and 'E' not in c.intervals and 'alpha' in c.intervals
  assert 'E = 0 (at its bound 0: not identified, no interval)' in render.fits_table([c], largest='N_active')


def test_grouped_fits_leave_out_and_resample_whole_configurations(monkeypatch):
  seen = []
  real = fits._best  # pylint: disable=protected-access

  def spy(form, x, y, grid):
    seen.append(np.sort(x['n_active']))
    return real(form, x, y, grid)

  monkeypatch.setattr(fits, '_best', spy)
  x, y, groups = _law(np.random.default_rng(2))
  f = fits.fit('log_linear_tokens', x, y, max_starts=2, bootstrap=3, refit_starts=1, groups=groups,
               holdout='n_active')
  sizes = np.unique(x['n_active'])
  for used in seen:  # every refit sees each configuration's three budgets together (or not at all)
    counts = np.array([np.sum(np.isclose(used, s)) for s in sizes])
    assert np.all(counts % 3 == 0), counts
  assert len(f.loo_errors) == 30 and f.extrapolation_n == 2 and len(f.extrapolation_errors) == 6
  assert set(np.unique(x['n_active'][f.outside])) == set(sizes[-2:])  # the two largest N_active


def test_a_sign_change_within_the_noise_is_not_called_crossing():
  """'crosses 0' needs the change of the effect resolved; a near-zero effect flipping sign by noise is not."""
  from moejax.studies.verdicts import Claim  # pylint: disable=import-outside-toplevel

  def claim(delta, half_width=None):
    c = Claim('C-X', 'x', 'x', 'Δ < 0', 'inconclusive', '')
    c.delta, c.half_width = delta, half_width
    return c
  tendency = budgets._tendency  # pylint: disable=protected-access
  assert tendency(claim(-0.002), claim(+0.003), claim(+0.005, 0.02)) == 'sign differs (not resolved)'
  assert tendency(claim(-0.05), claim(+0.04), claim(+0.09, 0.02)) == 'crosses 0'
  assert tendency(claim(-0.20), claim(-0.05), claim(+0.15, 0.02)) == 'shrinks'


def test_the_token_law_is_not_fitted_on_one_budget():
  """With every point at one D, B and beta are free: a fit there 'beat the baselines' with beta = 1.76."""
  rng = np.random.default_rng(0)
  n = np.exp(rng.uniform(np.log(1e5), np.log(1e7), 25))
  x = {'n_total': n * 4, 'n_active': n, 'tokens': np.full(25, 2e6)}
  y = 1.5 + 30 * n ** -0.3 + rng.normal(0, 0.003, 25)
  assert fits.fit_token_laws(x, y, np.arange(25), bootstrap=0, starts=2, loo=False) == {}
  assert any('3 token budgets' in line for line in render.token_fit_lines({}, 25))


def test_the_plan_marks_an_effect_of_interest_taken_from_a_shrinking_pilot_effect(rows):
  """The power plan's "pilot's effect" column: C-A1's pilot effect still shrinks (an effect of interest taken from
  it is likely too large for a longer run), B1's is steady; keyed as the plan's claims (C-B5's two variants)."""
  from moejax.studies import plan  # pylint: disable=import-outside-toplevel
  trends = plan.pilot_trends(rows, 'tiny')
  assert trends['C-A1'] == 'shrinks' and trends['C-B1'] == 'no change resolved'
  assert {'C-B5/sequence', 'C-B5/aux_free', 'prior', 'C-B6'} <= set(trends) and trends['C-B2'] == '-'
  assert set(trends) <= {s.key for s in plan.SPECS}

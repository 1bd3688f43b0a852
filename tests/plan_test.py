"""Power planning (moejax/studies/plan.py) on synthetic inputs where the answer is known: the planned seeds give 80%
power under the real verdict rules, more budget never decides fewer claims, undecidable claims are named."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moejax import config as config_lib
from moejax.errors import ConfigError, DataError
from moejax.model import accounting
from moejax.studies import plan, power, render_plan, results, statistics, verdicts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _estimate(rng, sigma, dof):
  return statistics.Noise(float(sigma * np.sqrt(rng.chisquare(dof) / dof)), dof)


@pytest.mark.slow
def test_planned_seeds_give_80_percent_power_under_the_verdict_rules():
  sigma, effect, configs = 0.013, 0.02, 30
  a = (sigma, configs, 'default')
  n, _ = power.smallest(lambda k: power.power_pair(k, effect, a, a))
  assert n == statistics.Noise(sigma, (configs - 1) * (n - 1)).seeds_to_resolve(effect)  # the closed form agrees
  rng = np.random.default_rng(0)
  got = []
  for _ in range(1500):  # simulate the study and decide with verdicts.direction
    noise = _estimate(rng, sigma, (configs - 1) * (n - 1))
    delta = effect + rng.normal(0, sigma * np.sqrt(2 / n))
    got.append(verdicts.direction(delta, noise.half_width({'seeds': n}, {'seeds': n}), +1) == 'holds')
  assert 0.75 < np.mean(got) < 0.88, (n, np.mean(got))


@pytest.mark.slow
def test_planned_equivalence_seeds_show_equivalence_80_percent_of_the_time():
  sigma, margin, configs = 0.013, 0.02, 30
  a = (sigma, configs, 'default')
  n, _ = power.smallest(lambda k: power.power_pair(k, margin, a, a, equivalence=True, margin=margin))
  rng = np.random.default_rng(1)
  got = []
  for _ in range(1500):  # true difference 0, decided by verdicts.small_effect (TOST)
    noise = _estimate(rng, sigma, (configs - 1) * (n - 1))
    c = {'name': 'c', 'seeds': n, 'loss_mean': 2.0}
    v = dict(c, name='v', loss_mean=2.0 + rng.normal(0, sigma * np.sqrt(2 / n)))
    got.append(verdicts.small_effect('X', 'g', 's', c, v, margin, noise).verdict == 'holds')
  assert 0.75 < np.mean(got) < 0.88, (n, np.mean(got))


@pytest.mark.slow
def test_planned_trend_seeds_pass_the_slope_test_and_the_drop_one_check():
  sigma, effect, m, configs = 0.013, 0.03, 4, 30
  n, _ = power.smallest(lambda k: power.power_trend(k, effect, m, sigma, configs))
  rng = np.random.default_rng(2)
  got = []
  for _ in range(500):  # decided by verdicts.trend_claim, hinge check included
    noise = _estimate(rng, sigma, (configs - 1) * (n - 1))
    pts = [{'name': f'p{i}', 'x': i, 'seeds': n, 'loss_mean': 2 + effect * i / (m - 1) + rng.normal(0, sigma / np.sqrt(n))}
           for i in range(m)]
    got.append(verdicts.trend_claim('X', 's', 'e', 'g', pts, 'x', +1, noise).verdict == 'holds')
  assert 0.72 < np.mean(got) < 0.9, (n, np.mean(got))
  # without the drop-one check (the slope test alone) fewer seeds would do: the plan prices the real rule
  alone, _ = power.smallest(lambda k: power.power_trend(k, effect, 2, sigma * np.sqrt(5 / 9 * 2) / np.sqrt(2), configs))
  assert n > alone


def test_argmin_power_rises_with_seeds_and_a_flat_grid_is_never_decided():
  sizes = (96, 64, 48, 32, 24)
  low, high = (power.power_argmin(n, 0.02, sizes, (96, 48, 24), 0.013, 30, disjoint=False) for n in (2, 16))
  assert low < 0.8 < high
  assert power.power_argmin(64, 0.0, sizes, (96, 48, 24), 0.013, 30, disjoint=False) < 0.1  # pure noise


def test_budgets_parse_to_seconds_or_flops_and_refuse_nonsense():
  assert plan.parse_budget('8h') == (28800.0, 's') and plan.parse_budget('90m') == (5400.0, 's')
  assert plan.parse_budget('1e15FLOPs') == (1e15, 'FLOPs')
  for bad, words in (('lots', 'cannot parse'), ('8parsecs', 'unknown unit'), ('1e400h', 'finite positive'),
                     ('0h', 'finite positive'), ('8', 'needs a unit')):
    with pytest.raises(ConfigError, match=words):
      plan.parse_budget(bad)


def _pilot(root, sigma=0.01, perturbed=0.05):
  """A synthetic tiny pilot: every grid configuration at seeds 0 and 1, loss 2.0 plus known seed noise (default
  class sigma, routing-perturbed class `perturbed`), 100 s of wall time per run, decay curves at 1/4 and 1/2."""
  rng = np.random.default_rng(3)
  for name in ('paper_a', 'paper_b'):
    module = config_lib.load_module(os.path.join(ROOT, 'experiments', f'{name}.py'))
    base = module.get_config('tiny')
    for grid, points in module.designs('tiny').items():
      for p0 in points:
        s = perturbed if module.noise_class(p0) == 'routing-perturbed' else sigma
        for seed in (0, 1):
          p = dict(p0, seed=seed, name=p0['name'] + f'-seed{seed}', **{'data.seed': seed})
          if os.path.exists(os.path.join(root, p['name'])):
            continue
          cfg = config_lib.validate(config_lib.apply_overrides(base, p))
          loss = 2.0 + rng.normal(0, s)
          record = {'name': p['name'], 'config': json.loads(cfg.to_json_best_effort()),
                    'accounting': accounting.count(cfg), 'eval': {'loss': loss, 'bits_per_byte': 3.0},
                    'train': {'tokens': 2048000, 'wall_s': 100.0, 'steps': 500},
                    'decay_curve': [{'step': 125, 'tokens': 512000, 'loss': loss + 0.5 + rng.normal(0, 2 * s)},
                                    {'step': 250, 'tokens': 1024000, 'loss': loss + 0.2 + rng.normal(0, 2 * s)},
                                    {'step': 500, 'tokens': 2048000, 'loss': loss}]}
          os.makedirs(os.path.join(root, p['name']))
          with open(os.path.join(root, p['name'], 'result.json'), 'w') as f:
            json.dump(record, f)


@pytest.fixture(scope='module')
def pilot(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('pilot'))
  _pilot(root)
  return results.gather(root)


@pytest.mark.slow
def test_more_budget_never_decides_fewer_claims_and_undecidable_ones_are_named(pilot, monkeypatch):
  monkeypatch.setattr(power, 'DRAWS', 1500)
  monkeypatch.setattr(power, 'ARGMIN_OUTER', 120)
  made = [plan.plan(pilot, 'tiny', h * 3600, 's', lengths=(1.0,)) for h in (0.5, 5, 50, 1000)]
  decided = [sum(r.decidable for r in p.rows) for p in made]
  assert decided == sorted(decided) and decided[0] < decided[-1], decided
  for p, h in zip(made, (0.5, 5, 50, 1000)):
    assert p.hours <= h + 1e-9  # never over budget
  rows = {r.key: r for r in made[0].rows}
  assert not rows['C-A3'].decidable and 'larger scale' in rows['C-A3'].note  # a fit: seeds do not decide it
  undecided = [r for r in made[0].rows if not r.decidable and r.seeds]
  assert undecided and all('needs' in r.note and ' h on its own' in r.note for r in undecided)
  # every run costs 100 s at the pilot's length (both seeds' wall time is recorded): hours are runs x 100 s
  prior = rows['prior']
  assert prior.hours == pytest.approx(prior.runs * 100 / 3600)
  # the noisier class needs more seeds for the same effect
  assert rows['C-B5/sequence'].seeds > rows['C-B3'].seeds
  text = render_plan.plan_markdown(made[0])
  assert 'Not decidable within this budget: ' in text and 'C-A3' in text.split('Not decidable')[1]
  assert made[-1].lengths[0]['plannable'] == sum(r.decidable for r in made[-1].rows)  # enough budget: all plannable


def test_the_plan_noise_is_the_pilot_noise_per_class(pilot):
  rows, _ = results.table(pilot.records)
  from moejax.studies import grids  # pylint: disable=import-outside-toplevel
  noise = plan.class_noise_by_length(rows, pilot.records, grids.grid_rows(rows, 'tiny'))
  assert set(noise) == {'default', 'routing-perturbed'} and set(noise['default']) == {0.25, 0.5, 1.0}
  assert 0.006 < noise['default'][1.0][0] < 0.014 and 0.025 < noise['routing-perturbed'][1.0][0] < 0.09
  assert noise['default'][0.25][0] > noise['default'][1.0][0]  # the branches were made twice as noisy


def test_plan_cli_refuses_a_bad_budget_in_one_line(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'moejax.claims', f'--root={tmp_path}', '--plan', '--budget=lots'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert 'cannot parse the budget' in out.stderr


@pytest.mark.parametrize('flags,message', [
    ({'plan': True}, '--plan needs --root'),
    ({'emit': 'x.py'}, '--emit applies to --plan'),
    ({'pilot_scale': 'tiny'}, '--pilot_scale applies to a plan'),
    ({'budget': '1h', 'pilot_root': '/nonexistent'}, '--pilot_root=/nonexistent is not a directory'),
    ({'plan': True, 'budget': '1h', 'pilot_root': '/tmp'}, '--pilot_root applies to the report'),
    ({'plan': True, 'budget': '1h', 'done_root': '/tmp'}, '--done_root applies to --emit'),
    ({'plan': True, 'budget': '1h', 'emit': 'x.py', 'done_root': '/nonexistent'}, '--done_root=/nonexistent is not a'),
    ({'plan': True, 'budget': '1h', 'emit': '/nonexistent/x.py'}, 'does not exist or is not writable'),
    ({'lr_rule': True, 'root': None}, '--lr_rule needs --root'),
    ({'lr_rule': True, 'plan': True, 'budget': '1h'}, '--lr_rule prints the rate rule only; it does not take --plan'),
    ({'lr_rule': True, 'out': '/tmp/x'}, 'does not take --out'),
    ({'calibrate': ['/tmp']}, '--calibrate applies to a plan'),
    ({'plan': True, 'budget': '1h', 'calibrate': ['/nonexistent']}, 'give --pilot_scale'),
    ({'plan': True, 'budget': '1h', 'pilot_scale': 'tiny', 'scale': 'tiny2', 'calibrate': ['/nonexistent']},
     '--calibrate=/nonexistent: no result.json there'),
    ({'plan': True, 'budget': '1h', 'pilot_scale': 'tiny', 'scale': 'tiny', 'calibrate': ['/tmp']}, 'give --pilot_scale'),
    ({'plan': True, 'budget': '1h', 'emit': '/tmp'}, '--emit=/tmp is a directory'),
])
def test_plan_flags_are_refused_before_planning(tmp_path, flags, message):
  """The checks `claims` runs first (a ConfigError is its one line and exit 2: the budget case above runs it)."""
  from moejax import claims  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  f = types.SimpleNamespace(**{'root': str(tmp_path), 'plan': False, 'budget': None, 'emit': None, 'pilot_scale': None,
                               'pilot_root': None, 'done_root': None, 'lr_rule': False, 'out': None, 'scale': 'tiny',
                               **flags})
  with pytest.raises(ConfigError, match=message):
    claims.check_flags(f)


def test_a_plan_for_another_scale_takes_noise_from_the_pilot_and_points_from_the_scale(pilot, monkeypatch, tmp_path):
  """tiny2 planned from the tiny pilot: its own run length (3x the pilot's tokens: the pilot's full-length noise),
  its own points and prices; the emitted experiment file holds the chosen configurations at their seeds, less the
  runs already made, and every point resolves to a tiny2 grid configuration."""
  from experiments import papers  # pylint: disable=import-outside-toplevel
  from moejax.studies import emitted, grids, sweeps  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(papers.LR_RULE, 'tiny2', {2: {64: 8e-3, 96: 4e-3, 144: 2e-3}, 8: {64: 8e-3, 96: 8e-3, 144: 4e-3}})
  monkeypatch.setattr(power, 'DRAWS', 800)
  monkeypatch.setattr(power, 'ARGMIN_OUTER', 60)
  p = plan.plan(pilot, 'tiny2', 12 * 3600, 's', lengths=(1.0,), pilot_scale='tiny')
  assert p.scale == 'tiny2' and p.pilot_scale == 'tiny' and p.steps == 1500 and p.tokens == 1500 * 32 * 128
  rows = {r.key: r for r in p.rows}
  assert rows['prior'].sigma == pytest.approx(p.noise['default'][1.0][0])  # the pilot's full-length sigma
  assert rows['C-B5/sequence'].sigma == pytest.approx(p.noise['routing-perturbed'][1.0][0])
  # prices: tiny2's own FLOPs per run (3x the tokens of the same designs) at the pilot's seconds per FLOP
  tiny = {r.key: r for r in plan.plan(pilot, 'tiny', 12 * 3600, 's', lengths=(1.0,)).rows}
  assert rows['prior'].flops / rows['prior'].runs == pytest.approx(3 * tiny['prior'].flops / tiny['prior'].runs, rel=0.02)
  assert 0 < p.hours <= 12
  assert p.points and all(n >= 2 for _, n, _ in p.points)
  tiny2 = {q['config_hash'] for pts in grids.grid_points('tiny2').values() for q in pts}
  assert {h for _, _, h in p.points} <= tiny2
  first, n_first, h_first = p.points[0]
  path = str(tmp_path / 'tiny2_plan.py')
  runs = emitted.plan_sweep(path, p, os.path.join(ROOT, 'experiments', 'papers.py'), 'python -m moejax.claims ...',
                            done={(h_first, '0/0')})
  assert len(runs) == sum(n for _, n, _ in p.points) - 1  # seed 0 of the first configuration was made already
  assert first['name'] not in {r['name'] for r in runs} and f'{first["name"]}-seed1' in {r['name'] for r in runs}
  module = config_lib.load_module(path)
  assert module.get_sweep() == runs and 'tiny2' in module.__doc__
  every = {(h, f'{i}/{i}') for _, n, h in p.points for i in range(n)}
  with pytest.raises(DataError, match='no runs to emit'):  # everything already made: nothing written
    emitted.plan_sweep(str(tmp_path / 'none.py'), p, os.path.join(ROOT, 'experiments', 'papers.py'), 'cmd', every)
  assert not os.path.exists(tmp_path / 'none.py')
  for _, cfg in sweeps.resolve_points(module.get_config(), runs):  # every point validates at tiny2
    assert cfg.train.steps == 1500 and cfg.model.head_dim == 16
  # the report at tiny2 before any run: each claim says whether the plan left it out, and the pilot's verdict
  from moejax.studies import claims as claims_lib, report  # pylint: disable=import-outside-toplevel
  before = claims_lib.evaluate(results.table(pilot.records)[0], 'tiny')[0]  # (pure noise: all inconclusive)
  next(c for c in before if verdicts.plan_key(c) == 'C-B5/aux_free').verdict = 'holds'  # one that differs from now's
  now = claims_lib.evaluate([], 'tiny2')[0]
  report.note_unplanned(now, p, ('tiny', before))
  by_key = {verdicts.plan_key(c): c for c in before}
  for c in now:
    row = rows.get(verdicts.plan_key(c))
    if c.kind == 'fit' or row is None:
      continue
    assert ('in the plan, not run yet' if row.decidable else f'the plan leaves it out ({row.note})') in c.detail
    assert c.detail.endswith(f'the pilot at `tiny`: {by_key[verdicts.plan_key(c)].verdict}')
  assert {r.decidable for r in p.rows if r.kind != 'fit'} == {True, False}  # both kinds of note were checked
  page = render_plan.plan_markdown(p, now, ('tiny', before))
  assert '| verdict now | verdict of the pilot (`tiny`) |' in page and "| source | pilot's effect |" in page
  assert all(r.pilot_trend != '-' for r in p.rows if r.kind in ('pair', 'trend', 'equivalence'))  # every Δ followed
  line = next(x for x in page.splitlines() if x.startswith('| C-B5/aux_free |'))
  assert line.endswith('| inconclusive | holds |')  # now's verdict, then the pilot's
  assert next(x for x in page.splitlines() if x.startswith('| C-A3 |')).endswith('| inconclusive | - |')  # a fit


def test_a_length_is_planned_only_where_every_class_has_its_noise_measured():
  """The routing-perturbed branch at 0.5 diverged (no sigma there): 0.5x is not a length the plan may use, and a
  class the pilot never measured has no sigma (not another class's)."""
  noise = {'default': {0.25: (0.03, 9), 0.5: (0.02, 9), 1.0: (0.013, 9)}, 'routing-perturbed': {1.0: (0.05, 5)}}
  assert not plan._measured(noise, 0.5) and plan._measured(noise, 1.0) and plan._measured(noise, 3.0)  # pylint: disable=protected-access
  assert plan._sigma_at(noise, 'default', 3.0) == 0.013 and plan._sigma_at(noise, 'other', 1.0) is None  # pylint: disable=protected-access


def test_claims_of_a_class_the_pilot_never_ran_are_not_planned(pilot, monkeypatch):
  """A pilot with no routing-perturbed runs (tiny2's own runs are such a pilot): the claims that involve that class
  are not planned on the default class's sigma (4x smaller at tiny), they say a pilot of it is needed first."""
  monkeypatch.setattr(power, 'DRAWS', 400)
  monkeypatch.setattr(power, 'ARGMIN_OUTER', 30)
  quiet = [r for r in pilot.records if not any(k in r['name'] for k in ('-cf', '-lb_', '-het'))]
  p = plan.plan(results.Gathered(quiet, [], []), 'tiny', 20 * 3600, 's', lengths=(1.0,))
  rows = {r.key: r for r in p.rows}
  for key in ('C-B4', 'C-B5/sequence', 'C-B6'):
    assert rows[key].seeds is None and not rows[key].decidable, key
    assert rows[key].note == 'the pilot measured no seed noise of the routing-perturbed class: a pilot of it first'
  assert rows['prior'].seeds is not None and rows['prior'].sigma == pytest.approx(p.noise['default'][1.0][0])


def _write_lr_grid(root, optimum):
  """Every tiny2 grid LR point's result.json as a run writes it, with loss 1.4 + 0.004 log2(lr / optimum(d, k))^2."""
  from moejax.studies import grids  # pylint: disable=import-outside-toplevel
  points = grids.grid_points('tiny2', ['LR'])['LR']
  for p in points:
    cfg = config_lib.validate(p['config'])
    lr, d, k = cfg.optim.peak_learning_rate, cfg.model.model_dim, cfg.moe.experts_per_token
    os.makedirs(root / p['point']['name'])
    with open(root / p['point']['name'] / 'result.json', 'w') as f:
      json.dump({'name': p['point']['name'], 'config': json.loads(cfg.to_json_best_effort()),
                 'accounting': accounting.count(cfg),
                 'eval': {'loss': 1.4 + 0.004 * np.log2(lr / optimum(d, k)) ** 2, 'bits_per_byte': 2.0},
                 'train': {'tokens': 6144000, 'wall_s': 300.0, 'steps': 1500}}, f)
  return points


def test_the_lr_rule_command_stops_when_an_optimum_lies_outside_its_sweep(tmp_path):
  """Optima falling as d^-3 put d=144, k=8's at 4.2e-4, beyond the 1e-3..8e-3 swept there: one line saying to extend
  the sweep there, no LR_RULE line to record."""
  from moejax.studies import report  # pylint: disable=import-outside-toplevel
  _write_lr_grid(tmp_path, lambda d, k: (1.2e-2 if k == 2 else 4.8e-3) * (64 / d) ** 3)
  with pytest.raises(DataError, match=r'd=144, k=8 \(0.00042\) lies outside the rates swept there.*extend'):
    report.lr_rule_page(str(tmp_path), 'tiny2')


def test_the_lr_rule_command_fits_the_rate_rule_from_grid_lr_runs(tmp_path):
  """`claims --lr_rule`: every tiny2 grid LR point as written by a run (synthetic losses whose optimum falls as 1/d)
  gives the LR_RULE entry to record; a missing point is one line naming it."""
  from moejax.studies import report  # pylint: disable=import-outside-toplevel
  points = _write_lr_grid(tmp_path, lambda d, k: (8e-3 if k == 2 else 1.2e-2) * 64 / d)
  assert len(points) == 26
  page = report.lr_rule_page(str(tmp_path), 'tiny2')
  slope = float(page.split('scales as width^(')[1].split(' ')[0])
  assert -1.3 < slope < -0.7  # the synthetic optimum falls as 1/d
  rule = eval(page.split("LR_RULE['tiny2'] = ")[1].split('`')[0])  # pylint: disable=eval-used
  assert set(rule) == {2, 8} and set(rule[2]) == {64, 96, 144}
  assert rule[2][64] == pytest.approx(8e-3, rel=0.1) and rule[2][144] == pytest.approx(8e-3 * 64 / 144, rel=0.15)
  os.remove(tmp_path / points[3]['point']['name'] / 'result.json')
  with pytest.raises(DataError, match=f'25 of 26 points .*{points[3]["point"]["name"]}'):
    report.lr_rule_page(str(tmp_path), 'tiny2')
  (tmp_path / points[4]['point']['name'] / 'result.json').write_text('{"name": ')  # a truncated one says so
  with pytest.raises(DataError, match=f'24 of 26 points .*unreadable: .*{points[4]["point"]["name"]}/result.json'):
    report.lr_rule_page(str(tmp_path), 'tiny2')


def test_the_report_shows_the_plan_the_runs_followed(tmp_path, monkeypatch):
  """`claims --budget --pilot_root --pilot_scale`: the plan beside tiny2's verdicts is made from the tiny pilot at
  tiny2's own run length (the plan that chose the runs), not from the tiny2 runs themselves."""
  import types  # pylint: disable=import-outside-toplevel
  from moejax.studies import report  # pylint: disable=import-outside-toplevel
  made = {}
  gathered = types.SimpleNamespace(records='the runs', unreadable=[])
  monkeypatch.setattr(report, 'study', lambda *a, **k: types.SimpleNamespace(gathered=gathered, claims=[], pilot=None))
  monkeypatch.setattr(report.results, 'gather', lambda root: types.SimpleNamespace(records=f'pilot under {root}'))
  monkeypatch.setattr(report.plan_lib, 'plan', lambda *a, **k: made.update(args=a, kwargs=k) or 'a plan')
  monkeypatch.setattr(report, 'write_claims', lambda s, out: made.update(study=s) or s.plan)
  monkeypatch.setattr(report.claims_lib, 'evaluate', lambda rows, scale: ([f'claims of {rows} at {scale}'], {}))
  monkeypatch.setattr(report.results, 'table', lambda records: (f'rows of {records}', []))
  monkeypatch.setattr(report, 'note_unplanned', lambda claims, p, pilot: made.update(noted=pilot))
  assert report.run('runs', 'tiny2', 'out', budget='8.5h', pilot_root='tiny-runs', pilot_scale='tiny') == 'a plan'
  assert made['args'][0].records == 'pilot under tiny-runs' and made['args'][1:] == ('tiny2', 8.5 * 3600, 's')
  assert made['kwargs'] == {'lengths': (1.0,), 'pilot_scale': 'tiny', 'calibrate': []}
  assert made['study'].pilot == made['noted'] == ('tiny', ['claims of rows of pilot under tiny-runs at tiny'])
  made.clear()
  report.run('runs', 'tiny', 'out', budget='1h')
  assert made['args'][0] is gathered and made['kwargs']['pilot_scale'] is None
  assert 'noted' not in made  # the runs are their own pilot: no second verdict column


def test_a_plan_that_decides_nothing_is_still_written_before_emit_refuses(tmp_path, monkeypatch):
  """--emit with a budget too small for any claim: plan.md is written (the page says what each claim would need),
  then one error line saying the plan decides no claim; no experiment file."""
  from moejax.studies import report  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(power, 'DRAWS', 200)
  monkeypatch.setattr(power, 'ARGMIN_OUTER', 20)
  _pilot(str(tmp_path / 'pilot'))
  with pytest.raises(report.PlanEmitError, match='decides no claim within its budget') as e:
    report.plan_page(str(tmp_path / 'pilot'), 'tiny', '10s', str(tmp_path / 'out'), emit=str(tmp_path / 'x.py'))
  assert not os.path.exists(tmp_path / 'x.py')
  with open(tmp_path / 'out' / 'plan.md') as f:
    assert f.read() == e.value.page and '# Power plan at scale `tiny`' in e.value.page


def test_a_calibrated_plan_prices_every_run_by_the_measured_over_priced_wall_time(pilot, monkeypatch):
  """--calibrate: a run at the planned scale that took 1.5x its price makes every claim's cost 1.5x (and the page
  says so); the factor is measured / priced wall time, so doubling the run's wall doubles it."""
  monkeypatch.setattr(power, 'DRAWS', 200)
  monkeypatch.setattr(power, 'ARGMIN_OUTER', 20)
  record = json.loads(json.dumps(pilot.records[0]))  # made a tiny2 run: tiny2's length, 3x the tokens
  record['config']['train']['steps'], record['train']['tokens'] = 1500, 3 * record['train']['tokens']
  base = plan.calibration(results.table(pilot.records)[0], [record])
  record['train']['wall_s'] *= 1.5 / base
  assert plan.calibration(results.table(pilot.records)[0], [record]) == pytest.approx(1.5)
  slow = json.loads(json.dumps(record))
  slow['train']['wall_s'] *= 2
  assert plan.calibration(results.table(pilot.records)[0], [record, slow, slow]) == pytest.approx(3.0)  # the median
  plain = plan.plan(pilot, 'tiny2', 5 * 3600, 's', lengths=(1.0,), pilot_scale='tiny')
  calibrated = plan.plan(pilot, 'tiny2', 5 * 3600, 's', lengths=(1.0,), pilot_scale='tiny', calibrate=[record])
  for a, b in zip(plain.rows, calibrated.rows):
    if a.hours is not None:
      assert b.hours == pytest.approx(1.5 * a.hours) and b.flops == pytest.approx(a.flops)
  assert f'x 1.50, the measured / priced wall time of 1 run(s) at this scale' in render_plan.plan_markdown(calibrated)
  assert 'x 1.' not in render_plan.plan_markdown(plain).split('recorded speed')[1][:5]
  with pytest.raises(ConfigError, match='--calibrate prices a scale the pilot did not run'):
    plan.plan(pilot, 'tiny', 5 * 3600, 's', lengths=(1.0,), calibrate=[record])
  with pytest.raises(DataError, match='has 500 steps of 128 tokens, not the tiny2 run.s 1500 of 128'):
    plan.plan(pilot, 'tiny2', 5 * 3600, 's', lengths=(1.0,), pilot_scale='tiny', calibrate=[pilot.records[0]])


@pytest.mark.parametrize('change,message', [
    (lambda r: r['train'].pop('wall_s'), "lacks 'wall_s'"),
    (lambda r: r.pop('accounting'), "lacks 'accounting'"),
    (lambda r: r['train'].update(wall_s=0.0), 'must be positive numbers'),
    (lambda r: r['train'].update(wall_s=float('nan')), 'must be positive numbers'),
])
def test_a_calibration_run_that_cannot_price_is_one_line(pilot, tmp_path, change, message):
  """--calibrate reads each run before anything is planned: one DataError naming the run and what it lacks, never a
  KeyError or a plan priced at 0 or NaN times."""
  from moejax.studies import report  # pylint: disable=import-outside-toplevel
  record = json.loads(json.dumps(pilot.records[0]))
  change(record)
  os.makedirs(tmp_path / 'run')
  with open(tmp_path / 'run' / 'result.json', 'w') as f:
    json.dump(record, f)  # (NaN as Python's json writes it)
  with pytest.raises(DataError, match=f'calibration run .*result.json.*{message}'):
    report.calibration_runs([str(tmp_path / 'run')])


def test_emit_refuses_a_done_root_of_another_scale(pilot, monkeypatch, tmp_path):
  """--done_root holding runs, none of them at the plan's length (another scale's): the plan is written and printed,
  then one line; nothing is emitted (it would have emitted every run as not yet made)."""
  from experiments import papers  # pylint: disable=import-outside-toplevel
  from moejax.studies import report  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(papers.LR_RULE, 'tiny2', {2: {64: 8e-3, 96: 4e-3, 144: 2e-3}, 8: {64: 8e-3, 96: 8e-3, 144: 4e-3}})
  monkeypatch.setattr(power, 'DRAWS', 200)
  monkeypatch.setattr(power, 'ARGMIN_OUTER', 20)
  monkeypatch.setattr(report.results, 'gather', lambda r: pilot)  # the pilot (tiny) is also the done_root here
  with pytest.raises(report.PlanEmitError, match='holds no run of the plan.s length .*another scale') as e:
    report.plan_page('pilot', 'tiny2', '12h', str(tmp_path / 'out'), pilot_scale='tiny', emit=str(tmp_path / 'x.py'),
                     done_root='tiny-runs')
  assert not os.path.exists(tmp_path / 'x.py') and '# Power plan at scale `tiny2`' in e.value.page


def test_the_report_warns_of_result_files_it_could_not_read(monkeypatch, capsys):
  """A truncated result.json under --root is left out of the report: one warning line on stderr names it (the page
  lists it too), so a run never silently drops out of the verdicts."""
  import types  # pylint: disable=import-outside-toplevel
  from moejax.studies import report  # pylint: disable=import-outside-toplevel
  gathered = types.SimpleNamespace(unreadable=[('runs/x/result.json', 'not valid JSON')])
  monkeypatch.setattr(report, 'study', lambda *a, **k: types.SimpleNamespace(gathered=gathered))
  monkeypatch.setattr(report, 'write_claims', lambda s, out: 'page')
  assert report.run('runs', 'tiny', 'out') == 'page'
  assert capsys.readouterr().err == 'moejax: warning: skipped runs/x/result.json (not valid JSON)\n'

"""Compute-matched frontiers: matched grids recounted, refusals, the emitted file, the analysis on known optima."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.inference import cost as decode_cost
from moejax.model import accounting
from moejax.studies import frontier, frontier_analysis, sweeps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'experiments', 'quickstart.py')


@pytest.fixture(scope='module')
def base():
  return config_lib.validate(config_lib.load_module(QUICKSTART).get_config())


def _spec(base, match='flops', budgets='x1,x2,x4', **kw):
  spec = frontier.Spec(match, (1.0,), **kw)
  return frontier.Spec(**dict(spec.__dict__, budgets=frontier.parse_budgets(
      budgets, match, frontier.quantity(base, spec), spec.bytes_per_param)))


def _designs(**kw):
  axes = dict(experts=[1, 4, 16], topk=[2, 4], shared=[0, 1], ratios=[(1,), (1, 3)], expert_hidden=[None])
  axes.update(kw)
  return frontier.designs_from_axes(**axes)


def _recount(cfg, match, bpp=2.0, batch=1):
  """The cost straight from moejax.model.accounting / moejax.inference.cost (not through frontier.quantity)."""
  if match == 'flops':
    return accounting.count(cfg)['flops_per_token']
  if match == 'memory':
    return accounting.count(cfg)['n_total'] * bpp
  return decode_cost.step_bytes(cfg, batch, cfg.data.seq_len, bpp, bpp)['total']


def test_flop_matched_grid_is_within_its_tolerance(base):
  spec = _spec(base, 'flops', tolerance=0.02)
  result = frontier.build(base, _designs(), spec)
  assert len(result.designs) >= 10 and len(spec.budgets) == 3
  assert spec.budgets[1] == pytest.approx(2 * spec.budgets[0]) and spec.budgets[2] == pytest.approx(4 * spec.budgets[0])
  for m in result.matches:
    cfg = config_lib.validate(config_lib.apply_overrides(base, m.overrides))
    flops = accounting.count(cfg)['flops_per_token']
    assert abs(flops / spec.budgets[m.budget_index] - 1) <= 0.02, (m.design.label, m.budget_index, flops)
  labels = {d.label for d in result.designs}
  assert {'dense', 'e4k2', 'e16k4-sh1', 'e4k2-h1-3'} <= labels  # every axis is represented
  heterogeneous = next(m for m in result.matches if m.design.label == 'e4k2-h1-3')
  assert heterogeneous.overrides['moe.expert_size_classes'] == f'2x{heterogeneous.value},2x{3 * heterogeneous.value}'


@pytest.mark.parametrize('match', ['flops', 'memory', 'decode'])
def test_each_budget_axis_is_held_fixed(base, match):
  spec = _spec(base, match, 'x1,x2', tolerance=0.03, decode_batch=4)
  result = frontier.build(base, _designs(topk=[2], shared=[0], ratios=[(1,)]), spec)
  for m in result.matches:
    cfg = config_lib.validate(config_lib.apply_overrides(base, m.overrides))
    assert abs(_recount(cfg, match, batch=4) / spec.budgets[m.budget_index] - 1) <= 0.03, (match, m.design.label)
  by_design = {}
  for m in result.matches:
    by_design.setdefault(m.design.label, []).append(m.value)
  assert all(v[1] > v[0] for v in by_design.values())  # a larger budget buys a larger free dimension


def test_width_is_solved_with_heads_that_grow(base):
  spec = _spec(base, 'flops', 'x2,x4', tolerance=0.1, solve='model_dim')
  result = frontier.build(base, _designs(topk=[2], shared=[0], ratios=[(1,)], expert_hidden=[64]), spec)
  for m in result.matches:
    o = m.overrides
    assert o['model.model_dim'] == m.value and o['model.num_heads'] * 32 == m.value and m.value % 32 == 0
    cfg = config_lib.validate(config_lib.apply_overrides(base, o))
    assert abs(accounting.count(cfg)['flops_per_token'] / m.budget - 1) <= 0.1


def test_designs_that_cannot_match_are_dropped_with_the_reason(base):
  spec = _spec(base, 'flops', 'x1,x2', tolerance=0.001, step=64)
  with pytest.raises(ConfigError, match=r'only [01] design\(s\) match every budget within ±0.1%'):
    frontier.build(base, _designs(experts=[4, 16], topk=[1, 2], shared=[0], ratios=[(1,)]), spec)
  spec = _spec(base, 'flops', 'x1,x2', tolerance=0.02)
  result = frontier.build(base, _designs(experts=[1, 4, 16], topk=[1, 2], shared=[0], ratios=[(1,)]), spec)
  reasons = dict(result.dropped)
  assert 'constant 1' in reasons['e4k1'] and 'e4k1' not in {d.label for d in result.designs}
  tiny = frontier.Spec('flops', (1e5,), tolerance=0.02)  # below the floor: attention and the unembedding alone exceed it
  with pytest.raises(ConfigError, match=r'no expert_hidden within ±2.0% of 1e\+05 \(8 gives \+'):
    frontier.build(base, _designs(experts=[1, 4], topk=[2], shared=[0], ratios=[(1,)]), tiny)
  with pytest.raises(ConfigError, match='--tolerance'):
    frontier.build(base, _designs(), frontier.Spec('flops', (1e6,), tolerance=0))


def test_budgets_parse_multiples_amounts_and_refuse_bytes_for_flops():
  assert frontier.parse_budgets('x2,x1', 'flops', 10.0, 2.0) == (10.0, 20.0)
  assert frontier.parse_budgets('1e6,4MB', 'memory', 1.0, 2.0) == (2e6, 4e6)  # a plain memory number is parameters
  for bad, match in (('4MB', 'flops'), ('xx', 'flops'), ('', 'flops'), ('-1', 'decode')):
    with pytest.raises(ConfigError):
      frontier.parse_budgets(bad, match, 1.0, 2.0)
  assert frontier.parse_ratios('1,1:3') == [(1,), (1, 3)]
  with pytest.raises(ConfigError, match='--classes'):
    frontier.parse_ratios('1:0')


def test_emitted_file_loads_and_validates_every_point(base, tmp_path):
  spec = _spec(base, 'flops', 'x1,x2', tolerance=0.02)
  result = frontier.build(base, _designs(topk=[2], ratios=[(1,)]), spec)
  path = str(tmp_path / 'my_frontier.py')
  written = frontier.emit(path, result, 2, QUICKSTART, None, 'python -m moejax.frontier ...', 1000, 1e10)
  module = config_lib.load_module(path)
  assert 'at fixed training FLOPs per token' in module.__doc__ and 'Cost:' in module.__doc__
  assert 'python -m moejax.sweep --config=' in module.__doc__ and 'minutes of training' in module.__doc__
  points = module.get_sweep()
  assert points == written and len(points) == len(result.matches) * 2
  resolved = sweeps.resolve_points(module.get_config(), points)  # validates every point (unique names too)
  for (name, cfg), p in zip(resolved, points):
    point = module.FRONTIER['points'][frontier_analysis.design_of(name)]
    assert cfg.seed == cfg.data.seed == p['seed']
    budget = module.FRONTIER['budgets'][point['budget']]
    assert abs(accounting.count(cfg)['flops_per_token'] / budget - 1) <= 0.02
  assert frontier.spec_from(module.FRONTIER) == spec
  assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def _records(base, result, loss_of, seeds, root=None):
  """Fake result.json records of every point, with loss_of(design label, budget index, seed)."""
  records = []
  for p in frontier.points(result, seeds):
    cfg = config_lib.validate(config_lib.apply_overrides(base, p))
    point = frontier.metadata(result, seeds)['points'][frontier_analysis.design_of(p['name'])]
    design, j = point['design'], point['budget']
    loss = loss_of(design, j, p['seed'])
    rec = {'name': p['name'], 'config': json.loads(cfg.to_json_best_effort()), 'accounting': accounting.count(cfg),
           'eval': {'loss': loss, 'bits_per_byte': loss / math.log(2)}, 'train': {'tokens': 1000, 'wall_s': 1.0}}
    if root:
      os.makedirs(os.path.join(root, p['name']))
      with open(os.path.join(root, p['name'], 'result.json'), 'w') as f:
        json.dump(rec, f)
    records.append(dict(rec, _path=f'/x/{p["name"]}/result.json'))
  return records


KNOWN = {0: {'dense': 2.20, 'e4k2': 2.00, 'e16k2': 2.10}, 1: {'dense': 2.00, 'e4k2': 1.95, 'e16k2': 1.80}}


def _known_loss(design, j, seed):
  rng = np.random.default_rng([sorted(KNOWN[0]).index(design), j, seed])
  return KNOWN[j][design] + 0.01 * seed + 0.004 * rng.standard_normal()  # a shared seed effect plus noise


def test_analysis_finds_the_known_optimum_and_its_move(base):
  spec = _spec(base, 'flops', 'x1,x2', tolerance=0.02)
  result = frontier.build(base, _designs(experts=[1, 4, 16], topk=[2], shared=[0], ratios=[(1,)]), spec)
  meta = frontier.metadata(result, 3)
  out = frontier_analysis.analyze(_records(base, result, _known_loss, 3), meta)
  assert [b['best'] for b in out['budgets']] == ['e4k2', 'e16k2']
  assert out['noise']['paired_dof'] == (6 - 1) * (3 - 1)
  for b in out['budgets']:
    assert b['rows'][0]['p_best'] > 0.99 and b['rows'][0]['loss_half_width'] > 0
    assert not any(r['tied'] for r in b['rows'][1:])
  move = out['moves'][0]
  assert (move['from'], move['to']) == ('e4k2', 'e16k2') and move['p_same'] < 0.01
  assert move['axes']['num_experts']['verdict'] == 'up' and move['axes']['num_experts']['to'] == 16
  assert move['axes']['n_total']['verdict'] == 'up'


def test_analysis_without_noise_gives_no_interval_and_resolves_nothing(base):
  spec = _spec(base, 'flops', 'x1,x2', tolerance=0.02)
  result = frontier.build(base, _designs(experts=[1, 4, 16], topk=[2], shared=[0], ratios=[(1,)]), spec)
  out = frontier_analysis.analyze(_records(base, result, _known_loss, 1), frontier.metadata(result, 1))
  assert [b['best'] for b in out['budgets']] == ['e4k2', 'e16k2']
  assert out['budgets'][0]['rows'][0]['p_best'] is None and out['budgets'][0]['axes']['num_experts']['lo'] is None
  assert {a['verdict'] for a in out['moves'][0]['axes'].values()} == {'not resolved'}


def test_analysis_leaves_out_runs_off_their_budget(base):
  spec = _spec(base, 'flops', 'x1,x2', tolerance=0.02)
  result = frontier.build(base, _designs(experts=[1, 4, 16], topk=[2], shared=[0], ratios=[(1,)]), spec)
  records = _records(base, result, _known_loss, 2)
  records[0]['config']['data']['seq_len'] = 512  # attention FLOPs grow with the context: off the budget
  records.append(dict(records[1], name='stranger', _path='/x/stranger/result.json'))
  by_budget, left_out = frontier_analysis.assign(records, frontier.metadata(result, 2))
  reasons = dict(left_out)
  assert 'from budget' in reasons[records[0]['_path']] and 'not a point' in reasons['/x/stranger/result.json']
  assert sum(len(v) for v in by_budget.values()) == len(records) - 2


@pytest.mark.parametrize('args,words', [
    (['--topk=0'], "the --topk grid '0' has 0"),
    (['--seeds=0'], '--seeds must be a whole number >= 1'),
    (['--flops_per_second=-1'], '--flops_per_second must be a finite'),
    (['--decode_batch=0'], '--decode_batch must be'),
    (['--emit='], 'give --emit=FILE'),
    ([f'--root=/tmp'], '--root applies to --analyze'),
    (['--analyze', '--root=/tmp'], '--emit applies to emitting a frontier, not to --analyze'),
])
def test_cli_refuses_numbers_it_would_divide_by_in_one_line(tmp_path, args, words):
  """Each was a traceback, a usage dump, or a nonsense experiment file written with exit 0."""
  bad = subprocess.run([sys.executable, '-m', 'moejax.frontier', f'--config={QUICKSTART}', f'--emit={tmp_path}/g.py',
                        *args], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                       timeout=120)
  lines = bad.stderr.strip().splitlines()
  assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith('moejax: error:') and words in lines[0], \
      bad.stderr
  assert not os.path.exists(tmp_path / 'g.py')


@pytest.mark.slow
def test_cli_emits_and_analyses_and_refuses_in_one_line(base, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  emitted = str(tmp_path / 'f.py')
  run = lambda *args: subprocess.run([sys.executable, '-m', 'moejax.frontier', *args], capture_output=True,
                                     text=True, env=env, cwd=ROOT, timeout=300)
  bad = run(f'--config={QUICKSTART}', '--budgets=4MB', f'--emit={emitted}')
  assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith('moejax: error: --budgets item')
  ok = run(f'--config={QUICKSTART}', '--budgets=x1,x2', '--experts=1,4,16', '--seeds=2', f'--emit={emitted}')
  assert ok.returncode == 0, ok.stderr
  spec = _spec(base, 'flops', 'x1,x2')
  result = frontier.build(base, _designs(experts=[1, 4, 16], topk=[2], shared=[0], ratios=[(1,)]), spec)
  root = str(tmp_path / 'runs')
  _records(base, result, _known_loss, 2, root=root)
  out = str(tmp_path / 'out')
  done = run('--analyze', f'--config={emitted}', f'--root={root}', f'--out={out}')
  assert done.returncode == 0, done.stderr
  report = open(os.path.join(out, 'report.md')).read()
  assert '| 1 (' in report and 'e4k2' in report and os.path.getsize(os.path.join(out, 'frontier.png')) > 10000
  assert json.load(open(os.path.join(out, 'frontier.json')))['budgets'][1]['best'] == 'e16k2'
  # bad input: one line each (these were tracebacks, usage dumps, or a nonsense file written with exit 0)
  for args, words in ((['--analyze', f'--config={emitted}'], '--analyze needs --config'),
                      (['--analyze', f'--config={emitted}', f'--root={emitted}', f'--out={tmp_path}/o2'],
                       'is not a directory of runs'),
                      ([f'--emit={emitted}', f'--config={emitted}'], 'is the experiment file it is made from')):
    bad = run(f'--config={QUICKSTART}', *args) if not any(a.startswith('--config') for a in args) else run(*args)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode != 0 and len(lines) == 1 and lines[0].startswith('moejax: error:') and words in lines[0], \
        (args, bad.stderr)
  assert not os.path.exists(tmp_path / 'g.py') and not os.path.exists(tmp_path / 'o2')
  # a truncated result.json is named on stderr (and in frontier.json), never dropped silently
  victim = next(os.path.join(d, 'result.json') for d, _, names in os.walk(root) if 'result.json' in names)
  with open(victim, 'r+') as f:
    f.truncate(20)
  warned = run('--analyze', f'--config={emitted}', f'--root={root}', f'--out={out}')
  assert warned.returncode == 0 and f'moejax: warning: skipped {victim}' in warned.stderr

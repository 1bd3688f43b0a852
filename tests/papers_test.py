"""The paper grids: every point at every scale validates, and the grids compare what they claim to."""

import math
import os

import pytest

from moejax import config as config_lib
from moejax.model import accounting
from moejax.studies import sweeps as sweep
from moejax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name):
  return config_lib.load_module(os.path.join(ROOT, 'experiments', f'{name}.py'))


@pytest.mark.parametrize('name', ['paper_a', 'paper_b'])
@pytest.mark.parametrize('scale', ['tiny', 'gpu', 'paper'])
def test_every_point_validates_and_names_are_unique(name, scale):
  module = _module(name)
  points = module.get_sweep(f'{scale},all')
  resolved = sweep.resolve_points(module.get_config(scale), points)  # validates every point
  assert len({n for n, _ in resolved}) == len(points)
  assert all(c.data.seed == c.seed for _, c in resolved)  # a seed sets the data order too: paired within a seed
  for _, c in resolved:  # the gate scale does not depend on k: renormalized gates times k, never top-1
    if c.moe.num_experts:
      assert c.moe.experts_per_token >= 2 and c.moe.use_renormalized_gates
      assert c.moe.routed_scaling_factor == c.moe.experts_per_token
  tier1 = module.get_sweep(scale)
  assert 0 < len(tier1) <= len(points)


@pytest.mark.parametrize('name', ['paper_a', 'paper_b'])
def test_every_tiny2_point_validates_with_heads_of_16_and_its_rate_from_the_rule(name, monkeypatch):
  """tiny2 (the repaired protocol) once grid LR has filled the rule: every width is a multiple of head_dim 16 (the
  A2a middle point was d=108 and could not be built), and each point's rate is the rule's for its width and k."""
  from experiments import papers  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(papers.LR_RULE, 'tiny2', {2: {64: 8e-3, 96: 4e-3, 144: 2e-3}, 8: {64: 1.6e-2, 96: 8e-3, 144: 4e-3}})
  module = _module(name)
  points = [p for p in module.get_sweep('tiny2,all') if '-lr' not in p['name']]
  resolved = sweep.resolve_points(module.get_config('tiny2'), points)
  assert len({n for n, _ in resolved}) == len(points)
  for _, c in resolved:
    assert c.model.model_dim == 16 * c.model.num_heads and c.model.head_dim == 16 and c.train.steps == 1500
    k = c.moe.experts_per_token if c.moe.num_experts else 2
    assert c.optim.peak_learning_rate == pytest.approx(papers.lr_for('tiny2', c.model.model_dim, k))
  widths = {c.model.model_dim for _, c in resolved}
  assert 112 in widths if name == 'paper_a' else 64 in widths
  assert papers.lr_for('tiny2', 96, 8) == 8e-3 and papers.lr_for('tiny2', 64, 4) == 8e-3
  assert 2e-3 < papers.lr_for('tiny2', 112, 2) < 4e-3 and papers.lr_for('tiny2', 200, 2) == 2e-3  # log-linear, clamped


def _counts(module, scale, grid):
  base = module.get_config(scale)
  return [accounting.count(config_lib.validate(config_lib.apply_overrides(base, p))) for p in module.designs(scale)[grid]]


@pytest.mark.parametrize('scale', ['tiny', 'gpu'])
def test_grids_hold_fixed_what_they_should(scale):
  a, b = _module('paper_a'), _module('paper_b')
  a1 = _counts(a, scale, 'A1')
  assert len({c['n_total'] for c in a1}) == 1 and len({c['sparsity'] for c in a1}) == len(a1)  # fixed N_total, s varies
  a2a = _counts(a, scale, 'A2a')
  assert max(c['n_total'] for c in a2a) / min(c['n_total'] for c in a2a) < 1.07  # ~fixed N_total
  assert len({c['sparsity'] for c in a2a}) == 1
  a2b = _counts(a, scale, 'A2b')
  assert max(c['n_total'] for c in a2b) / min(c['n_total'] for c in a2b) < 1.05 and len({c['sparsity'] for c in a2b}) == 1
  b1 = _counts(b, scale, 'B1')
  routed_active = {c['n_active'] - c['num_moe_layers'] * c['num_experts'] * (c['n_embed'] // config_lib.vocab_size(b.get_config(scale))) for c in b1}
  assert len(routed_active) == 1  # fixed active parameters apart from the router
  for grid in ('B2', 'B2s32', 'B2p'):
    b2 = _counts(b, scale, grid)
    assert len({c['experts_per_token'] * c['expert_hidden'] for c in b2}) == 1  # k * d_exp fixed
    assert len({c['sparsity'] for c in b2}) == 1 and len(b2) >= 3
  assert len(_counts(b, scale, 'B2')) >= 5 and len(_counts(b, scale, 'B2p')) >= 5  # >= 5 sizes at 2 active scales
  a4 = _counts(a, scale, 'A4')
  top = a4[0]['n_total']
  assert all(abs(c['n_total'] - top) <= 0.03 * top for c in a4)  # A4: random designs of matched N_total
  b6 = b.designs(scale)['B6']
  assert len({p.get('moe.train_capacity_factor') for p in b6}) >= 4  # a dose-response, dropless included
  for grid in ('B3', 'B4'):
    center, variant = _counts(b, scale, grid)
    assert abs(variant['n_total'] - center['n_total']) / center['n_total'] < 0.01


def test_unknown_scale_or_grid_is_a_config_error():
  with pytest.raises(ConfigError, match='unknown scale'):
    _module('paper_b').get_config('huge')
  with pytest.raises(ConfigError, match='unknown grids'):
    _module('paper_b').get_sweep('tiny,B9')


@pytest.mark.parametrize('name', ['paper_a', 'paper_b'])
def test_grid_neighbours_differ_only_in_the_claimed_variables(name):
  """Within a grid, every key that differs between points is one the grid is about (or the point's name)."""
  allowed = {'name', 'moe.num_experts', 'moe.experts_per_token', 'moe.expert_hidden', 'moe.routed_scaling_factor',
             'model.model_dim'}
  extra = {'B3': {'moe.num_shared_experts'}, 'B4': {'moe.expert_size_classes'},
           'B5': {'moe.load_balancing', 'moe.aux_free_sequence_coef'}, 'B6': {'moe.train_capacity_factor'},
           'LR': {'optim.peak_learning_rate'}, 'B1': {'model.ffn_hidden'}}
  module = _module(name)
  for grid, points in module.designs('tiny').items():
    if grid == 'A4':
      continue  # searched designs differ in everything by construction (matched N_total)
    groups = {'': points}
    if grid == 'LR':  # anchors differ by design; within an anchor only the learning rate moves
      groups = {}
      for p in points:
        groups.setdefault(p['name'].split('-lr')[0], []).append(p)
    base = module.get_config('tiny')
    for group in groups.values():
      flat = [config_lib.flatten(config_lib.apply_overrides(base, p).to_dict()) for p in group]
      keys = set().union(*flat)
      varied = {k for k in keys if len({repr(f.get(k)) for f in flat}) > 1}
      limit = {'name', 'optim.peak_learning_rate'} if grid == 'LR' else allowed | extra.get(grid, set())
      assert varied <= limit, (grid, varied - limit)


def test_top1_points_are_refused():
  papers = config_lib.load_module(os.path.join(ROOT, 'experiments', 'papers.py'))
  with pytest.raises(ConfigError, match='top-1'):
    papers.point(8, 1, 64)


def test_tiny2_protocol_grows_heads_with_width_and_sweeps_rates_per_width_and_topk(monkeypatch):
  from experiments import paper_b, papers  # pylint: disable=import-outside-toplevel
  points = paper_b.get_sweep('tiny2,LR')
  assert len(points) == 2 * (4 + 5 + 4)  # top-k x the rates of each width (papers.LR_ANCHORS), seed 0
  rates = {(p.get('model.model_dim', 64), p['optim.peak_learning_rate']) for p in points}
  assert (144, 1e-3) in rates and (144, 1.6e-2) not in rates and (96, 1e-3) in rates and (64, 1e-3) not in rates
  for p in points:
    cfg = config_lib.validate(config_lib.apply_overrides(paper_b.get_config('tiny2'), p))
    assert cfg.model.head_dim == 16 and cfg.model.num_heads * 16 == cfg.model.model_dim
    assert cfg.optim.warmup_fraction == 0.1 and cfg.eval.every_steps == 150 and cfg.train.steps == 1500
  assert {(p.get('model.model_dim', 64), p['moe.experts_per_token']) for p in points} == {
      (d, k) for d in (64, 96, 144) for k in (2, 8)}
  centre = next(p for p in paper_b.get_sweep('tiny2,B1') if p['name'] == 'e32k2f64')
  assert centre['optim.peak_learning_rate'] == papers.LR_RULE['tiny2'][2][64]  # the recorded rule
  monkeypatch.setitem(papers.LR_RULE, 'tiny2', {2: {64: None, 96: None, 144: None}, 8: {64: None, 96: None, 144: None}})
  with pytest.raises(ConfigError, match='learning-rate rule is not measured yet'):  # before grid LR filled it
    paper_b.get_sweep('tiny2,B1')


def test_tiny2_rate_rule_interpolates_log_linearly_in_width(monkeypatch):
  from experiments import papers  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(papers.LR_RULE, 'tiny2', {2: {64: 8e-3, 96: 4e-3, 144: 2e-3}, 8: {64: 1.6e-2, 96: 8e-3, 144: 4e-3}})
  assert papers.lr_for('tiny2', 64, 2) == 8e-3 and papers.lr_for('tiny2', 144, 8) == 4e-3
  assert papers.lr_for('tiny2', 80, 2) == pytest.approx(8e-3 * (4e-3 / 8e-3) ** (math.log(80 / 64) / math.log(96 / 64)))
  assert papers.lr_for('tiny2', 300, 3) == 2e-3  # beyond the anchors: the nearest anchor's rate; k <= 4: k=2's
  p = papers.protocol({'name': 'x', 'moe.load_balancing': 'sequence', 'moe.experts_per_token': 2}, 'tiny2')
  assert p['moe.aux_loss_coef'] == 1e-4 and p['model.num_heads'] == 4


def test_tiny_grids_keep_their_points():
  from experiments import paper_a, paper_b  # pylint: disable=import-outside-toplevel
  assert len(paper_b.get_sweep('tiny,all')) == 64 and len(paper_a.get_sweep('tiny,all')) == 32

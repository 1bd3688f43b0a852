"""The paper grids: every point at every scale validates, and the grids compare what they claim to."""

import os

import pytest

from moejax import accounting, config as config_lib, sweep
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
  assert len({c.data.seed for _, c in resolved}) == 1  # paired data order across the whole scale
  tier1 = module.get_sweep(scale)
  assert 0 < len(tier1) <= len(points)


def _counts(module, scale, grid):
  base = module.get_config(scale)
  return [accounting.count(config_lib.validate(config_lib.apply_overrides(base, p))) for p in module.grids(scale)[grid]]


@pytest.mark.parametrize('scale', ['tiny', 'gpu'])
def test_grids_hold_fixed_what_they_should(scale):
  a, b = _module('paper_a'), _module('paper_b')
  a1 = _counts(a, scale, 'A1')
  assert len({c['n_total'] for c in a1}) == 1 and len({c['sparsity'] for c in a1}) == len(a1)  # fixed N_total, s varies
  a2a = _counts(a, scale, 'A2a')
  assert max(c['n_total'] for c in a2a) / min(c['n_total'] for c in a2a) < 1.12  # ~fixed N_total
  assert len({c['sparsity'] for c in a2a}) == 1
  a2b = _counts(a, scale, 'A2b')
  assert max(c['n_total'] for c in a2b) / min(c['n_total'] for c in a2b) < 1.05 and len({c['sparsity'] for c in a2b}) == 1
  b1 = _counts(b, scale, 'B1')
  routed_active = {c['n_active'] - c['num_moe_layers'] * c['num_experts'] * (c['n_embed'] // config_lib.vocab_size(b.get_config(scale))) for c in b1}
  assert len(routed_active) == 1  # fixed active parameters apart from the router
  b2 = _counts(b, scale, 'B2')
  assert len({c['experts_per_token'] * c['expert_hidden'] for c in b2}) == 1  # k * d_exp fixed
  for grid in ('B3', 'B4'):
    center, variant = _counts(b, scale, grid)
    assert abs(variant['n_total'] - center['n_total']) / center['n_total'] < 0.01


def test_unknown_scale_or_grid_is_a_config_error():
  with pytest.raises(ConfigError, match='unknown scale'):
    _module('paper_b').get_config('huge')
  with pytest.raises(ConfigError, match='unknown grids'):
    _module('paper_b').get_sweep('tiny,B9')

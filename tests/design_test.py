"""The constrained design search: exact counts, feasibility, monotonicity, infeasible budgets, emitted sweeps."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from experiments import base
from moejax import cli, config as config_lib
from moejax.model import accounting
from moejax.model import transformer as model_lib
from moejax.studies import design, sweeps as sweep
from moejax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_space(cfg=None, **kw):
  cfg = cfg or base.get_config()
  fields = dict(layers=[1, 2, 3, 4, 6], widths=list(range(32, 257, 32)), granularities=[0.5, 1, 2, 4],
                experts=[1, 2, 4, 8, 16, 32], head_dim=16, aspect_range=(4, 256), shared=[0, 1])
  fields.update(kw)
  return design.space_from_config(cfg, **fields)


def test_parse_amounts_and_grids():
  assert cli.parse_amount('2GB') == (2e9, True)
  assert cli.parse_amount('3GiB') == (3 * 2**30, True)
  assert cli.parse_amount('1.5e9') == (1.5e9, False)
  with pytest.raises(ConfigError, match='unknown unit'):
    cli.parse_amount('2GX')
  with pytest.raises(ConfigError, match='cannot parse the amount'):
    cli.parse_amount('lots')
  assert design.parse_grid('2:8:2') == [2, 4, 6, 8] and design.parse_grid('4,2,2') == [2, 4]


@pytest.mark.parametrize('variant', [{}, {'model.use_qk_norm': True, 'model.use_tied_embeddings': False},
                                     {'moe.use_shared_expert_gate': True, 'data.seq_len': 64}])
def test_counts_match_accounting_for_a_sample(variant):
  cfg = config_lib.apply_overrides(base.get_config(), variant)
  space = _small_space(cfg)
  designs = design.enumerate_designs(space)
  rng = np.random.default_rng(0)
  for i in rng.choice(len(designs['n_total']), 40, replace=False):
    point = config_lib.validate(config_lib.apply_overrides(cfg, design.overrides(designs, i, head_dim=16)))
    acc = accounting.count(point)
    assert (acc['n_total'], acc['n_active'], acc['flops_per_token_forward']) == (
        designs['n_total'][i], designs['n_active'][i], designs['flops'][i]), design.overrides(designs, i, 16)


def test_counts_match_the_instantiated_model():
  result = design.search(_small_space(), design.Budget(None, 2e5, None, 4))
  for i in (0, 3, len(result.designs['n_total']) // 2):
    cfg = config_lib.apply_overrides(base.get_config(), design.overrides(result.designs, i, head_dim=16))
    params = nnx.state(model_lib.build(config_lib.validate(cfg)), nnx.Param)
    assert accounting.param_count_tree(params) == result.designs['n_total'][i]


def test_every_output_fits_and_loosening_never_lowers_the_best():
  space = _small_space()
  rng = np.random.default_rng(1)
  for _ in range(25):
    mem, act, flops = 10 ** rng.uniform(5.5, 7), 10 ** rng.uniform(4.8, 6), 10 ** rng.uniform(5.5, 7.5)
    budget = design.Budget(mem, act, flops if rng.random() < 0.5 else None, 2.0, rng.choice(
        ['weights', 'inference', 'training']), kv_batch=2)
    try:
      result = design.search(space, budget)
    except ConfigError:
      continue
    d = result.designs
    assert (d['memory_bytes'] <= mem).all() and (d['n_active'] <= act).all()
    assert budget.flops_per_token is None or (d['flops'] <= flops).all()
    assert d['n_total'][0] >= d['n_total'].max() * (1 - design.BUCKET)  # the winner is in the top N_total bucket
    best = d['n_total'].max()
    for looser in (dict(memory_bytes=mem * 1.5), dict(active=act * 1.5),
                   dict(flops_per_token=None if budget.flops_per_token is None else flops * 2)):
      relaxed = design.search(space, design.Budget(**{**budget.__dict__, **looser}))
      assert relaxed.designs['n_total'].max() >= best


def test_ranking_follows_the_principle():
  result = design.search(_small_space(), design.Budget(4e6, 3e5, None, 4))
  d = result.designs
  top = d['n_total'] >= d['n_total'].max() * (1 - design.BUCKET)
  s = d['experts'] / d['topk']
  first_bucket = np.flatnonzero(top)
  assert s[0] == s[first_bucket].min()  # minimum sparsity within the top N_total bucket
  ties = first_bucket[s[first_bucket] == s[0]]
  assert d['experts'][0] == d['experts'][ties].min()  # then the fewest experts (paper A)
  fine = design.search(_small_space(), design.Budget(4e6, 3e5, None, 4), tiebreak='granularity',
                       target_granularity=4)
  g = fine.designs['granularity']
  assert s[0] == fine.designs['experts'][0] / fine.designs['topk'][0]
  assert abs(np.log(g[0] / 4)) == np.abs(np.log(g[ties] / 4)).min() or g[0] == 4
  assert set(result.binding) <= {'memory', 'active'}


def test_infeasible_budget_names_the_smallest_feasible_one():
  space = _small_space()
  with pytest.raises(ConfigError, match='no configuration in the grid satisfies the budgets') as info:
    design.search(space, design.Budget(1e3, 1e9, None, 2.0))
  value = float(re.search(r'--memory >= \S+ parameters = (\S+) bytes', str(info.value)).group(1))
  assert len(design.search(space, design.Budget(value * 1.0001, 1e9, None, 2.0)).designs['n_total'])
  with pytest.raises(ConfigError, match='--active >= '):
    design.search(space, design.Budget(1e9, 10, None, 2.0))
  with pytest.raises(ConfigError, match='give at least one budget'):
    design.search(space, design.Budget(None, None, None, 2.0))


def test_emitted_experiment_is_a_valid_sweep(tmp_path):
  result = design.search(_small_space(), design.Budget(2e6, 2e5, None, 4))
  path = tmp_path / 'designed.py'
  points = design.emit(str(path), result, 6, os.path.join(ROOT, 'experiments', 'base.py'), 'python -m moejax.design',
                       head_dim=16)
  module = config_lib.load_module(str(path))
  assert module.get_sweep() == points and len(points) == 6
  resolved = sweep.resolve_points(module.get_config(), points)
  for (name, cfg), i in zip(resolved, range(6)):
    assert name.startswith(f'r{i + 1:02d}-') and accounting.count(cfg)['n_total'] == result.designs['n_total'][i]


def test_design_cli(tmp_path):
  args = [sys.executable, '-m', 'moejax.design', '--memory=2GB', '--active=2e8', '--top=3',
          f'--emit={tmp_path}/top.py']
  out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert '| 1 |' in out.stdout and '| 3 |' in out.stdout and '| 4 |' not in out.stdout and 'memory' in out.stdout
  assert len(config_lib.load_module(f'{tmp_path}/top.py').get_sweep()) == 3
  out = subprocess.run([sys.executable, '-m', 'moejax.design', '--memory=100KB', '--active=2e8'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1 and 'smallest feasible: --memory >= ' in lines[0]


def _design(*flags):
  return subprocess.run([sys.executable, '-m', 'moejax.design', *flags], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)


def test_design_cli_refuses_bad_budgets_in_one_line(tmp_path):
  base = open(os.path.join(ROOT, 'experiments', 'base.py')).read()
  (tmp_path / 'base.py').write_text(base)
  for flags, words in ((['--memory=1e400', '--active=2e8'], 'not finite'), (['--memory=2GB', '--top=0'], '--top=0'),
                       (['--memory=2GB', '--flops_per_token=1GB'], 'FLOP count'),
                       (['--memory=2GB', f'--emit={tmp_path}/no/such/dir/x.py'], 'cannot write --emit='),
                       # numbers the search would divide by, or that make every design fit (each was a traceback or
                       # a silent nonsense table)
                       (['--memory=2GB', '--head_dim=0'], '--head_dim must be a whole number >= 1'),
                       (['--memory=2GB', '--kv_group=-1'], '--kv_group must be'),
                       (['--memory=2GB', '--seq_len=0'], '--seq_len must be'),
                       (['--memory=2GB', '--decode_ms=-1', '--bandwidth=3TB'], '--decode_ms must be a finite number > 0'),
                       (['--memory=2GB', '--decode_ms=nan', '--bandwidth=3TB'], '--decode_ms must be'),
                       (['--memory=2GB', '--layers=0'], "the --layers grid '0' has 0"),
                       (['--memory=2GB', '--granularities=0,1'], 'every value must be a finite number > 0'),
                       (['--memory=2GB', '--granularities=nan'], 'finite'),
                       (['--memory=2GB', '--aspect_range=16'], '--aspect_range=16 needs two different numbers'),
                       (['--memory=2GB', '--aspect_range=0,0'], "the --aspect_range '0,0' has 0.0"),
                       (['--memory=2GB', 'extra'], 'unexpected arguments: extra'),
                       (['--memory=2GB', '--bandwidth=3TB'], '--bandwidth applies to --decode_ms'),
                       (['--memory=2GB', f'--config={tmp_path}/base.py', f'--emit={tmp_path}/base.py'],
                        'is the experiment file it is made from')):
    out = _design(*flags)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1 and lines[0].startswith('moejax: error:') and words in lines[0], \
        (flags, out.stderr)
  assert (tmp_path / 'base.py').read_text() == base  # emitting over its own source was refused, not done


def test_active_in_bytes_converts_as_memory_does():
  assert design.params_budget('400MB', 2) == 2e8 == design.bytes_budget('400MB', 2) / 2
  assert design.params_budget('2e8', 2) == 2e8 and design.bytes_budget('1e8', 4) == 4e8
  assert design.params_budget(None, 2) is None


def test_amount_hints_name_the_flag_kind_and_rates_take_per_second():
  assert cli.parse_amount('80GB/s', 'bandwidth') == (80e9, True)
  assert cli.parse_amount('3.35TB', 'bandwidth') == (3.35e12, True)
  with pytest.raises(ConfigError, match=r'\(bytes\)') as info:
    cli.parse_amount('lots', 'bytes')
  assert 'parameters' not in str(info.value)
  with pytest.raises(ConfigError, match='cannot parse'):
    cli.parse_amount('80GB/s')  # a rate is not a memory amount
  for bad in ('1e400', '1e300TB'):
    with pytest.raises(ConfigError, match='not finite'):
      cli.parse_amount(bad)


def test_training_memory_is_16_bytes_per_parameter_for_any_dtype():
  space = _small_space()
  designs = design.enumerate_designs(space)
  for dtype_bytes in (2.0, 4.0):
    budget = design.Budget(1e12, 1e12, None, dtype_bytes, 'training')
    np.testing.assert_array_equal(design.memory_bytes(designs, space, budget), designs['n_total'] * 16)


def test_an_emitted_file_loads_whatever_its_docstring_holds_and_with_no_points(tmp_path):
  """Quotes, a trailing quote and backslashes in the command or path, and an empty sweep, still make valid Python."""
  from moejax.studies import emitted  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / 'odd.py')
  doc = 'made by: python -m x --emit="a b.py" C:\\\\runs\\\\new """ and a trailing quote"'
  emitted.write(path, doc, os.path.join(ROOT, 'experiments', 'base.py'), [], 'Nothing.')
  module = config_lib.load_module(path)
  assert module.get_sweep() == [] and module.__doc__ == doc

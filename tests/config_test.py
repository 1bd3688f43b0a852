"""Config validation rules, overrides and sweep helpers."""

import json
import os
import re

import pytest

from moejax import base_config as base
from experiments import quickstart
from moejax import config as config_lib
from moejax.errors import ConfigError


@pytest.mark.parametrize('overrides,message', [
    ({'moe.experts_per_token': 9, 'moe.num_experts': 8}, 'moe.experts_per_token=9 must be in [1, moe.num_experts=8]'),
    ({'model.num_heads': 3}, 'model.model_dim=128 must be divisible by model.num_heads=3'),
    ({'model.num_kv_heads': 3}, 'model.num_heads=4 must be divisible by model.num_kv_heads=3'),
    ({'train.batch_size': 30, 'mesh.data': 4}, 'train.batch_size=30 must be divisible by the batch axes mesh.data*mesh.fsdp*mesh.expert=4'),
    ({'moe.num_experts': 6, 'mesh.expert': 4}, 'moe.num_experts=6 must be divisible by mesh.expert=4'),
    ({'moe.dispatch': 'magic'}, "moe.dispatch='magic' must be one of"),
    ({'moe.first_dense_layers': 4}, 'leaves no MoE layer'),
    ({'moe.block_size': 12}, 'moe.block_size=12 must be a positive multiple of 8'),
    ({'data.source': 'hdfs:x'}, "data.source='hdfs:x' must be"),
    ({'data.source': 'text:'}, "data.source='text:' must be"),
    ({'train.steps': 0}, 'train.steps=0 must be > 0'),
    ({'optim.warmup_fraction': 1.0}, 'optim.warmup_fraction=1.0 must be in [0, 1)'),
    ({'model.compute_dtype': 'float16'}, "model.compute_dtype='float16' must be one of"),
    ({'moe.num_expert_groups': 3}, 'moe.num_expert_groups=3 must divide moe.num_experts=8'),
    ({'moe.num_expert_groups': 4, 'moe.topk_expert_groups': 5}, 'moe.topk_expert_groups=5 must be in [1,'),
    ({'moe.num_expert_groups': 8, 'moe.topk_expert_groups': 1}, 'cannot supply moe.experts_per_token=2'),
    ({'moe.train_capacity_factor': 0.0}, 'moe.train_capacity_factor=0.0 must be > 0'),
    ({'moe.eval_capacity_factor': -1.0}, 'moe.eval_capacity_factor=-1.0 must be > 0'),
    ({'moe.expert_size_classes': '4x64,2x128'}, "has 6 experts but moe.num_experts=8"),
    ({'moe.expert_size_classes': '4 by 64'}, "must look like '32x64,32x192'"),
    ({'moe.load_balancing': 'switch'}, "moe.load_balancing='switch' must be one of"),
    ({'moe.router_score': 'relu'}, "moe.router_score='relu' must be one of"),
    ({'moe.drop_policy': 'random'}, "moe.drop_policy='random' must be one of"),
    ({'moe.capacity_group_tokens': 100}, 'moe.capacity_group_tokens=100 must divide train.batch_size * data.seq_len'),
    ({'moe.balance_group_sequences': 5}, 'moe.balance_group_sequences=5 must divide train.batch_size=32'),
    ({'moe.balance_group_sequences': 16, 'eval.batch_size': 8},
     'moe.balance_group_sequences=16 must divide eval.batch_size=8'),
])
def test_validate_names_key_and_rule(overrides, message):
  cfg = config_lib.apply_overrides(base.get_config(), overrides)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  assert message in str(e.value)
  assert '\n' not in str(e.value)


def test_base_and_quickstart_points_are_valid():
  config_lib.validate(base.get_config())
  for point in quickstart.get_sweep():
    config_lib.validate(config_lib.apply_overrides(quickstart.get_config(), point))


def test_apply_overrides_rejects_unknown_key_and_wrong_type():
  with pytest.raises(ConfigError, match='unknown config key: moe.num_expertz'):
    config_lib.apply_overrides(base.get_config(), {'moe.num_expertz': 3})
  with pytest.raises(ConfigError, match='wrong type'):
    config_lib.apply_overrides(base.get_config(), {'train.steps': 'many'})


def test_apply_overrides_sets_optional_fields_and_copies():
  cfg = base.get_config()
  new = config_lib.apply_overrides(cfg, {'moe.block_size': 16, 'model.head_dim': 64})
  assert new.moe.block_size == 16 and new.model.head_dim == 64
  assert cfg.moe.block_size is None


def test_sweep_helpers():
  a = config_lib.sweep('moe.num_experts', [4, 8])
  b = config_lib.sweep('seed', [0, 1, 2])
  assert len(config_lib.product(a, b)) == 6
  assert config_lib.product(a, b)[1] == {'moe.num_experts': 4, 'seed': 1}
  assert config_lib.zip(a, config_lib.sweep('name', ['x', 'y'])) == [
      {'moe.num_experts': 4, 'name': 'x'}, {'moe.num_experts': 8, 'name': 'y'}]
  with pytest.raises(ConfigError):
    config_lib.zip(a, b)


def test_config_flag_parsing():
  assert config_lib.config_flag(['prog', '--config=experiments/x.py:big', '--workdir=w']) == ('experiments/x.py', 'big')
  assert config_lib.config_flag(['prog', '--config', 'a.py']) == ('a.py', None)
  assert config_lib.config_flag(['prog']) is None


def _flat_keys(cfg, prefix=''):
  for key, value in cfg.items():
    if hasattr(value, 'items'):
      yield from _flat_keys(value, f'{prefix}{key}.')
    else:
      yield prefix + key


def test_every_base_key_is_documented():
  docs = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'docs', 'configs.md')).read()
  missing = [k for k in _flat_keys(base.get_config()) if f'`{k}`' not in docs]
  assert not missing, f'undocumented keys in docs/configs.md: {missing}'


def test_flatten_equals_flax_flatten_dict():
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  tree = json.loads(base.get_config().to_json_best_effort())
  tree['extra'] = {'empty': {}, 'deep': {'a': {'b': 1}}}
  assert config_lib.flatten(tree) == traverse_util.flatten_dict(tree, sep='.')


def test_config_hash_ignores_exactly_its_key_lists():
  cfg = config_lib.validate(base.get_config())
  flat = config_lib.flatten(json.loads(cfg.to_json_best_effort()))
  assert config_lib.config_hash(cfg) == config_lib.config_hash(flat)
  assert config_lib.config_hash(dict(flat, **{'checkpoint.every_steps': 7})) == config_lib.config_hash(flat)
  assert config_lib.config_hash(dict(flat, **{'moe.num_experts': 3})) != config_lib.config_hash(flat)
  assert config_lib.config_hash(dict(flat, seed=9)) != config_lib.config_hash(flat)
  assert config_lib.config_hash(dict(flat, seed=9), config_lib.SEED_KEYS) == config_lib.config_hash(flat,
                                                                                                  config_lib.SEED_KEYS)


def _readme_hashes() -> dict[str, str]:
  """{point name: hash} of the `make run` table in README.md."""
  readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md')).read()
  return {m.group(2): m.group(1) for m in re.finditer(r'^\| ([0-9a-f]{8}) \| ([\w-]+) \|', readme, re.M)}


def test_readme_results_hashes_are_what_make_run_computes():
  from moejax.studies import results, sweeps  # pylint: disable=import-outside-toplevel
  computed = {name: results.config_hash(config_lib.flatten(json.loads(cfg.to_json_best_effort())))
              for name, cfg in sweeps.resolve_points(quickstart.get_config(), quickstart.get_sweep())}
  assert computed == _readme_hashes() and len(computed) == 4  # a new key that changes them needs a new README table


def test_tracking_keys_change_no_config_hash():
  from moejax.studies import results  # pylint: disable=import-outside-toplevel
  from moejax.train import workdir  # pylint: disable=import-outside-toplevel
  cfg = config_lib.validate(base.get_config())
  flat = config_lib.flatten(json.loads(cfg.to_json_best_effort()))
  hashes = lambda f: (results.config_hash(f), workdir.config_hash(f),
                      config_lib.config_hash(f, config_lib.STEP_NEUTRAL_KEYS, digits=None))
  # The base config's hashes from before the wandb keys existed (results, workdir binding, compiled step).
  assert hashes(flat) == ('a59c01dd', 'f56ee7e347ed',
                          'ee8ea11d4df318b941ce96d58b32239db68b86a51eb4dc41fe309ac1d12f052c')
  tracked = dict(flat, **{'wandb.mode': 'online', 'wandb.project': 'p', 'wandb.entity': 'e', 'wandb.name': 'n',
                          'wandb.group': 'g', 'wandb.tags': 'a,b', 'wandb.dir': '/tmp/w'})
  assert hashes(tracked) == hashes(flat) and workdir.differences(flat, tracked) == {}


def test_apply_overrides_refuses_unknown_keys_and_wrong_types():
  cfg = base.get_config()
  for bad, match in (({'moe.nope': 1}, 'unknown config key: moe.nope'), ({'nope.x': 1}, 'unknown config key'),
                     ({'moe.num_experts': 'many'}, 'wrong type')):
    with pytest.raises(ConfigError, match=match):
      config_lib.apply_overrides(cfg, bad)
  assert not config_lib.apply_overrides(cfg, {'moe.num_experts': 4}).is_locked

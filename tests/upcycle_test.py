"""Upcycling (train.init_from): copied and granular experts match the dense forward; compute is carried over."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.model import transformer as model_lib
from moejax.train import run as run_lib, upcycle

DENSE = {'moe.num_experts': 0}
EXACT = {'moe.use_renormalized_gates': True}  # zero router + renormalized gates: see moejax/train/upcycle.py


def _cfg(tiny_cfg, **overrides):
  return config_lib.validate(config_lib.apply_overrides(tiny_cfg, overrides))


def _forward(cfg, params):
  graphdef, _, buffers = model_lib.split(model_lib.build(cfg))
  return jax.jit(lambda p, t: nnx.merge(graphdef, p, buffers)(t)[0])(params, TOKENS)


TOKENS = jax.random.randint(jax.random.key(5), (2, 16), 0, 257)


def _upcycled_logits(dense_cfg, moe_cfg, dense_params, G):
  _, moe_params, _ = model_lib.split(model_lib.build(moe_cfg))
  host = jax.tree.map(np.asarray, nnx.to_pure_dict(moe_params))
  new = upcycle.upcycle_params(host, dense_params, moe_cfg, G, jax.random.key(0))
  return _forward(moe_cfg, new)


@pytest.fixture(scope='module')
def dense(corpus_glob):
  from testdata import tiny  # pylint: disable=import-outside-toplevel
  cfg = config_lib.validate(config_lib.apply_overrides(tiny.get_config(corpus_glob), {**DENSE, 'model.init_std': 0.2}))
  _, params, _ = model_lib.split(model_lib.build(cfg))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  return cfg, params, _forward(cfg, params)


@pytest.mark.parametrize('overrides,G', [
    ({'moe.expert_hidden': 64, 'moe.experts_per_token': 2, **EXACT}, 1),  # copies, k experts, gates sum to 1
    ({'moe.expert_hidden': 32, 'moe.experts_per_token': 2, 'moe.routed_scaling_factor': 2.0, **EXACT}, 2),  # granular
    ({'moe.expert_hidden': 16, 'moe.num_experts': 8, 'moe.experts_per_token': 4, 'moe.routed_scaling_factor': 4.0,
      'moe.router_score': 'sigmoid'}, 4)])
def test_upcycled_first_forward_equals_the_dense_model(tiny_cfg, dense, overrides, G):
  dense_cfg, dense_params, dense_logits = dense
  moe_cfg = _cfg(tiny_cfg, **{'model.init_std': 0.2, **overrides})
  assert upcycle.granularity(moe_cfg, dense_cfg, 'd') == G
  np.testing.assert_allclose(_upcycled_logits(dense_cfg, moe_cfg, dense_params, G), dense_logits, rtol=2e-5,
                             atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize('overrides', [
    {'moe.expert_hidden': 64},  # raw softmax gates sum to k/E, not 1
    {'moe.expert_hidden': 32, **EXACT},  # granular without the routed scale G: half the FFN
    {'moe.expert_hidden': 64, 'train.init_from_noise': 0.1, **EXACT},  # noisy copies
    {'moe.expert_hidden': 64, 'train.init_from_router_std': 1.0, **EXACT, 'moe.num_experts': 4,
     'moe.expert_size_classes': ''}])
def test_upcycled_forward_differs_where_the_documented_condition_fails(tiny_cfg, dense, overrides):
  dense_cfg, dense_params, dense_logits = dense
  moe_cfg = _cfg(tiny_cfg, **{'model.init_std': 0.2, **overrides})
  G = upcycle.granularity(moe_cfg, dense_cfg, 'd')
  out = _upcycled_logits(dense_cfg, moe_cfg, dense_params, G)
  if overrides.get('train.init_from_router_std'):  # a random router still selects whole copies with G=1
    np.testing.assert_allclose(out, dense_logits, rtol=2e-5, atol=2e-5)
  else:
    assert not np.allclose(out, dense_logits, rtol=1e-3, atol=1e-3)


def test_upcycling_refuses_mismatched_designs_in_one_line(tiny_cfg, dense):
  dense_cfg, _, _ = dense
  cases = [({'model.model_dim': 64}, 'model.model_dim'), ({'moe.expert_hidden': 48}, 'divide'),
           ({'moe.expert_hidden': 16, 'moe.num_experts': 6}, 'multiple of G'),
           ({'moe.num_shared_experts': 1}, 'shared'), ({'data.tokenizer': 'train:bpe:300'}, 'tokenizer')]
  for overrides, match in cases:
    with pytest.raises(ConfigError, match=match) as e:
      upcycle.granularity(_cfg(tiny_cfg, **overrides), dense_cfg, 'd')
    assert '\n' not in str(e.value)
  with pytest.raises(ConfigError, match='starts from a dense one'):
    upcycle.granularity(tiny_cfg, tiny_cfg, 'd')
  with pytest.raises(ConfigError, match='needs an MoE'):
    _cfg(tiny_cfg, **{'train.init_from': '/x', **DENSE})


@pytest.mark.slow
def test_upcycled_run_records_the_dense_compute(tiny_cfg, tmp_path):
  dense_dir, moe_dir = str(tmp_path / 'dense'), str(tmp_path / 'moe')
  with pytest.raises(ConfigError, match='no result.json'):
    upcycle.dense_record(dense_dir)
  dense_cfg = _cfg(tiny_cfg, **{**DENSE, 'train.steps': 2})
  dense_record = run_lib.execute(dense_cfg, dense_dir)
  moe_cfg = _cfg(tiny_cfg, **{'train.steps': 2, 'train.init_from': dense_dir, 'moe.expert_hidden': 64, **EXACT})
  record = run_lib.execute(moe_cfg, moe_dir)
  dense_flops = dense_record['train']['tokens'] * dense_record['accounting']['flops_per_token']
  assert record['compute']['init_from_flops'] == dense_flops
  assert record['compute']['total_flops'] == dense_flops + record['train']['tokens'] * record['accounting'][
      'flops_per_token']
  assert record['upcycled_from']['init_from'] == os.path.abspath(dense_dir)
  with open(os.path.join(moe_dir, 'upcycled.json')) as f:
    assert json.load(f)['granularity'] == 1
  assert dense_record['compute']['init_from_flops'] == 0 and 'upcycled_from' not in dense_record
  scanned = config_lib.validate(config_lib.apply_overrides(moe_cfg, {'model.scan_layers': True}))
  again = run_lib.execute(scanned, str(tmp_path / 'moe-scanned'))  # stored stacked: upcycled per layer, then stacked
  assert again['compute']['init_from_flops'] == dense_flops
  np.testing.assert_allclose(again['eval']['loss'], record['eval']['loss'], rtol=1e-4)

"""Accounting from the config equals the instantiated parameter tree exactly."""

import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.model import accounting
from moejax.model import transformer as model_lib


@pytest.mark.parametrize('overrides', [
    {},
    {'moe.num_experts': 0},
    {'model.use_tied_embeddings': False},
    {'model.num_kv_heads': 2, 'model.head_dim': 8},
    {'model.num_layers': 4, 'moe.first_dense_layers': 1, 'moe.every_n_layers': 2, 'moe.expert_hidden': 24},
])
def test_accounting_matches_parameter_tree(tiny_cfg, overrides):
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg, overrides))
  params = nnx.to_pure_dict(nnx.state(model_lib.build(cfg), nnx.Param))
  acc = accounting.count(cfg)
  assert acc['n_total'] == accounting.param_count_tree(params)
  embed = accounting.param_count_tree(params['embed'])
  if not cfg.model.use_tied_embeddings:
    embed += accounting.param_count_tree(params['unembed'])
  assert acc['n_total_nonembed'] == acc['n_total'] - embed


def test_accounting_active_counts_only_top_k_experts(tiny_cfg):
  acc = accounting.count(tiny_cfg)
  m, e = tiny_cfg.model, tiny_cfg.moe
  inactive = 2 * (e.num_experts - e.experts_per_token) * 3 * m.model_dim * e.expert_hidden  # 2 MoE layers
  assert acc['n_total'] - acc['n_active'] == inactive
  assert acc['sparsity'] == e.num_experts / e.experts_per_token
  assert acc['granularity'] == m.model_dim / e.expert_hidden


def test_accounting_flops_per_token_formula(tiny_cfg):
  cfg = config_lib.apply_overrides(tiny_cfg, {'moe.num_experts': 0})
  acc = accounting.count(cfg)
  m = cfg.model
  hd = m.model_dim // m.num_heads
  attn_w = m.num_layers * (2 * m.model_dim * m.num_heads * hd + 2 * m.model_dim * m.num_kv_heads * hd)
  ffn_w = m.num_layers * 3 * m.model_dim * m.ffn_hidden
  forward = 2 * (attn_w + ffn_w + m.vocab_size * m.model_dim) + 4 * m.num_layers * m.num_heads * hd * cfg.data.seq_len
  assert acc['flops_per_token_forward'] == forward
  assert acc['flops_per_token'] == 3 * forward
  assert acc['sparsity'] == 1.0


def test_accounting_cli_json_matches_count(tiny_cfg):
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-m', 'moejax.accounting', '--config=experiments/quickstart.py',
                        '--config.moe.num_experts=16', '--json'], cwd=root, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  record = json.loads(out.stdout)
  from experiments import quickstart  # pylint: disable=import-outside-toplevel
  expected = accounting.count(config_lib.apply_overrides(quickstart.get_config(), {'moe.num_experts': 16}))
  assert record == expected and record['sparsity'] == 8.0
  del tiny_cfg


# (file, published total, published active, published non-embedding total or None), billions, one decimal.
PUBLISHED = [('mixtral_8x7b', 46.7, 12.9, None), ('olmoe_1b_7b', 6.9, 1.3, None),
             ('qwen3_30b_a3b', 30.5, 3.3, 29.9), ('deepseekmoe_16b', 16.4, 2.8, None),
             ('qwen1_5_moe_a2_7b', 14.3, 2.7, None)]


def _published(name, arg=None):
  from moejax.config import load_module  # pylint: disable=import-outside-toplevel
  return config_lib.validate(load_module(f'experiments/published/{name}.py').get_config(arg))


@pytest.mark.parametrize('name,total,active,nonembed', PUBLISHED)
def test_published_architectures_match_published_counts(name, total, active, nonembed):
  acc = accounting.count(_published(name))
  # Published figures have one decimal (some truncated, e.g. Qwen3's 3.35B -> "3.3B"): accept 0.5% or
  # one unit of that last digit.
  close = lambda ours, pub: abs(ours / 1e9 - pub) <= max(0.005 * pub, 0.1 + 1e-9)
  assert close(acc['n_total'], total) and abs(acc['n_total'] / 1e9 - total) <= 0.005 * total
  assert close(acc['n_active'], active)
  if nonembed:
    assert abs(acc['n_total_nonembed'] / 1e9 - nonembed) <= 0.005 * nonembed


@pytest.mark.parametrize('name', [p[0] for p in PUBLISHED])
def test_published_tiny_copies_match_their_parameter_trees(name):
  full, tiny = _published(name), _published(name, 'tiny')
  for key in ('num_experts', 'experts_per_token', 'num_shared_experts', 'first_dense_layers',
              'use_renormalized_gates'):
    assert tiny.moe[key] == full.moe[key]
  assert tiny.model.use_tied_embeddings == full.model.use_tied_embeddings
  assert tiny.model.use_qk_norm == full.model.use_qk_norm
  assert tiny.model.qk_norm_scope == full.model.qk_norm_scope and tiny.model.use_qkv_bias == full.model.use_qkv_bias
  params = nnx.to_pure_dict(nnx.state(model_lib.build(tiny), nnx.Param))
  assert accounting.count(tiny)['n_total'] == accounting.param_count_tree(params)


def test_heterogeneous_and_shared_experts_are_accounted_exactly(tiny_cfg):
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg, {
      'moe.num_experts': 6, 'moe.expert_size_classes': '2x16,4x48', 'moe.num_shared_experts': 2,
      'moe.shared_expert_hidden': 24, 'moe.use_shared_expert_gate': True}))
  params = nnx.to_pure_dict(nnx.state(model_lib.build(cfg), nnx.Param))
  acc = accounting.count(cfg)
  assert acc['n_total'] == accounting.param_count_tree(params)
  ffn = params['blocks'][0]['ffn']
  assert ffn['experts'][0]['w_gate'].shape == (2, 32, 16) and ffn['experts'][1]['w_gate'].shape == (4, 32, 48)
  D = cfg.model.model_dim
  routed = 3 * D * (2 * 16 + 4 * 48)
  shared = 2 * 3 * D * 24 + D
  inactive_per_layer = routed - routed * 2 / 6  # uniform routing: k/E of the routed parameters are active
  assert acc['n_total'] - acc['n_active'] == pytest.approx(2 * inactive_per_layer)
  assert acc['granularity'] == pytest.approx(D * 6 / (2 * 16 + 4 * 48))
  del shared


def test_measured_active_reflects_routing(tiny_cfg):
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'moe.num_experts': 4,
                                                                  'moe.expert_size_classes': '2x16,2x48'}))
  acc = accounting.count(cfg)
  uniform = accounting.measured_active(cfg, [[1, 1, 1, 1], [5, 5, 5, 5]])
  assert uniform['n_active_measured'] == pytest.approx(acc['n_active'])
  assert uniform['active_expert_ratio_measured'] == pytest.approx(2.0)
  small_only = accounting.measured_active(cfg, [[1, 1, 0, 0], [1, 1, 0, 0]])
  D = cfg.model.model_dim
  # k=2 small experts instead of the uniform expectation 2 * mean(16, 16, 48, 48) = 64 hidden units per layer.
  assert small_only['n_active_measured'] == pytest.approx(acc['n_active'] - 2 * 3 * D * (64 - 32))

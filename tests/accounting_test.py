"""Accounting from the config equals the instantiated parameter tree exactly."""

import pytest
from flax import nnx

from moejax import accounting, config as config_lib, model as model_lib


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
  forward = 2 * (attn_w + ffn_w + m.vocab_size * m.model_dim) + 2 * m.num_layers * m.num_heads * hd * cfg.data.seq_len
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

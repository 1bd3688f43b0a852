"""The decode bandwidth model (moejax.inference.cost), its use in the design search, and the decode benchmark."""

import numpy as np
import pytest

from moejax import config as config_lib
from moejax.studies import design
from moejax.model import accounting
from moejax.inference import cost as decode_cost
from moejax.errors import ConfigError


def _distinct_by_simulation(pick, batch: int, draws: int, rng) -> tuple[float, float]:
  """Mean and standard error of the distinct experts touched by `batch` tokens, each routed by pick(rng)."""
  counts = [len(set(np.concatenate([pick(rng) for _ in range(batch)]).tolist())) for _ in range(draws)]
  return float(np.mean(counts)), float(np.std(counts) / np.sqrt(draws))


@pytest.mark.parametrize('E,k,B', [(8, 2, 1), (8, 2, 4), (64, 8, 8), (64, 2, 64), (128, 8, 3)])
def test_expected_distinct_experts_under_uniform_routing(E, k, B):
  rng = np.random.default_rng(E * 1000 + k * 10 + B)
  mean, se = _distinct_by_simulation(lambda r: r.choice(E, k, replace=False), B, 3000, rng)
  want = float(decode_cost.expected_distinct(E, k, B))
  assert abs(mean - want) <= 4 * se + 1e-9, (mean, want, se)
  assert decode_cost.expected_distinct(E, k, 1) == pytest.approx(k)


def _cfg(**overrides):
  from moejax import base_config as base  # pylint: disable=import-outside-toplevel
  c = base.get_config()
  flat = {'model.model_dim': 64, 'model.num_layers': 2, 'model.num_heads': 2, 'model.num_kv_heads': 1,
          'model.ffn_hidden': 128, 'moe.num_experts': 16, 'moe.experts_per_token': 2, 'moe.expert_hidden': 32,
          'data.seq_len': 64}
  flat.update(overrides)
  return config_lib.validate(config_lib.apply_overrides(c, flat))


def test_step_bytes_counts_what_a_step_reads():
  cfg = _cfg()
  acc = accounting.count(cfg)
  expert = 3 * 64 * 32
  routed = 2 * 16 * expert
  one = decode_cost.step_bytes(cfg, 1, 100, 4, 4)
  assert one['weights_experts'] == pytest.approx(2 * 2 * expert * 4)  # k experts per layer at B = 1
  assert one['weights_nonexpert'] == pytest.approx((acc['n_total'] - routed) * 4)  # tied embedding: read by attend
  many = decode_cost.step_bytes(cfg, 4096, 100, 4, 4)
  assert many['weights_experts'] == pytest.approx(routed * 4)  # every expert, once
  head_dim = config_lib.head_dim(cfg.model)
  assert one['kv'] == pytest.approx(2 * 2 * 1 * head_dim * 1 * 101 * 4)  # read 100 positions, write 1
  assert one['total'] == pytest.approx(one['weights_nonexpert'] + one['weights_experts'] + one['kv'])
  measured = decode_cost.step_bytes(cfg, 8, 100, 2, 2, touched_expert_params=[3 * expert, 5 * expert])
  assert measured['weights_experts'] == pytest.approx(8 * expert * 2)
  dense = _cfg(**{'moe.num_experts': 0})
  assert (decode_cost.step_bytes(dense, 1, 10, 4, 4)['weights_nonexpert']
          == decode_cost.step_bytes(dense, 64, 10, 4, 4)['weights_nonexpert'] == accounting.count(dense)['n_total'] * 4)
  untied = _cfg(**{'model.use_tied_embeddings': False})
  V = config_lib.vocab_size(untied)
  assert decode_cost.step_bytes(untied, 2, 10, 1, 1)['weights_nonexpert'] == (
      accounting.count(untied)['n_total'] - routed - (V - 2) * 64)


def test_step_flops_count_the_active_matmuls_and_attention_over_the_context():
  cfg = _cfg()
  D, V, hd = 64, config_lib.vocab_size(cfg), config_lib.head_dim(cfg.model)
  attention_weights = 64 * 2 * hd * 2 + 2 * 64 * 1 * hd  # q, o and k, v of one layer
  active_ffn = 2 * 3 * 64 * 32 + 64 * 16  # k experts and the router
  per_token = 2 * (2 * (attention_weights + active_ffn) + V * D) + 4 * 2 * 2 * hd * 100
  assert decode_cost.step_flops(cfg, 1, 100) == pytest.approx(per_token)
  assert decode_cost.step_flops(cfg, 8, 100) == pytest.approx(8 * per_token)
  assert decode_cost.step_flops(cfg, 1, 200) - decode_cost.step_flops(cfg, 1, 100) == pytest.approx(
      4 * 2 * 2 * hd * 100)


def test_the_design_search_prices_decode_with_the_same_model_and_can_rank_differently():
  from moejax import base_config as base  # pylint: disable=import-outside-toplevel
  cfg = config_lib.validate(base.get_config())
  space = design.space_from_config(cfg, layers=[4, 8, 16], widths=[512, 768, 1024], experts=[1, 8, 16, 64],
                                   granularities=[1, 2, 4])
  plain = design.search(space, design.Budget(1e9, 1e8, None, 2))
  budget = design.Budget(1e9, 1e8, None, 2, decode_bytes=400e6, decode_batch=16, decode_context=512)
  limited = design.search(space, budget)
  top = lambda r: (r.designs['experts'][0], r.designs['topk'][0])
  assert top(plain)[0] / top(plain)[1] < top(limited)[0] / top(limited)[1]  # bandwidth pushes sparsity up
  assert np.all(limited.designs['decode_bytes'] <= 400e6)
  d = limited.designs
  for i in (0, len(d['n_total']) - 1):  # the vectorized price equals step_bytes on the emitted config
    o = design.overrides(d, i, head_dim=space.head_dim)
    emitted = config_lib.validate(config_lib.apply_overrides(base.get_config(), o))
    want = decode_cost.step_bytes(emitted, 16, 512, 2, 2)['total']
    assert d['decode_bytes'][i] == pytest.approx(want, rel=1e-12)
  with pytest.raises(ConfigError, match='--decode_bytes >= '):
    design.search(space, design.Budget(None, None, None, 2, decode_bytes=1e3))


def test_the_design_cli_takes_a_decode_budget_in_ms(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *a: subprocess.run([sys.executable, '-m', 'moejax.design', '--memory=1GB', '--top=3', *a], cwd=root,
                                  capture_output=True, text=True, timeout=120)
  out = run('--decode_ms=0.12', '--bandwidth=3.35TB', '--decode_batch=16')
  assert out.returncode == 0 and 'decode 402.00MB/step at batch 16' in out.stdout, out.stderr
  bad = run('--decode_ms=0.12')
  assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith('moejax: error: --decode_ms needs')

"""Routing analysis: the MI statements, stability with matched experts, kept checkpoints and the replay."""

import os
import subprocess
import sys

import numpy as np
import pytest

from moejax import config as config_lib
from moejax.studies import routes
from moejax.train import checkpoint, loop as loop_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokens(n=4000, vocab=20, seed=0):
  rng = np.random.default_rng(seed)
  return rng.choice(vocab, size=n, p=np.arange(1, vocab + 1) / np.arange(1, vocab + 1).sum())


def _entropy_bits(labels):
  p = np.bincount(labels) / labels.size
  p = p[p > 0]
  return float(-np.sum(p * np.log2(p)))


def test_a_router_deterministic_in_the_token_has_mi_equal_to_the_expert_entropy():
  tokens = _tokens()
  experts = (tokens * 7) % 8  # k=1, a function of the token id (not one-to-one: 20 ids on 8 experts)
  mi = routes.mutual_information(tokens, routes.assignment_mask(experts[:, None], 8))
  assert mi['mi'] == pytest.approx(_entropy_bits(experts), abs=1e-9)
  assert mi['mi'] == pytest.approx(mi['h_expert'], abs=1e-9) and mi['mi'] < _entropy_bits(tokens) - 0.1
  one_to_one = routes.mutual_information(tokens, routes.assignment_mask(tokens[:, None], 32))
  assert one_to_one['mi'] == pytest.approx(_entropy_bits(tokens), abs=1e-9)  # = H(token)
  pairs = np.stack([tokens % 8, (tokens % 8 + 3) % 8], 1)  # k=2 distinct experts, a function of the token
  k2 = routes.mutual_information(tokens, routes.assignment_mask(pairs, 8))
  assert k2['mi'] == pytest.approx(k2['h_expert'] - 1.0, abs=1e-9)  # H(expert) - log2 k


def test_an_independent_router_has_mi_near_its_shuffled_baseline():
  tokens = _tokens(seed=1)
  experts = np.random.default_rng(2).integers(0, 8, tokens.size)
  mask = routes.assignment_mask(experts[:, None], 8)
  mi = routes.mutual_information(tokens, mask)['mi']
  assert mi < 0.05 * routes.mutual_information(tokens, mask)['h_expert']
  assert abs(mi - routes.shuffled_mi(tokens, mask)) < 0.02


def test_stability_matches_expert_ids_across_seeds():
  rng = np.random.default_rng(3)
  experts = np.stack([rng.permutation(8)[:2] for _ in range(500)])
  a = routes.assignment_mask(experts, 8)
  perm = rng.permutation(8)
  b = a[:, np.argsort(perm)]  # the same routing with renamed experts
  assert routes.overlap(a, a) == 1.0 and routes.overlap(a, b) < 0.5
  assert routes.overlap(a, b[:, routes.match_experts(a, b)]) == 1.0
  dropped = routes.assignment_mask(np.array([[0, 4], [4, 4]]), 4)  # expert choice's 'not taken' id E
  np.testing.assert_array_equal(dropped, [[True, False, False, False], [False] * 4])


@pytest.mark.slow
def test_kept_checkpoints_and_the_replay(tiny_cfg, tmp_path):
  workdirs = []
  for seed in (0, 1):
    cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg, {
        'seed': seed, 'train.steps': 5, 'checkpoint.every_steps': 1, 'checkpoint.max_to_keep': 1,
        'checkpoint.keep_every_steps': 2, 'checkpoint.use_async': False}))
    workdirs.append(str(tmp_path / f'seed{seed}'))
    loop_lib.run(cfg, workdirs[-1])
  ckpt = checkpoint.Checkpointer(os.path.join(workdirs[0], 'checkpoints'))
  assert ckpt.steps() == [2, 4, 5]  # every 2nd step kept, plus the latest
  ckpt.close()
  tables = routes.run(workdirs, 8, str(tmp_path / 'out'))
  spec = tables['specialisation']
  assert len(spec) == 2 * 3 * 2  # runs x kept steps x MoE layers
  assert all(0 <= r['mi_token'] <= r['h_expert'] + 1e-9 and r['h_expert'] <= 2.0 + 1e-9 for r in spec)  # E=4
  assert {(r['from_step'], r['to_step']) for r in tables['stability']} == {(2, 4), (4, 5)}
  assert all(r['overlap_matched'] >= r['overlap_raw'] - 1e-9 for r in tables['seeds'])
  for name in ('routes.md', 'routes.json', 'routes_specialisation.png', 'routes_stability.png', 'routes_dead.png'):
    assert os.path.getsize(tmp_path / 'out' / name) > 0, name


def test_routes_cli_refuses_a_bad_workdir_in_one_line(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'moejax.routes', f'--workdir={tmp_path}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert out.stderr.strip().startswith('moejax: error:') and len(out.stderr.strip().splitlines()) == 1

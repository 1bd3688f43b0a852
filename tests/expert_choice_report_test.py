"""docs/results/expert_choice/make_report.py: the per-routing summary and the paired difference on synthetic rows
where the answer is known, and the shipped records it reads."""

import importlib.util
import math
import os

import pytest

from moejax.studies import statistics as stats_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'docs', 'results', 'expert_choice', 'make_report.py')
T_975_DOF2 = 4.302652729749464  # the 0.975 quantile of Student's t with 2 degrees of freedom


def _load():
  spec = importlib.util.spec_from_file_location('expert_choice_make_report', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


report = _load()


def _row(routing, seed, loss):
  return {'routing': routing, 'seed': seed, 'loss': loss, 'flops_per_token': 10, 'total_flops': 1000.0,
          'wall_s': 5.0 * (seed + 1), 'unserved_heldout': 0.0 if routing == 'token_choice' else 0.02}


def _rows(tc, ec):
  return ([_row('token_choice', s, x) for s, x in enumerate(tc)] +
          [_row('expert_choice', s, x) for s, x in enumerate(ec)])


def test_paired_difference_known_interval():
  rows = _rows([2.0, 2.1, 2.2], [1.9, 2.05, 2.2])  # differences -0.1, -0.05, 0: mean -0.05, sd 0.05
  d = report.paired_difference(rows)
  half = T_975_DOF2 * 0.05 / math.sqrt(3)
  assert d['seeds'] == [0, 1, 2] and d['dof'] == 2
  assert d['diffs'] == pytest.approx([-0.1, -0.05, 0.0])
  assert (d['mean'], d['sd'], d['half_width']) == pytest.approx((-0.05, 0.05, half))
  assert (d['low'], d['high']) == pytest.approx((-0.05 - half, -0.05 + half))
  assert not d['resolved']


def test_paired_difference_equals_the_block_design_interval():
  # Two configurations over the same seeds: the additive model's residual sigma times sqrt(2/S) is sd(d)/sqrt(S).
  tc, ec = [2.31, 2.35, 2.28, 2.40], [2.25, 2.33, 2.20, 2.37]
  d = report.paired_difference(_rows(tc, ec))
  sigma, dof, _ = stats_lib.block_sigma([{'seed_losses': dict(enumerate(x))} for x in (tc, ec)])
  assert dof == d['dof'] == 3
  assert d['half_width'] == pytest.approx(stats_lib.t_quantile(0.975, dof) * sigma * math.sqrt(2 / 4))


def test_paired_difference_resolved_pairs_by_seed_only():
  rows = _rows([2.0, 2.5, 3.0], [1.9, 2.41, 2.89])  # a seed shift larger than the difference: pairing removes it
  rows.append(_row('expert_choice', 7, 0.0))  # no token-choice run at seed 7: left out
  d = report.paired_difference(rows)
  assert d['seeds'] == [0, 1, 2] and d['resolved'] and d['high'] < 0
  assert d['mean'] == pytest.approx(-0.1)


def test_paired_difference_needs_two_shared_seeds():
  assert report.paired_difference(_rows([2.0], [1.9])) is None


def test_verdict_names_the_dof_rule_only_below_min_dof():
  few = report._verdict(report.paired_difference(_rows([2.0, 2.1, 2.2], [1.9, 2.05, 2.2])))  # 2 dof, unresolved
  assert 'not resolved by these 3 seeds' in few[1] and 'would call it inconclusive with 2' in few[1]
  tc = [2.0, 2.5, 3.0, 2.2, 2.4, 2.1, 2.6, 2.3]
  many = report._verdict(report.paired_difference(_rows(tc, [x - 0.1 + 0.01 * (s % 2) for s, x in enumerate(tc)])))
  assert 'is resolved (expert choice lower), for these 8 seeds only' in many[1]
  assert '7 degrees of freedom, at least the 6' in many[1] and 'inconclusive' not in many[1]


def test_summary_means_and_sd():
  means = {m['routing']: m for m in report.summary(_rows([2.0, 2.1, 2.2], [1.9, 2.05, 2.2]))}
  assert list(means) == ['token_choice', 'expert_choice']
  assert means['token_choice']['n'] == 3
  assert (means['token_choice']['loss'], means['token_choice']['sd']) == pytest.approx((2.1, 0.1))
  assert means['expert_choice']['loss'] == pytest.approx(2.05)
  assert (means['expert_choice']['wall_s'], means['expert_choice']['unserved_heldout']) == pytest.approx((10.0, 0.02))
  assert report.summary(_rows([2.0], []))[0]['sd'] is None


def test_shipped_records_are_compute_matched_and_paired():
  rows = report.runs()
  assert sorted((r['routing'], r['seed']) for r in rows) == sorted(
      (routing, s) for routing in ('token_choice', 'expert_choice') for s in range(8))
  assert len({(r['flops_per_token'], r['total_flops'], r['steps']) for r in rows}) == 1
  assert all(r['seed'] == r['data_seed'] for r in rows)
  assert all(r['unserved_heldout'] == 0 for r in rows if r['routing'] == 'token_choice')

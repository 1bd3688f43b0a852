"""Train, eval and decode steps compiled from abstract shapes on the local (CPU) devices."""

import pytest

from moejax import config as config_lib
from moejax.bench import fit as compile_steps


@pytest.mark.slow  # three compiles of the EP model: ~1 min on 2 idle cores
def test_compile_all_reports_every_step_with_expert_parallelism(tiny_cfg):
  cfg = config_lib.apply_overrides(tiny_cfg, {'mesh.expert': 4, 'mesh.data': 1, 'mesh.fsdp': 1})
  reports = compile_steps.compile_all(config_lib.validate(cfg), None, decode_batch=2)
  assert set(reports) == {'train', 'eval', 'decode'}
  for r in reports.values():
    assert r['compiler'].startswith('XLA:CPU') and r['peak_bytes'] > 0 and r['compile_s'] > 0
  assert reports['train']['mesh']['expert'] == 4 and reports['train']['devices'] == 4


def test_fit_row_shards_the_state_over_every_device(tiny_cfg):
  row = compile_steps.fit_row(tiny_cfg, None, 4)
  assert row['devices'] == 4 and row['target'] == 'cpu x4'
  assert 0 < row['state_gb'] <= row['peak_gb'] and row['analytic_gb'] > 0

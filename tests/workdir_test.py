"""Workdirs: one owner at a time (a lock), bound to one configuration, deliberate changes recorded."""

import json
import os

import pytest

from moejax import config as config_lib

from moejax.train import run as run_lib
from moejax.train import workdir
from moejax.errors import ConfigMismatch, WorkdirBusy


def _trained(path):
  os.makedirs(path / 'checkpoints' / '3')


def test_bind_records_then_accepts_the_same_config(tiny_cfg, tmp_path):
  assert workdir.bind(str(tmp_path), tiny_cfg) == []
  stored = json.loads((tmp_path / 'provenance.json').read_text())
  assert stored['config_hash'] == workdir.config_hash(config_lib.flatten(json.loads(tiny_cfg.to_json_best_effort())))
  _trained(tmp_path)
  assert workdir.bind(str(tmp_path), tiny_cfg) == []
  # Plumbing keys (how often to log or save, the mesh, the launcher) never bind a workdir.
  plumbing = config_lib.apply_overrides(tiny_cfg, {'train.log_every_steps': 7, 'checkpoint.every_steps': 2,
                                                   'mesh.data': 2, 'distributed.mode': 'single'})
  assert workdir.bind(str(tmp_path), plumbing) == []


def test_bind_refuses_another_config_naming_the_keys(tiny_cfg, tmp_path):
  workdir.bind(str(tmp_path), tiny_cfg)
  _trained(tmp_path)
  other = config_lib.apply_overrides(tiny_cfg, {'optim.peak_learning_rate': 1e-2, 'moe.num_experts': 8})
  with pytest.raises(ConfigMismatch) as info:
    workdir.bind(str(tmp_path), other)
  message = str(info.value)
  assert 'moe.num_experts (4 -> 8)' in message and 'optim.peak_learning_rate (0.002 -> 0.01)' in message
  assert '--allow_config_change' in message
  changes = workdir.bind(str(tmp_path), other, allow_change=True)
  assert len(changes) == 1 and changes[0]['keys']['moe.num_experts'] == [4, 8] and changes[0]['at_step'] == 3
  assert json.loads((tmp_path / 'config.json').read_text())['moe']['num_experts'] == 8
  assert workdir.bind(str(tmp_path), other) == changes  # the new config is now the workdir's


def test_an_untrained_workdir_is_claimed_by_a_new_config(tiny_cfg, tmp_path):
  workdir.bind(str(tmp_path), tiny_cfg)
  other = config_lib.apply_overrides(tiny_cfg, {'moe.num_experts': 8})
  assert workdir.bind(str(tmp_path), other) == []  # nothing was trained with the first one
  assert json.loads((tmp_path / 'config.json').read_text())['moe']['num_experts'] == 8


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
  with workdir.lock(str(tmp_path)):
    with pytest.raises(WorkdirBusy, match=f'in use by pid {os.getpid()}'):
      with workdir.lock(str(tmp_path)):
        pass
  with workdir.lock(str(tmp_path)):  # released on exit
    pass


def test_execute_refuses_a_locked_workdir_before_building_anything(tiny_cfg, tmp_path):
  with workdir.lock(str(tmp_path)):
    with pytest.raises(WorkdirBusy):
      run_lib.execute(tiny_cfg, str(tmp_path))
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_eval_with_another_config_refuses_unless_allowed(tiny_cfg, tmp_path):
  cfg = config_lib.apply_overrides(tiny_cfg, {'train.steps': 2})
  first = run_lib.execute(cfg, str(tmp_path))
  assert first['config_changes'] == []
  changed = config_lib.apply_overrides(cfg, {'moe.eval_capacity_factor': 1.0})
  with pytest.raises(ConfigMismatch, match='moe.eval_capacity_factor'):
    run_lib.execute(changed, str(tmp_path), mode='eval')
  assert json.loads((tmp_path / 'result.json').read_text()) == json.loads(json.dumps(first))  # untouched
  again = run_lib.execute(changed, str(tmp_path), mode='eval', allow_config_change=True)
  assert again['config_changes'][0]['keys'] == {'moe.eval_capacity_factor': [None, 1.0]}
  assert again['config']['moe']['eval_capacity_factor'] == 1.0

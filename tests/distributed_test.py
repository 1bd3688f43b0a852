"""Multi-process runs on 127.0.0.1, checkpoints across meshes, and bad distributed input.

Every multi-process test runs its processes as subprocesses under a timeout: a peer that
never starts makes JAX abort its partner, and nothing here may hang the suite.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from moejax import config as config_lib
from moejax.train import loop as loop_lib
from moejax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu')


def _main(args, devices, **kwargs):
  return subprocess.Popen([sys.executable, '-m', 'moejax.main'] + args, cwd=ROOT, env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f]


@pytest.mark.slow  # 70 s: two processes compile the model; per-process rows are unit-tested in the default suite
def test_two_processes_match_one_process_with_the_same_global_batch(corpus_glob, tmp_path):
  """2 processes x 2 CPU devices on a (data 2, expert 2) mesh == 1 process x 4 devices: every step's loss and
  the held-out loss. Process 1 writes no result.json, metrics or config of its own."""
  common = [f'--config=tests/testdata/tiny.py:{corpus_glob}', '--config.train.steps=3', '--config.mesh.data=2',
            '--config.mesh.expert=2', '--config.train.batch_size=8']
  port = portpicker.pick_unused_port()
  multi = [_main(common + [f'--workdir={tmp_path / "multi"}', f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                           '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}',
                           '--config.distributed.initialization_timeout_s=60'], devices=2) for i in range(2)]
  single = _main(common + [f'--workdir={tmp_path / "single"}'], devices=4)  # at the same time: saves ~10 s
  outputs = [p.communicate(timeout=240) for p in multi]
  for p, (_, err) in zip(multi, outputs):
    assert p.returncode == 0, err[-3000:]
  _, err = single.communicate(timeout=240)
  assert single.returncode == 0, err[-3000:]
  np.testing.assert_allclose(_losses(tmp_path / 'multi'), _losses(tmp_path / 'single'), rtol=1e-5)
  assert len(_losses(tmp_path / 'multi')) == 3  # one writer
  results = [json.loads((tmp_path / d / 'result.json').read_text()) for d in ('multi', 'single')]
  np.testing.assert_allclose(results[0]['eval']['loss'], results[1]['eval']['loss'], rtol=1e-5)
  for i, (_, err) in enumerate(outputs):
    assert f'joined the distributed run: process {i} of 2, 2 local / 4 global devices' in err


@pytest.mark.slow  # 40 s; train_test's sharded-mesh test covers sharded training in the default suite
def test_checkpoint_restores_onto_another_mesh(tiny_cfg, tmp_path):
  """Save on (data 2, expert 2), resume on (data 1, fsdp 2, expert 4): the run ends where an unbroken run ends."""
  cfg = config_lib.apply_overrides(tiny_cfg, {'train.batch_size': 8, 'eval.batch_size': 8, 'mesh.data': 2, 'mesh.expert': 2,
                                             'checkpoint.use_async': False})
  other = config_lib.apply_overrides(cfg, {'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.expert': 4})
  loop_lib.run(cfg, str(tmp_path / 'moved'), stop_after=3)
  resumed = loop_lib.run(other, str(tmp_path / 'moved'))
  assert resumed['steps'] == 6
  params = resumed['setup'].state['params']
  assert params['blocks'][0]['ffn']['experts'][0]['w_gate'].sharding.spec[0] == 'expert'
  assert len(params['blocks'][0]['ffn']['experts'][0]['w_gate'].sharding.device_set) == 8
  straight = loop_lib.run(cfg, str(tmp_path / 'straight'))['setup'].state['params']
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(_losses(tmp_path / 'moved'), _losses(tmp_path / 'straight'), rtol=1e-5)


@pytest.mark.parametrize('process_id', [0, 1])
def test_missing_peer_or_unreachable_coordinator_is_one_line_within_the_timeout(corpus_glob, tmp_path, process_id):
  """Process 0 whose peer never starts, or process 1 whose coordinator is not there: exit 4, one line, no hang."""
  port = portpicker.pick_unused_port()
  start = time.time()
  p = _main([f'--config=tests/testdata/tiny.py:{corpus_glob}', f'--workdir={tmp_path}',
             f'--config.distributed.coordinator_address=127.0.0.1:{port}', '--config.distributed.num_processes=2',
             f'--config.distributed.process_id={process_id}', '--config.distributed.initialization_timeout_s=4'],
            devices=1)
  _, err = p.communicate(timeout=90)
  assert p.returncode == 4, err[-2000:]
  lines = [line for line in err.splitlines() if line.startswith('moejax: error:')]
  assert len(lines) == 1 and f'process {process_id} of 2 could not join' in lines[0], err[-2000:]
  assert time.time() - start < 60


@pytest.mark.parametrize('extra,message', [
    (['--config.distributed.coordinator_address=127.0.0.1:1'], 'needs distributed.num_processes'),
    (['--config.distributed.mode=sometimes'], "distributed.mode='sometimes' must be"),
    (['--config.mesh.data=16', '--config.train.batch_size=16', '--config.eval.batch_size=16'],
     'needs 16 devices but only 8 are visible'),
    (['--config.mesh.data=-1', '--config.mesh.expert=-1'], 'at most one -1'),
    (['--config.mesh.data=-1', '--config.mesh.tensor=3'], 'mesh.data=-1: 8 devices are not divisible'),
    (['--config.mesh.data=-1', '--config.train.batch_size=4'], 'train.batch_size=4 must be divisible by the batch axes'),
    (['--mode=compile', '--device_memory=80'], '--device_memory=80 needs a unit'),
    (['--config.mesh.expert=-1', '--config.moe.num_experts=6', '--config.train.batch_size=8',
      '--config.eval.batch_size=8'], 'is not divisible by mesh axes expert=8'),
])
def test_bad_mesh_and_distributed_input_is_one_line(corpus_glob, tmp_path, extra, message):
  p = _main([f'--config=tests/testdata/tiny.py:{corpus_glob}', f'--workdir={tmp_path}'] + extra, devices=8)
  _, err = p.communicate(timeout=120)
  assert p.returncode != 0
  lines = [line for line in err.strip().splitlines() if 'Traceback' in line or line.startswith('moejax: error:')]
  assert len(lines) == 1 and message in lines[0], err[-2000:]


def test_compile_step_reports_memory_without_allocating(tiny_cfg):
  """One device: params bytes == 4 * N_total (float32), Adam moments twice that; a sharded mesh divides them."""
  from moejax.model import accounting  # pylint: disable=import-outside-toplevel
  n_total = accounting.count(tiny_cfg)['n_total']
  r = state_lib.compile_step(tiny_cfg)
  assert r['params_bytes'] == 4 * n_total
  assert 2 * 4 * n_total <= r['optimizer_bytes'] <= 2 * 4 * n_total + 64
  assert r['peak_bytes'] >= r['argument_bytes'] > r['params_bytes']
  sharded = state_lib.compile_step(config_lib.apply_overrides(tiny_cfg, {'mesh.fsdp': 2, 'mesh.expert': 2,
                                                                     'train.batch_size': 8}))
  assert sharded['devices'] == 4 and sharded['params_bytes'] < 0.75 * r['params_bytes']


@pytest.mark.parametrize('memory,code,verdict', [pytest.param('1GB', 0, 'fits', marks=pytest.mark.slow),
                                                  ('10KB', 1, 'DOES NOT FIT')])
def test_compile_mode_cli(corpus_glob, memory, code, verdict):
  p = _main([f'--config=tests/testdata/tiny.py:{corpus_glob}', '--mode=compile', '--config.mesh.data=2',
             '--config.mesh.expert=4', '--config.train.batch_size=8', '--config.eval.batch_size=8',
             f'--device_memory={memory}'], devices=8)
  out, err = p.communicate(timeout=120)
  assert p.returncode == code, err[-2000:]
  assert verdict in out and "mesh {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}" in out
  assert len([line for line in err.splitlines() if line.startswith('moejax: error:')]) == code


@pytest.mark.parametrize('env,wanted', [
    ({}, False), ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, False),  # the job's shell, not a step
    ({'SLURM_STEP_NUM_TASKS': '1'}, False), ({'SLURM_STEP_NUM_TASKS': '4'}, True),
    ({'TPU_WORKER_HOSTNAMES': 'w0'}, False), ({'TPU_WORKER_HOSTNAMES': 'w0,w1'}, True),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, True)])
def test_auto_mode_joins_only_multi_process_environments(tiny_cfg, monkeypatch, env, wanted):
  from moejax.parallel import distributed  # pylint: disable=import-outside-toplevel
  for name in ('SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS', 'TPU_WORKER_HOSTNAMES', 'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert distributed.wanted(tiny_cfg.distributed) == wanted
  assert distributed.wanted(config_lib.apply_overrides(tiny_cfg, {'distributed.mode': 'single'}).distributed) is False
  assert distributed.wanted(config_lib.apply_overrides(tiny_cfg, {'distributed.mode': 'multi'}).distributed) is True


def test_arguments_from_config_or_environment(tiny_cfg, monkeypatch):
  from moejax.parallel import distributed  # pylint: disable=import-outside-toplevel
  from moejax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'head:999')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert distributed.arguments(tiny_cfg.distributed) == {
      'initialization_timeout': 120, 'coordinator_address': 'head:999', 'num_processes': 4, 'process_id': 3}
  cfg = config_lib.apply_overrides(tiny_cfg, {'distributed.process_id': 1})
  assert distributed.arguments(cfg.distributed)['process_id'] == 1  # config wins
  with pytest.raises(ConfigError, match=r'process_id=5 must be in \[0, num_processes=4\)'):
    distributed.arguments(config_lib.apply_overrides(tiny_cfg, {'distributed.process_id': 5}).distributed)
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS')
  assert distributed.arguments(tiny_cfg.distributed) == {'initialization_timeout': 120}  # cluster auto-detection

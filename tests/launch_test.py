"""Launch scripts: their --dry_run output, and the SLURM script driving a real two-process run."""

import json
import os
import random
import shlex
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_JOB_NUM_NODES', 'SLURM_GPUS_ON_NODE', 'SLURM_JOB_NODELIST', 'SLURM_SUBMIT_DIR')


def _script(name, *args, env=None):
  base = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
  return subprocess.run(['bash', os.path.join(ROOT, 'launch', name)] + list(args), capture_output=True, text=True,
                        timeout=60, env=dict(base, **(env or {})))


def test_local_dry_run_prints_the_command():
  r = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'local.sh'), '--dry_run', 'experiments/quickstart.py:x',
                      'runs/w', '--config.seed=3'], capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  assert shlex.split(r.stdout)[1:] == ['-m', 'moejax.main', f'--config={ROOT}/experiments/quickstart.py:x',
                                       f'--workdir={ROOT}/runs/w', '--config.seed=3']


def test_tpu_pod_dry_run_lists_every_step():
  r = _script('tpu_pod.sh', '--name', 'pod1', '--zone', 'us-east5-a', '--type', 'v5litepod-32', '--spot',
              '--delete', '--dry_run', 'experiments/paper_b.py:gpu,B1', 'gs-mount/run 1', '--config.seed=2')
  assert r.returncode == 0, r.stderr
  lines = [shlex.split(line) for line in r.stdout.splitlines() if not line.startswith('#')]
  create, archive, scp, install, train, delete = lines
  assert create[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create'] and 'pod1' in create
  assert '--accelerator-type=v5litepod-32' in create and '--spot' in create and '--zone=us-east5-a' in create
  assert archive[:2] == ['git', 'archive']
  assert scp[4] == 'scp' and '--worker=all' in scp
  assert install[4] == 'ssh' and "uv pip install -q --python .venv/bin/python -e '.[tpu]'" in install[-1]
  assert train[-1].startswith('set -o pipefail; ')  # the trainer's exit status, not tee's
  remote = shlex.split(train[-1].split(' 2>&1')[0].split('&& ', 1)[1])
  assert '--worker=all' in train and remote[:3] == ['.venv/bin/python', '-m', 'moejax.main']
  assert remote[3:] == ['--config=experiments/paper_b.py:gpu,B1', '--workdir=gs-mount/run 1',
                        '--config.distributed.mode=multi', '--config.seed=2']
  assert delete[4] == 'delete' and '--quiet' in delete


def test_tpu_pod_keeps_the_slice_and_checks_its_arguments():
  r = _script('tpu_pod.sh', '--name', 'pod1', '--zone', 'z', '--dry_run', 'experiments/x.py', '/w')
  commands = [line for line in r.stdout.splitlines() if not line.startswith('#')]
  assert r.returncode == 0 and not any('delete' in c or '--spot' in c for c in commands)
  assert commands[-1].rstrip().endswith('--config.distributed.mode=multi\\ 2\\>\\&1\\ \\|\\ tee\\ -a\\ ~/moejax-run.log')  # no '' arg
  for args in (['--zone', 'z', 'experiments/x.py', '/w'], ['--name', 'p', '--zone', 'z', 'experiments/x.py'],
               ['--name', 'p', '--zone', 'z', '--bogus', 'experiments/x.py', '/w']):
    r = _script('tpu_pod.sh', *args)
    assert r.returncode == 2 and 'usage: launch/tpu_pod.sh' in r.stderr


@pytest.mark.parametrize('per_gpu,env,tasks,extra', [
    (False, {}, 2, ['--ntasks-per-node=1']),
    (True, {'SLURM_JOB_NUM_NODES': '4', 'SLURM_GPUS_ON_NODE': '4'}, 16, ['--ntasks-per-node=4', '--gpus-per-task=1']),
])
def test_gpu_slurm_dry_run(per_gpu, env, tasks, extra):
  flags = ['--per_gpu'] if per_gpu else []
  r = _script('gpu_slurm.sbatch', *flags, '--dry_run', 'experiments/quickstart.py', '/shared/w', '--config.mesh.data=-1',
              env=env)
  assert r.returncode == 0, r.stderr
  cd, exports, srun = r.stdout.strip().splitlines()
  assert cd == f'cd {ROOT}' and exports == f'export JAX_COORDINATOR_ADDRESS=node001:20000 JAX_NUM_PROCESSES={tasks}'
  cmd = shlex.split(srun)
  assert cmd[0] == 'srun' and f'--ntasks={tasks}' in cmd and all(e in cmd for e in extra)
  inner = cmd[-1]
  assert inner.startswith('export JAX_PROCESS_ID=$SLURM_PROCID; exec ')
  assert shlex.split(inner.split('exec ', 1)[1])[3:] == ['--config=experiments/quickstart.py', '--workdir=/shared/w',
                                                        '--config.distributed.mode=multi', '--config.mesh.data=-1']
  assert f'{tasks} processes' in r.stderr and 'coordinator node001:' in r.stderr


@pytest.mark.slow  # 15 s; the two-process run itself is in the default suite (distributed_test)
def test_gpu_slurm_script_runs_two_processes(corpus_glob, tmp_path):
  """A fake `srun` (2 local tasks, 1 CPU device each) and `scontrol` run the real script end to end."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  fake_srun = '''#!/usr/bin/env bash
n=1; for a in "$@"; do [[ $a == --ntasks=* ]] && n=${a#--ntasks=}; done
cmd=${@: -1}; pids=()
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i bash -c "$cmd" > "$FAKE_LOGS/task$i.log" 2>&1 & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait $p || rc=1; done; exit $rc
'''
  (bin_dir / 'srun').write_text(fake_srun)
  (bin_dir / 'scontrol').write_text('#!/usr/bin/env bash\necho 127.0.0.1\n')
  for f in ('srun', 'scontrol'):
    (bin_dir / f).chmod(stat.S_IRWXU)
  env = {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SLURM_JOB_ID': str(random.randint(1, 19999)),
         'SLURM_JOB_NUM_NODES': '2', 'SLURM_JOB_NODELIST': 'n[1-2]', 'SLURM_SUBMIT_DIR': ROOT,
         'FAKE_LOGS': str(tmp_path), 'XLA_FLAGS': '--xla_force_host_platform_device_count=1', 'JAX_PLATFORMS': 'cpu',
         'PYTHON': sys.executable}
  r = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'gpu_slurm.sbatch'), f'tests/testdata/tiny.py:{corpus_glob}',
                      str(tmp_path / 'run'), '--config.train.steps=2', '--config.mesh.data=-1',
                      '--config.distributed.initialization_timeout_s=60'],
                     capture_output=True, text=True, timeout=240, env=dict(os.environ, **env))
  logs = ''.join((tmp_path / f'task{i}.log').read_text()[-1500:] for i in range(2))
  assert r.returncode == 0, r.stderr + logs
  assert all(f'joined the distributed run: process {i} of 2' in logs for i in range(2)), logs
  record = json.loads((tmp_path / 'run' / 'result.json').read_text())
  assert record['train']['steps'] == 2 and record['config']['distributed']['mode'] == 'multi'


GPU_CHECK_FILES = {'summary.md', 'gpu_check.log', 'info.txt', 'pytest.log', 'moe.md', 'olmoe.md', 'decode.md',
                   'stages.log'}


def _gpu_check(out, python, timeout, **extra):
  env = dict(os.environ, OUT=str(out), PYTHON=python, PYTHONPATH=ROOT, **extra)
  env.pop('JAX_PLATFORMS', None)
  return subprocess.run(['bash', os.path.join(ROOT, 'launch', 'gpu_check.sh'), '--dry-run'], capture_output=True,
                        text=True, timeout=timeout, env=env, cwd=ROOT)


def test_gpu_check_reports_each_failed_stage_and_runs_the_rest(tmp_path):
  r = _gpu_check(tmp_path, 'false', 60)  # every Python stage fails at once
  assert r.returncode == 1, r.stdout + r.stderr
  assert set(os.listdir(tmp_path)) == GPU_CHECK_FILES
  summary = (tmp_path / 'summary.md').read_text()
  stages = [line.split('|')[1].strip() for line in summary.splitlines() if line.startswith('| ') and not line.startswith('| stage |')]
  assert stages == ['setup', 'info', 'pytest', 'moe-1 (4:32:64:256)', 'moe-2 (8:32:32:256)', 'olmoe', 'decode']
  assert summary.count('| FAILED (exit 1) |') == 6 and '| setup | passed |' in summary
  assert r.stdout.strip().endswith('gpu_check: 1 of 7 stages passed')
  r = _gpu_check(tmp_path / 'late', 'false', 60, GPU_CHECK_SECONDS='4')  # the time is spent before any stage starts
  assert r.returncode == 1 and r.stdout.count(': SKIPPED (no time left of 4 s)') == 7
  assert (tmp_path / 'late' / 'summary.md').read_text().count('| SKIPPED (no time left) |') == 7
  r = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'gpu_check.sh'), '--bogus'], capture_output=True, text=True)
  assert r.returncode == 2 and 'usage: launch/gpu_check.sh' in r.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage(tmp_path):
  """The whole GPU check on CPU at tiny sizes (about 4 minutes on 2 cores): fails when any stage breaks."""
  r = _gpu_check(tmp_path, sys.executable, 900)
  summary = (tmp_path / 'summary.md').read_text()
  assert r.returncode == 0, summary + (tmp_path / 'stages.log').read_text()[-3000:]
  assert set(os.listdir(tmp_path)) == GPU_CHECK_FILES
  assert summary.count('| passed |') == 7
  moe = (tmp_path / 'moe.md').read_text()
  assert moe.count('## Pallas grouped matmul: Triton settings') == 2 and '| E8 D32 F32 M256 | 32 | 32 | 8 | 2 | interpret |' in moe
  assert '| olmoe-h100 |' in (tmp_path / 'olmoe.md').read_text()
  assert 'OLMoE-shaped train step MFU: ' in summary and 'MFU: none' not in summary
  assert 'B=1 ' in summary and 'B=4 ' in summary  # decode measured/model per batch
  assert 'backend cpu' in (tmp_path / 'info.txt').read_text()
  assert 'skipped' in (tmp_path / 'pytest.log').read_text()

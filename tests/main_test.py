"""The command line: result records, sweeps, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

from moejax import config as config_lib
from moejax.train import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_execute_writes_complete_result_record(tiny_cfg, tmp_path):
  record = run_lib.execute(config_lib.apply_overrides(tiny_cfg, {'train.steps': 2}), str(tmp_path))
  on_disk = json.loads((tmp_path / 'result.json').read_text())
  assert on_disk == json.loads(json.dumps(record))
  for key in ('n_total', 'n_active', 'n_total_nonembed', 'n_active_nonembed', 'sparsity', 'flops_per_token'):
    assert key in record['accounting']
  assert set(record['eval']) >= {'loss', 'bits_per_byte', 'tokens'}
  assert set(record['train']) == {'steps', 'tokens', 'wall_s', 'routing'} and record['train']['steps'] == 2
  assert record['train']['routing']['window'] == [2, 2] and len(record['train']['routing']['layers']) == 2
  assert record['data']['name'].startswith('text:') and len(record['data']['fingerprint']) == 64
  assert record['config']['moe']['num_experts'] == 4
  layers = record['routing']['layers']
  assert len(layers) == 2 and sum(layers[0]['tokens_per_expert']) == 2 * record['eval']['tokens']  # k=2, no padding
  for key in ('load_max_over_mean', 'load_cv', 'dead_experts', 'drop_fraction', 'router_entropy'):
    assert key in layers[0]
  assert record['routing']['n_active_measured'] == record['accounting']['n_active']  # uniform experts
  assert 'git' in record and record['config_changes'] == [] and record['eval_curve'] == []
  assert json.loads((tmp_path / 'config.json').read_text())['train']['steps'] == 2
  assert [f for f in os.listdir(tmp_path) if f.startswith('.')] == ['.lock']  # no temp files left behind


def _cli(args, tmp_path):
  return subprocess.run([sys.executable, '-m', 'moejax.main'] + args, cwd=ROOT, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize('extra,message,code', [
    (['--config.moe.num_expertz=4'], 'bad flag or config override: num_expertz', 2),
    (['--config.train.steps=abc'], 'bad flag or config override', 2),
    (['--config.moe.experts_per_token=9'], 'moe.experts_per_token=9 must be in [1, moe.num_experts=4]', 2),
    (['--config.data.source=text:/nonexistent/*.txt'], "data.source='text:/nonexistent/*.txt' matches no files", 1),
    (['--workdir=/proc/moejax-cannot-write'], "workdir '/proc/moejax-cannot-write' is not writable", 1),
])
def test_cli_bad_input_is_one_line_and_nonzero(extra, message, code, corpus_glob, tmp_path):
  args = [f'--config=tests/testdata/tiny.py:{corpus_glob}', f'--workdir={tmp_path}/w'] + extra
  out = _cli(args, tmp_path)
  assert out.returncode == code
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('moejax: error: ') and message in lines[0], out.stderr
  assert not os.path.exists(tmp_path / 'w' / 'result.json')


def test_cli_missing_config_file(tmp_path):
  out = _cli(['--config=experiments/does_not_exist.py', f'--workdir={tmp_path}'], tmp_path)
  assert out.returncode == 2 and out.stderr.strip() == 'moejax: error: config file not found: experiments/does_not_exist.py'


def test_launch_local_usage_and_passthrough(tmp_path):
  out = subprocess.run(['bash', 'launch/local.sh'], cwd=ROOT, capture_output=True, text=True, timeout=30)
  assert out.returncode == 2 and out.stderr.startswith('usage: launch/local.sh')
  out = subprocess.run(['bash', 'launch/local.sh', 'experiments/missing.py', str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHON=sys.executable))
  assert out.returncode == 2 and f'config file not found: {ROOT}/experiments/missing.py' in out.stderr

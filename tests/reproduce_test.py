"""Single-run reproduction from a result.json."""

import json
import os
import subprocess
import sys

import pytest

from moejax import config as config_lib, reproduce

from moejax.train import run as run_lib
from moejax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reproduce_cli_gives_exactly_the_same_loss(tiny_cfg, tmp_path):
  run_lib.execute(config_lib.apply_overrides(tiny_cfg, {'train.steps': 3, 'moe.num_experts': 8}), str(tmp_path / 'a'))
  out = subprocess.run([sys.executable, '-m', 'moejax.reproduce', str(tmp_path / 'a' / 'result.json'),
                        f'--workdir={tmp_path / "b"}'], cwd=ROOT, capture_output=True, text=True, timeout=180)
  assert out.returncode == 0, out.stderr
  assert 'difference             +0.000e+00' in out.stdout and 'identical' in out.stdout
  b = json.loads((tmp_path / 'b' / 'result.json').read_text())
  assert b['config']['moe']['num_experts'] == 8 and b['train']['steps'] == 3


def test_reproduce_refuses_other_corpus_and_bad_records(tiny_cfg, tmp_path):
  run_lib.execute(config_lib.apply_overrides(tiny_cfg, {'train.steps': 1}), str(tmp_path / 'a'))
  path = tmp_path / 'a' / 'result.json'
  record = json.loads(path.read_text())
  record['data']['fingerprint'] = '0' * 64
  path.write_text(json.dumps(record))
  with pytest.raises(DataError, match='refusing to compare'):
    reproduce.reproduce(str(path), str(tmp_path / 'b'))
  record['config']['moe']['retired_key'] = 1
  path.write_text(json.dumps(record))
  with pytest.raises(ConfigError, match='unknown config key: moe.retired_key'):
    reproduce.reproduce(str(path), str(tmp_path / 'b'))
  path.write_text('{"config": {}')
  with pytest.raises(ConfigError, match='result record .* is not valid JSON'):
    reproduce.reproduce(str(path), str(tmp_path / 'b'))

"""Command-line plumbing: every bad experiment file, argument or value is one line and a non-zero exit."""

import os
import subprocess
import sys

import pytest

from moejax import cli, config as config_lib
from moejax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, timeout=120):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def _one_error_line(out, code, *needles):
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == code, out.stderr
  assert len(lines) == 1 and lines[0].startswith('moejax: error: '), out.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


BAD_FILES = {
    'syntax': ('def get_config(arg=None):\n  return (\n', 'line 2: SyntaxError'),
    'not_python': ('| a | b ± c |\n', 'line 1: SyntaxError'),
    'nul_bytes': ('\0\0\0', 'is not Python source'),
    'import_error': ('import no_such_module_here\n', 'line 1: ModuleNotFoundError'),
    'raises': ('from experiments import base\n\ndef get_config(arg=None):\n  raise RuntimeError("broken")\n',
               'line 4: RuntimeError: broken'),
}


@pytest.mark.parametrize('kind', sorted(BAD_FILES))
def test_bad_experiment_file_is_one_line_naming_file_and_line(kind, tmp_path):
  text, needle = BAD_FILES[kind]
  path = tmp_path / f'{kind}.py'
  path.write_text(text)
  _one_error_line(_run('moejax.main', f'--config={path}', f'--workdir={tmp_path}/w'), 2, str(path), needle)


@pytest.mark.parametrize('config,needle', [
    ('experiments/quickstart.py:foo', "has no variant 'foo': it declares none"),
    ('experiments/published/mixtral_8x7b.py:small', "has no variant 'small': its variants are 'tiny'"),
    ('experiments/paper_b.py:tiny,B9', "unknown grids ['B9']"),
    ('experiments/paper_b.py:huge', "unknown scale 'huge'"),
])
def test_undeclared_experiment_argument_is_refused(config, needle, tmp_path):
  _one_error_line(_run('moejax.main', f'--config={config}', f'--workdir={tmp_path}'), 2, needle)


def test_sweep_refuses_an_undeclared_argument_too(tmp_path):
  _one_error_line(_run('moejax.sweep', '--config=experiments/quickstart.py:foo', f'--root={tmp_path}', '--dry_run'),
                  2, "has no variant 'foo'")


@pytest.mark.parametrize('override', [{'moe.load_balancing': 'foo'}, {'moe.dispatch': 'foo'},
                                      {'moe.train_capacity_factor': 0.0}, {'moe.kernels': 'fast'},
                                      {'moe.router_score': 'relu'}])
def test_dense_configs_get_the_same_moe_validation(tiny_cfg, override):
  dense = config_lib.apply_overrides(tiny_cfg, {'moe.num_experts': 0})
  config_lib.validate(dense)
  with pytest.raises(ConfigError, match=list(override)[0]):
    config_lib.validate(config_lib.apply_overrides(dense, override))


def test_accounting_table_prints_every_field():
  out = _run('moejax.accounting', '--config=experiments/published/mixtral_8x7b.py')
  assert out.returncode == 0, out.stderr  # before the fix: TypeError on the list-valued expert_size_classes
  assert 'expert_size_classes: [[8, 14,336]]' in out.stdout and 'n_total: 46,' in out.stdout


def test_parse_amount():
  assert cli.parse_amount('2GB') == (2e9, True)
  assert cli.parse_amount('3GiB') == (3 * 2**30, True)
  assert cli.parse_amount('1.5e9') == (1.5e9, False)
  for bad in ('2GX', 'lots', '1.2.3'):
    with pytest.raises(ConfigError):
      cli.parse_amount(bad)


def test_ctrl_c_outside_training_is_one_line(monkeypatch, capsys):
  def interrupted(argv):
    raise KeyboardInterrupt

  monkeypatch.setattr(sys, 'argv', ['moejax'])
  with pytest.raises(SystemExit) as info:
    cli.cli(interrupted)
  assert info.value.code == 130
  assert capsys.readouterr().err.strip().startswith('moejax: error: interrupted (Ctrl-C)')

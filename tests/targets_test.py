"""Compile targets: names, topologies, GPU specs and one-line errors (no libtpu or CUDA plugin needed)."""

import subprocess
import sys

import pytest

from moejax.errors import ConfigError
from moejax.parallel import targets


@pytest.mark.parametrize('name,platform,devices,slices,topology', [
    ('tpu:v5p-8', 'tpu', 4, 1, 'v5p:2x2x1'),  # v5p names count TensorCores: 2 per chip
    ('tpu:v5p-16x2', 'tpu', 16, 2, 'v5p:2x2x2'),
    ('tpu:v5p-64', 'tpu', 32, 1, 'v5p:2x4x4'),
    ('tpu:v5e-16', 'tpu', 16, 1, 'v5e:4x4'),  # v5e and v6e names count chips
    ('tpu:v6e-8', 'tpu', 8, 1, 'v6e:2x4'),
    ('tpu:v6e-256', 'tpu', 256, 1, 'v6e:16x16'),
    ('gpu:h100x8', 'gpu', 8, 1, '1 x 1 x 8'),
    ('gpu:h200x8', 'gpu', 8, 1, '1 x 1 x 8'),
    ('gpu:h100x8x2', 'gpu', 16, 2, '1 x 2 x 8'),
    ('GPU:H100x4', 'gpu', 4, 1, '1 x 1 x 4'),
])
def test_parse_names_topologies(name, platform, devices, slices, topology):
  t = targets.parse(name)
  assert (t.platform, t.num_devices, t.num_slices) == (platform, devices, slices)
  topo = dict(t.topology)
  assert topo.get('topology_name') == topology or topo.get('topology') == topology
  if platform == 'tpu':
    assert topo['num_slices'] == slices


def test_on_chip_and_device_memory_come_from_the_chip():
  assert targets.parse('tpu:v5p-8').onchip_bytes == 16 << 20  # measured: 17 MiB of blocks -> ScopedVmemOom
  assert targets.parse('tpu:v6e-8').onchip_bytes == 32 << 20
  h100, h200 = targets.parse('gpu:h100x8'), targets.parse('gpu:h200x8')
  assert h100.onchip_bytes == h200.onchip_bytes == 232448  # the compiler's "available" figure
  assert h100.device_memory_bytes == 84942979072 and h200.device_memory_bytes == 151397597184


@pytest.mark.parametrize('chip', targets.GPUS)
def test_gpu_specs_are_shipped_and_name_their_source(chip):
  spec = targets.gpu_spec(chip)
  assert 'Source: ' in spec and 'openxla/xla' in spec
  assert 'platform_name: "CUDA"' in spec and f'NVIDIA {chip.upper()}' in spec


@pytest.mark.parametrize('name', ['tpu:v5p-6', 'tpu:v5p-4', 'tpu:v5e-2', 'tpu:v4-8', 'gpu:a100x8', 'gpu:h100x3',
                                  'h100x8', 'tpu:v5p-8x', ''])
def test_bad_names_are_one_config_error_line(name):
  with pytest.raises(ConfigError) as e:
    targets.parse(name)
  assert '\n' not in str(e.value) and str(e.value).startswith('--target=')


def test_missing_or_mismatched_compiler_packages_are_one_line(monkeypatch):
  versions = {'jax': '0.10.2', 'libtpu': None, 'jax-cuda12-plugin': None, 'jax-cuda12-pjrt': None}
  monkeypatch.setattr(targets, '_version', versions.get)
  monkeypatch.setattr(targets, '_pinned_libtpu', lambda v: '0.0.42')
  with pytest.raises(ConfigError, match=r"needs libtpu, which is not installed: pip install 'jax\[tpu\]==0.10.2'"):
    targets.check_installed('tpu')
  with pytest.raises(ConfigError, match='needs jax-cuda12-plugin, which is not installed'):
    targets.check_installed('gpu')
  versions.update({'libtpu': '0.0.40', 'jax-cuda12-plugin': '0.10.1', 'jax-cuda12-pjrt': '0.10.1'})
  with pytest.raises(ConfigError, match=r'libtpu 0.0.40 does not match jax 0.10.2 \(it pins libtpu 0.0.42\)'):
    targets.check_installed('tpu')
  with pytest.raises(ConfigError, match='jax-cuda12-plugin 0.10.1 does not match jax 0.10.2'):
    targets.check_installed('gpu')
  versions.update({'libtpu': '0.0.42.1', 'jax-cuda12-plugin': '0.10.2', 'jax-cuda12-pjrt': '0.10.2'})
  targets.check_installed('tpu')
  targets.check_installed('gpu')


def test_the_pinned_libtpu_is_read_from_jax_s_metadata():
  """jax's `tpu` extra pins libtpu; the check compares against that pin, not a copy of it."""
  pin = targets._pinned_libtpu('')  # pylint: disable=protected-access
  assert pin is not None and pin.count('.') == 2, pin  # e.g. jax 0.10.2 pins libtpu==0.0.42.*


def test_compile_mode_with_a_bad_target_is_one_line(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'moejax.main', '--config=experiments/quickstart.py', '--mode=compile',
                      '--target=tpu:v9-8'], capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith('moejax: error: --target=') and 'Traceback' not in r.stderr


def test_target_outside_compile_mode_is_refused(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'moejax.main', '--config=experiments/quickstart.py', '--mode=train',
                      f'--workdir={tmp_path}', '--target=tpu:v5p-8'], capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and '--target applies to --mode=compile only' in r.stderr

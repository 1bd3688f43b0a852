"""Shared test setup: 8 fake CPU devices (set before jax is imported) and tiny configs."""

import os
import subprocess
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compile time dominates these tests; many compile the same tiny model again, in this process,
# in the other xdist worker or in a subprocess (CLI tests inherit the environment). A persistent
# compilation cache inside the checkout shares those executables; a fresh clone starts cold.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), '.cache', 'jax-tests'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')
# XLA's fewer optimization passes compile these tiny programs ~30% faster (measured on the suite's
# MoE and model tests: 163 s -> 115 s); every comparison is between programs compiled alike.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

import pytest  # pylint: disable=wrong-import-position
# Imported once, up front: a first import of grain while an earlier test's orbax threads are still running
# raced in CPython's import lock (KeyError in _ModuleLock) in one fresh-clone run.
import grain  # pylint: disable=wrong-import-position,unused-import  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from testdata import tiny  # pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def corpus_glob(tmp_path_factory):
  """A small text corpus (real Python source files) as a 'text:' glob."""
  return tiny.write_corpus(str(tmp_path_factory.mktemp('corpus')))


@pytest.fixture
def tiny_cfg(corpus_glob):
  """A validated 2-layer MoE config that trains in about a second per step on CPU."""
  return tiny.get_config(corpus_glob)


@pytest.fixture
def tmpfs(tmp_path):
  """tmpfs('4m') mounts a tmpfs of that size under tmp_path for a real full disk (root only: CI and the dev
  machines run as root); skipped where it cannot be mounted; unmounted after the test."""
  mounts = []

  def mount(size: str):
    path = tmp_path / f'disk{len(mounts)}'
    path.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                      capture_output=True).returncode:
      pytest.skip('cannot mount a tmpfs here (needs root)')
    mounts.append(path)
    return path

  yield mount
  for path in mounts:
    subprocess.run(['umount', '-l', str(path)], capture_output=True)


@pytest.fixture
def small_disk(tmpfs):
  """A 4 MB tmpfs (see `tmpfs`)."""
  return tmpfs('4m')

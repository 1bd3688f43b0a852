"""Shared test setup: 8 fake CPU devices (set before jax is imported) and tiny configs."""

import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=wrong-import-position

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

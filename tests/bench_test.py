"""The benchmark commands (moejax.bench.*): one-line errors for bad flags, and their pure parts."""

import os
import subprocess
import sys

import pytest

from moejax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args):
  return subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                        env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.parametrize('args,message', [
    (('moejax.bench',), 'usage: python -m moejax.bench step|moe|data|decode'),
    (('moejax.bench', 'decode', '--batches=abc'), "--batches='abc' must be comma-separated positive integers"),
    (('moejax.bench.decode', '--rounds=0'), '--rounds=0 must be >= 1'),
    (('moejax.bench', 'decode', '--context=1000'),
     '--context=1000 + --decode_steps=32 exceeds the context of dense, 128 tokens (data.seq_len)'),
    (('moejax.bench.moe', '--shapes=64:2048'), "--shapes: '64:2048' is not 4 positive integers"),
    (('moejax.bench', 'moe', '--triton=128:128:four:3'), "--triton: '128:128:four:3' is not 4 positive integers"),
    (('moejax.bench', 'step', '--override=nope'), "--override='nope' must be key=value"),
    (('moejax.bench.step', 'extra'), "unexpected argument 'extra'"),
    (('moejax.bench', 'compile', '--config=experiments/quickstart.py', '--target=gpu:a100x8'),
     "--target='gpu:a100x8' is not a compile target"),
    (('moejax.bench', 'fit', '--config=experiments/quickstart.py', '--search=gpu:h100', '--global_tokens=nan'),
     '--global_tokens=nan must be a positive number'),
])
def test_bench_bad_flags_are_one_line(args, message):
  r = _bench(*args)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith('moejax: error: ') and message in lines[-1], r.stderr
  assert 'Traceback' not in r.stderr


def test_bench_moe_parses_shapes_and_restores_triton_settings():
  from moejax.bench import moe  # pylint: disable=import-outside-toplevel
  from moejax.kernels import gmm  # pylint: disable=import-outside-toplevel
  assert moe.parse_tuples('8:4096:14336:16384, 64:2048:1024:131072', 'shapes', 4, 'x') == [
      (8, 4096, 14336, 16384), (64, 2048, 1024, 131072)]
  with pytest.raises(ConfigError, match='names nothing'):
    moe.parse_tuples(',', 'triton', 4, 'x')
  before = dict(gmm.TRITON)
  with pytest.raises(RuntimeError):
    with moe.triton_settings(8, 2):
      assert gmm.TRITON == dict(before, num_warps=8, num_stages=2)
      raise RuntimeError
  assert gmm.TRITON == before


def test_bench_step_loads_experiment_variants_with_overrides():
  from moejax.bench import step  # pylint: disable=import-outside-toplevel
  cfg, = step.load_configs('experiments/bench/olmoe_h100.py:tiny', ['train.batch_size=1', 'moe.kernels=xla'])
  assert (cfg.model.model_dim, cfg.train.batch_size, cfg.moe.kernels) == (64, 1, 'xla')
  with pytest.raises(ConfigError, match="has no variant 'big'"):
    step.load_configs('experiments/bench/olmoe_h100.py:big', [])


def test_bench_timing_keeps_the_others_when_one_variant_fails(capsys):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moejax.bench import common, tables  # pylint: disable=import-outside-toplevel

  def out_of_memory():
    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17.2GiB\nmore detail')

  t = common.time_medians({'ok': lambda: jnp.ones(4) * 2, 'oom': out_of_memory}, rounds=2, reps=1)
  assert t['oom'] is None and t['ok'] > 0
  assert 'oom failed: RuntimeError: RESOURCE_EXHAUSTED: Out of memory' in capsys.readouterr().err
  row = {'shape': (8, 16, 16, 64), 'layer': 'MoE', 'kernels': 'xla', 'ms': None,
         'vs_dense': common.ratio(1.0, t['oom']), 'router_share': None}
  assert tables.layer_table([row])[2] == '| E8 D16 F16 M64 | MoE | xla | - | - | - |'


@pytest.mark.parametrize('flags,message', [
    ({'target': ['gpu:h100x8'], 'search': [], 'steps': True}, '--steps and --global_tokens apply to --search=FAMILY'),
    ({'out': '/nonexistent/fit.json'}, '--out=/nonexistent/fit.json: the directory /nonexistent does not exist'),
    ({'set': ['model.remat']}, "--set='model.remat' must be KEY=VALUE"),
    ({'global_tokens': float('inf')}, 'must be a positive number'),
    ({'cpu_only': True, 'search': []}, 'give --target=NAME'),
    ({'search': [], 'target': []}, 'give --target=NAME'),
])
def test_bench_fit_refuses_flags_before_any_compile(flags, message):
  """`bench fit`'s checks (run first; a ConfigError is its one line, exit 2: the nan case above runs it)."""
  import types  # pylint: disable=import-outside-toplevel
  from moejax.bench import fit  # pylint: disable=import-outside-toplevel
  f = types.SimpleNamespace(**{'target': [], 'search': ['gpu:h100'], 'headroom': 0.9, 'set': [], 'steps': False,
                               'global_tokens': 1024 * 4096, 'cpu_only': False, 'out': None, **flags})
  with pytest.raises(ConfigError, match=message):
    fit.check_flags(f)
  ok = fit.check_flags(types.SimpleNamespace(**{**vars(f), **{'target': [], 'search': ['gpu:h100'], 'steps': False,
                                                             'set': ['optim.peak_learning_rate=3e-4'], 'out': None,
                                                             'global_tokens': 1e6, 'cpu_only': False}}))
  assert ok['optim.peak_learning_rate'] == 3e-4 and ok['model.compute_dtype'] == 'bfloat16'  # a literal, not a string

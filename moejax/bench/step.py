"""The train-step time of every point of an experiment's sweep, side by side.

  python -m moejax.bench.step [--config=experiments/quickstart.py[:arg]] [--steps=10] [--rounds=5]
      [--cpu_devices=N] [--override=key=value ...]
  (or `python -m moejax.bench step ...`; `make bench`)

One fixed random batch (data loading excluded), after compilation and warm-up. Points are
timed in interleaved rounds (A B C, A B C, ...) so machine noise hits all alike; the table
gives the median step time, tokens/s, the model FLOP utilization where the config sets
`train.peak_tflops` (the trainer's convention: `accounting.count`'s training FLOPs per token
over the peak of all devices), and the ratio to the first point (the dense baseline in the
quickstart). Each point runs on its own mesh (`mesh.*`), so
`--config=experiments/bench/expert_parallel.py --cpu_devices=8` compares expert-parallel
steps with the one-device step. `--override=train.batch_size=1` changes every point.
"""

from __future__ import annotations

import ast
import statistics
import time

from absl import flags

from moejax import cli, config as config_lib
from moejax.model import accounting
from moejax.bench import common, tables
from moejax.errors import ConfigError


def run(cfgs: list, steps: int, rounds: int) -> list[dict]:
  """One row per config: median seconds per train step, timed in interleaved rounds."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from moejax import data
  from moejax.train import state as state_lib, step as step_lib
  from moejax.parallel import mesh as mesh_lib
  from moejax.train import optim  # pylint: disable=import-outside-toplevel
  common.check_positive(steps=steps, rounds=rounds)
  runners = []
  corpus = data.corpus_from_config(cfgs[0].data)
  for cfg in cfgs:
    s = state_lib.setup(cfg, corpus)
    fn = step_lib.make_train_step(s.graphdef, optim.for_run(cfg), cfg, state_lib.shardings(s.state), s.mesh)
    lr = np.float32(cfg.optim.peak_learning_rate)
    rng = np.random.default_rng(0)
    tokens = jax.device_put(rng.integers(0, 256, (cfg.train.batch_size, cfg.data.seq_len + 1), dtype=np.int32),
                            mesh_lib.batch_sharding(s.mesh, 2))
    state, seed = s.state, jnp.int32(cfg.seed)
    t0 = time.perf_counter()
    for _ in range(2):  # compile + warm-up
      state, out = fn(state, tokens, seed, lr)
    jax.block_until_ready(out)
    drop = out.get('ep_drop_fraction')
    runners.append({'cfg': cfg, 'fn': fn, 'seed': seed, 'lr': lr, 'state': state, 'tokens': tokens, 'times': [],
                    'compile_s': time.perf_counter() - t0, 'devices': s.mesh.size,
                    'ep_dropped': None if drop is None else float(jnp.mean(drop))})
  for _ in range(rounds):
    for r in runners:
      state = r['state']
      t0 = time.perf_counter()
      for _ in range(steps):
        state, out = r['fn'](state, r['tokens'], r['seed'], r['lr'])
      jax.block_until_ready(out)
      r['times'].append((time.perf_counter() - t0) / steps)
      r['state'] = state
  base = statistics.median(runners[0]['times'])
  return [_row(r, base) for r in runners]


def _row(r: dict, base: float) -> dict:
  cfg, med = r['cfg'], statistics.median(r['times'])
  acc = accounting.count(cfg)
  tokens_per_s = cfg.train.batch_size * cfg.data.seq_len / med
  peak = cfg.train.peak_tflops
  mesh = 'x'.join(f'{a}{cfg.mesh[a]}' for a in ('data', 'fsdp', 'expert', 'tensor') if cfg.mesh[a] != 1) or '1'
  return {'name': cfg.name, 'mesh': mesh, 'n_total': acc['n_total'], 'n_active': acc['n_active'],
          'step_ms': 1e3 * med, 'tokens_per_s': tokens_per_s, 'ratio': med / base, 'compile_s': r['compile_s'],
          'ep_dropped': r['ep_dropped'],
          'mfu': tokens_per_s * acc['flops_per_token'] / (peak * 1e12 * r['devices']) if peak else None}


def parse_override(text: str) -> tuple[str, object]:
  """'train.batch_size=1' -> ('train.batch_size', 1); values are Python literals, else strings."""
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise ConfigError(f'--override={text!r} must be key=value, e.g. train.batch_size=1')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def load_configs(config: str, overrides: list[str]) -> list:
  """The validated configs of every sweep point of `config` (path[:arg]), with `overrides` applied to each."""
  path, _, arg = config.partition(':')
  module = config_lib.load_module(path)
  config_lib.check_arg(module, path, arg or None)
  arg = arg or None
  points = module.get_sweep(arg) if hasattr(module, 'get_sweep') else [{}]
  extra = dict(parse_override(o) for o in overrides)
  return [config_lib.validate(config_lib.apply_overrides(module.get_config(arg), {**p, **extra})) for p in points]


def _main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  common.check_positive(steps=FLAGS.steps, rounds=FLAGS.rounds)
  cfgs = load_configs(FLAGS.config, FLAGS.override or [])
  rows = run(cfgs, FLAGS.steps, FLAGS.rounds)
  print(f'train-step benchmark: {FLAGS.config}, {common.device_line()}; {FLAGS.rounds} interleaved rounds of '
        f'{FLAGS.steps} steps, median')
  print('\n'.join(tables.step_table(rows)), flush=True)


def define_flags() -> None:
  """This benchmark's flags (defined only when it runs as a command)."""
  flags.DEFINE_string('config', 'experiments/quickstart.py', 'Experiment file[:arg] whose sweep points are timed.')
  flags.DEFINE_integer('steps', 10, 'Steps per timed round.')
  flags.DEFINE_integer('rounds', 5, 'Interleaved rounds (median taken).')
  flags.DEFINE_multi_string('override', None, 'key=value applied to every point, e.g. train.batch_size=1.')
  flags.DEFINE_integer('cpu_devices', 0, 'Fake this many CPU devices (for meshes on a CPU machine); 0 = as is.')


def main() -> None:
  define_flags()
  cli.cli(common.command(_main))


if __name__ == '__main__':
  main()

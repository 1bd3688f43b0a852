"""Benchmarks that print ratios measured side by side in one process (never asserted in tests).

  python -m moejax.bench step [--config=experiments/quickstart.py] [--steps=10] [--rounds=5]

`step`: the train-step time of every point of an experiment's sweep, on one fixed random
batch (data loading excluded), after compilation and warm-up. Points are timed in
interleaved rounds (A B C, A B C, ...) so machine noise hits all alike; the table gives
the median step time, tokens/s and the ratio to the first point (the dense baseline in
the quickstart).
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moejax import accounting, config as config_lib, data, main as main_lib, optim, train

FLAGS = flags.FLAGS


def step_benchmark(cfgs: list, steps: int, rounds: int) -> list[dict]:
  """Median seconds per train step of each config, timed in interleaved rounds."""
  runners = []
  corpus = data.corpus_from_config(cfgs[0].data)
  for cfg in cfgs:
    s = train.setup(cfg, corpus)
    fn = train.make_train_step(s.graphdef, optim.make(cfg.optim, cfg.train.steps), cfg,
                               optim.schedule(cfg.optim, cfg.train.steps))
    rng = np.random.default_rng(0)
    tokens = jax.device_put(rng.integers(0, 256, (cfg.train.batch_size, cfg.data.seq_len + 1), dtype=np.int32))
    state, seed = s.state, jnp.int32(cfg.seed)
    t0 = time.perf_counter()
    for _ in range(2):  # compile + warm-up
      state, out = fn(state, tokens, seed)
    jax.block_until_ready(out)
    runners.append({'cfg': cfg, 'fn': fn, 'seed': seed, 'state': state, 'tokens': tokens, 'times': [],
                    'compile_s': time.perf_counter() - t0})
  for _ in range(rounds):
    for r in runners:
      state = r['state']
      t0 = time.perf_counter()
      for _ in range(steps):
        state, out = r['fn'](state, r['tokens'], r['seed'])
      jax.block_until_ready(out)
      r['times'].append((time.perf_counter() - t0) / steps)
      r['state'] = state
  base = statistics.median(runners[0]['times'])
  rows = []
  for r in runners:
    cfg, med = r['cfg'], statistics.median(r['times'])
    acc = accounting.count(cfg)
    rows.append({'name': cfg.name, 'n_total': acc['n_total'], 'n_active': acc['n_active'], 'step_ms': 1e3 * med,
                 'tokens_per_s': cfg.train.batch_size * cfg.data.seq_len / med, 'ratio': med / base,
                 'compile_s': r['compile_s']})
  return rows


def _main(argv):
  if len(argv) != 2 or argv[1] != 'step':
    raise app.UsageError('usage: python -m moejax.bench step [--config=...] [--steps=N] [--rounds=N]')
  module = config_lib.load_module(FLAGS.config)
  points = module.get_sweep() if hasattr(module, 'get_sweep') else [{}]
  cfgs = [config_lib.validate(config_lib.apply_overrides(module.get_config(), p)) for p in points]
  rows = step_benchmark(cfgs, FLAGS.steps, FLAGS.rounds)
  print(f'train-step benchmark: {FLAGS.config}, {jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'{FLAGS.rounds} interleaved rounds of {FLAGS.steps} steps, median')
  print('| name | N_total | N_active | step ms | tok/s | ratio to first | compile+warmup s |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    print(f'| {r["name"]} | {accounting.human(r["n_total"])} | {accounting.human(r["n_active"])} | '
          f'{r["step_ms"]:.1f} | {r["tokens_per_s"]:,.0f} | {r["ratio"]:.2f}x | {r["compile_s"]:.1f} |')
  sys.stdout.flush()


if __name__ == '__main__':
  flags.DEFINE_string('config', 'experiments/quickstart.py', 'Experiment file whose sweep points are timed.')
  flags.DEFINE_integer('steps', 10, 'Steps per timed round.')
  flags.DEFINE_integer('rounds', 5, 'Interleaved rounds (median taken).')
  main_lib.cli(_main)

"""Compile time and compiled memory of every point of an experiment's sweep, side by side.

  python -m moejax.bench compile --config=experiments/bench/remat.py [--repeats=2]

For each point: `state.compile_step` (the train step lowered and compiled on the config's mesh
without allocating anything), its compile time (the fastest of --repeats, with jax's compilation
cache off) and the compiler's per-device memory analysis: temporaries and the peak estimate
(arguments + outputs - donated aliases + temporaries), with ratios to the first point. Step time
is `python -m moejax.bench step` on the same file. docs/scaling-out.md shows the tables.
"""

from __future__ import annotations

import logging

import jax
from absl import flags

from moejax import config as config_lib
from moejax.train import state as state_lib


def compile_rows(cfgs: list, repeats: int = 1) -> list[dict]:
  """[{'name', 'compile_s', 'temp_bytes', 'peak_bytes', ...ratios}] of each config's train step."""
  rows = []
  for cfg in cfgs:
    reports = []
    for _ in range(repeats):
      jax.clear_caches()
      reports.append(state_lib.compile_step(cfg))
    best = min(reports, key=lambda r: r['compile_s'])
    rows.append({'name': cfg.name, 'compile_s': best['compile_s'], 'temp_bytes': best.get('temp_bytes'),
                 'peak_bytes': best.get('peak_bytes'), 'platform': best['platform']})
    logging.info('%s: compiled in %.1f s, temporaries %s bytes', cfg.name, best['compile_s'], best.get('temp_bytes'))
  for row in rows:
    for key in ('compile_s', 'temp_bytes', 'peak_bytes'):
      first = rows[0][key]
      row[key.split('_')[0] + '_ratio'] = None if not first or row[key] is None else row[key] / first
  return rows


def markdown(rows: list[dict]) -> str:
  mb = lambda b: '-' if b is None else f'{b / 1e6:.2f}'
  lines = ['| point | compile s | ratio | temporaries MB | ratio | peak MB | ratio |', '|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r["name"]} | {r["compile_s"]:.2f} | {r["compile_ratio"]:.2f}x | {mb(r["temp_bytes"])} | '
                 f'{r["temp_ratio"] or 0:.2f}x | {mb(r["peak_bytes"])} | {r["peak_ratio"] or 0:.2f}x |')
  return '\n'.join(lines)


def _main(argv):
  del argv
  module = config_lib.load_module(flags.FLAGS.config)
  points = module.get_sweep() if hasattr(module, 'get_sweep') else [{}]
  cfgs = [config_lib.validate(config_lib.apply_overrides(module.get_config(), p)) for p in points]
  jax.config.update('jax_enable_compilation_cache', False)
  rows = compile_rows(cfgs, flags.FLAGS.repeats)
  print(f'compile benchmark: {flags.FLAGS.config}, {jax.devices()[0].device_kind} ({rows[0]["platform"]}), '
        f'jax {jax.__version__}; fastest of {flags.FLAGS.repeats} compiles')
  print(markdown(rows))


def main() -> None:
  from moejax import cli  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('config', None, 'Experiment file with get_config() and get_sweep().')
  flags.DEFINE_integer('repeats', 1, 'Compile each point this many times; report the fastest.')
  cli.cli(_main)


if __name__ == '__main__':
  main()

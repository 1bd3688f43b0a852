"""Compile time and compiled memory of every point of an experiment's sweep, side by side.

  python -m moejax.bench compile --config=experiments/bench/remat.py [--repeats=2] [--target=gpu:h100x8]

For each point: `state.compile_step` (the train step lowered and compiled on the config's mesh
without allocating anything), its compile time (the fastest of --repeats, with jax's compilation
cache off) and the compiler's per-device memory analysis: temporaries and the peak estimate
(arguments + outputs - donated aliases + temporaries), with ratios to the first point. Step time
is `python -m moejax.bench step` on the same file. `--target` compiles with that TPU slice's or GPU
node's real compiler on this machine (the mesh's devices are the target's: `moejax.parallel.targets`).
docs/scaling-out.md shows the tables.
"""

from __future__ import annotations

import logging

import jax
from absl import flags

from moejax import config as config_lib
from moejax.train import state as state_lib


def compile_rows(cfgs: list, repeats: int = 1, target=None) -> list[dict]:
  """[{'name', 'compile_s', 'temp_bytes', 'peak_bytes', ...ratios}] of each config's train step (for `target`)."""
  rows = []
  for cfg in cfgs:
    reports = []
    for _ in range(repeats):
      jax.clear_caches()
      reports.append(state_lib.compile_step(cfg, target))
    best = min(reports, key=lambda r: r['compile_s'])
    rows.append({'name': cfg.name, 'compile_s': best['compile_s'], 'temp_bytes': best.get('temp_bytes'),
                 'peak_bytes': best.get('peak_bytes'), 'platform': best['platform'], 'compiler': best['compiler']})
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
  from moejax.parallel import targets  # pylint: disable=import-outside-toplevel
  target = targets.parse(flags.FLAGS.target) if flags.FLAGS.target else None  # (a bad name fails before anything)
  if target is not None:
    targets.prepare_environment({target.platform})
  module = config_lib.load_module(flags.FLAGS.config)
  points = module.get_sweep() if hasattr(module, 'get_sweep') else [{}]
  cfgs = [config_lib.validate(config_lib.apply_overrides(module.get_config(), p)) for p in points]
  jax.config.update('jax_enable_compilation_cache', False)
  rows = compile_rows(cfgs, flags.FLAGS.repeats, target)
  where = target.name if target else f'{jax.devices()[0].device_kind} ({rows[0]["platform"]})'
  print(f'compile benchmark: {flags.FLAGS.config}, {where}, {rows[0]["compiler"]}, jax {jax.__version__}; fastest of '
        f'{flags.FLAGS.repeats} compiles')
  print(markdown(rows))


def main() -> None:
  from moejax import cli  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('config', None, 'Experiment file with get_config() and get_sweep().', required=True)
  flags.DEFINE_integer('repeats', 1, 'Compile each point this many times; report the fastest.')
  flags.DEFINE_string('target', None, 'Compile for a TPU slice or GPU node with its real compiler, e.g. gpu:h100x8.')
  cli.cli(_main)


if __name__ == '__main__':
  main()

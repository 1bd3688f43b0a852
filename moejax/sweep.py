"""Run every point of an experiment file's `get_sweep()` in one process and tabulate held-out loss.

  python -m moejax.sweep --config=experiments/quickstart.py[:arg] --root=DIR [--config.a.b=v ...]

Each point is the experiment's `get_config(arg)` plus the point's dotted overrides (and
any `--config.*` flags, applied to every point). Point i runs in ROOT/<name>; a point whose
result.json exists is not re-run. A failing point is recorded and the sweep goes on.
At the end the table is printed and written to ROOT/results.md and ROOT/results.csv.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
import time

from absl import app, flags

from moejax import accounting, config as config_lib, main as main_lib, metrics as metrics_lib
from moejax.errors import ConfigError, MoejaxError

FLAGS = flags.FLAGS

COLUMNS = ('name', 'n_total', 'n_active', 'sparsity', 'heldout_loss', 'bits_per_byte', 'train_wall_s')


def point_name(point: dict) -> str:
  """A readable, unique workdir name: the point's `name`, else its shortened overrides plus a hash."""
  digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:6]
  if 'name' in point:
    return re.sub(r'[^A-Za-z0-9._=-]+', '_', str(point['name']))
  parts = [f'{k.split(".")[-1]}={v}' for k, v in sorted(point.items())]
  return re.sub(r'[^A-Za-z0-9._=-]+', '_', '_'.join(parts))[:80] + '-' + digest


def table_row(record: dict) -> dict:
  """One results-table row from a result record."""
  acc = record['accounting']
  return {'name': record['name'], 'n_total': acc['n_total'], 'n_active': acc['n_active'],
          'sparsity': acc['sparsity'], 'heldout_loss': record['eval']['loss'],
          'bits_per_byte': record['eval']['bits_per_byte'], 'train_wall_s': record['train']['wall_s']}


def markdown(rows: list[dict]) -> str:
  """The results table as Markdown."""
  lines = ['| name | N_total | N_active | s | held-out loss (nats/token) | bits/byte | train s |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    wall = f'{r["train_wall_s"]:.0f}' if r['train_wall_s'] is not None else '-'
    lines.append(f'| {r["name"]} | {accounting.human(r["n_total"])} | {accounting.human(r["n_active"])} | '
                 f'{r["sparsity"]:g} | {r["heldout_loss"]:.4f} | {r["bits_per_byte"]:.4f} | {wall} |')
  return '\n'.join(lines) + '\n'


def csv_text(rows: list[dict]) -> str:
  """The results table as CSV with full-precision numbers."""
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=COLUMNS)
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def check_points(cfg, points: list[dict]) -> None:
  """Applies and validates every point's overrides up front: a bad key fails before any point runs."""
  for point in points:
    try:
      config_lib.validate(config_lib.apply_overrides(cfg, dict(point, name=point.get('name', 'x'))))
    except ConfigError as e:
      raise ConfigError(f'sweep point {point_name(point)}: {e}') from None


def run_sweep(cfg, points: list[dict], root: str) -> tuple[list[dict], list[tuple[str, str]]]:
  """Runs (or reuses) each point; returns (table rows, [(name, error)])."""
  rows, failures = [], []
  for i, point in enumerate(points, 1):
    name = point_name(point)
    workdir = os.path.join(root, name)
    result_path = os.path.join(workdir, 'result.json')
    t0 = time.time()
    try:
      if os.path.exists(result_path):
        with open(result_path) as f:
          record = json.load(f)
        status = 'done earlier'
      else:
        overrides = dict(point, name=point.get('name', name))
        record = main_lib.execute(config_lib.apply_overrides(cfg, overrides), workdir)
        status = f'{time.time() - t0:.0f}s'
      rows.append(table_row(record))
      print(f'[{i}/{len(points)}] {name}: held-out loss {record["eval"]["loss"]:.4f} ({status})', flush=True)
    except MoejaxError as e:
      failures.append((name, str(e)))
      print(f'[{i}/{len(points)}] {name}: FAILED: {e}', flush=True)
  return rows, failures


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.root is None:
    raise app.UsageError('--config and --root are required')
  try:
    path, arg = config_lib.config_flag(sys.argv)
    module = config_lib.load_module(path)
    points = module.get_sweep(arg) if hasattr(module, 'get_sweep') else [{}]
    check_points(FLAGS.config, points)
    os.makedirs(FLAGS.root, exist_ok=True)
    rows, failures = run_sweep(FLAGS.config, points, FLAGS.root)
    if rows:
      metrics_lib.atomic_write(os.path.join(FLAGS.root, 'results.md'), markdown(rows))
      metrics_lib.atomic_write(os.path.join(FLAGS.root, 'results.csv'), csv_text(rows))
  except (MoejaxError, OSError) as e:
    main_lib.fail(e if isinstance(e, MoejaxError) else MoejaxError(f'cannot write under --root: {e}'))
  print('\n' + markdown(rows) + f'\n(written to {FLAGS.root}/results.md and results.csv)')
  for name, error in failures:
    print(f'FAILED {name}: {error}', file=sys.stderr)
  if failures:
    sys.exit(1)


if __name__ == '__main__':
  main_lib.define_config_flag()
  flags.DEFINE_string('root', None, 'Directory holding one workdir per sweep point.')
  main_lib.cli(_main)

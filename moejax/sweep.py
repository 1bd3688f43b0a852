"""Run, list or emit every point of an experiment file's `get_sweep()`.

  python -m moejax.sweep --config=experiments/X.py[:arg] --root=DIR [--config.a.b=v ...]
      [--dry_run] [--point=I] [--emit=slurm|tpu]

The bookkeeping (point names, validation, skipping finished points, failed.json, the cluster
scripts, the tables at the end) is `moejax.studies.sweeps`; its docstring has the rules.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from moejax import cli, config as config_lib, files
from moejax.errors import ConfigError, MoejaxError, WorkdirError
from moejax.studies import sweeps

FLAGS = flags.FLAGS


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.root is None:
    raise app.UsageError('--config and --root are required')
  root = FLAGS.root if '://' in FLAGS.root else os.path.abspath(FLAGS.root)
  path, arg = config_lib.config_flag(sys.argv)
  module = config_lib.load_module(path)
  try:
    points = module.get_sweep(arg) if hasattr(module, 'get_sweep') else [{}]
  except MoejaxError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a user's file: one line, not a traceback)
    raise ConfigError(f'{path}: get_sweep({arg!r}) raised {type(e).__name__}: {e}') from None
  if not points:
    raise ConfigError(f'{path}: get_sweep({arg!r}) returned no points')
  resolved = sweeps.resolve_points(FLAGS.config, points)
  if FLAGS.point is not None and not 0 <= FLAGS.point < len(resolved):
    raise ConfigError(f'--point={FLAGS.point} is out of range: the sweep has points 0..{len(resolved) - 1}')
  if FLAGS.dry_run:
    sys.stdout.write(sweeps.dry_run_text(resolved, root))
    return
  try:
    os.makedirs(root, exist_ok=True)
    if FLAGS.emit:
      repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
      script = (sweeps.emit_slurm if FLAGS.emit == 'slurm' else sweeps.emit_tpu)(sys.argv, resolved, root, repo)
      out = os.path.join(root, 'sweep.slurm' if FLAGS.emit == 'slurm' else 'sweep_tpu.sh')
      files.atomic_write(out, script)
      os.chmod(out, 0o755)
      print(f'wrote {out} ({len(resolved)} points); nothing was run')
      return
    failures = sweeps.run_points(resolved, root, FLAGS.point)
    from moejax.parallel import distributed  # pylint: disable=import-outside-toplevel  (loads jax: only once points ran)
    distributed.finish()
    text = sweeps.write_tables(root) if FLAGS.point is None else ''
  except OSError as e:
    raise WorkdirError(f'cannot write under --root {root}: {e.strerror or e}') from None
  if text:
    print('\n' + text + f'\n(written to {root}/results.md and results.csv)')
  for name, error in failures:
    print(f'FAILED {name}: {error}', file=sys.stderr)
  if failures:
    sys.exit(1)


if __name__ == '__main__':
  cli.define_config_flag()
  flags.DEFINE_string('root', None, 'Directory holding one workdir per sweep point.')
  flags.DEFINE_bool('dry_run', False, 'List the points (with parameter counts and status) and exit.')
  flags.DEFINE_integer('point', None, 'Run only the point with this index (what cluster jobs run).')
  flags.DEFINE_enum('emit', None, ['slurm', 'tpu'], 'Write a cluster script for the points instead of running.')
  cli.cli(_main)

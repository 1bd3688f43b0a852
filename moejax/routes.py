"""`python -m moejax.routes --workdir=RUN [--workdir=SEED2 ...] [--sequences=64] [--out=DIR]`: routing analysis.

Replays the routing of every kept checkpoint (`checkpoint.keep_every_steps`) on a fixed held-out
slice and writes routes.md, routes.json and figures (specialisation, stability across
checkpoints and seeds, dead experts); the library is `moejax.studies.routes` (docs/studies.md).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from moejax.train import restore

FLAGS = flags.FLAGS


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required (repeat it for seeds of one configuration)')
  for workdir in FLAGS.workdir:
    restore.load_config(workdir)  # a bad workdir fails here, before jax loads
  from moejax.studies import routes  # pylint: disable=import-outside-toplevel
  out = FLAGS.out or os.path.join(FLAGS.workdir[0], 'routes')
  tables = routes.run(FLAGS.workdir, FLAGS.sequences, out)
  print(f'{len(tables["specialisation"])} specialisation rows, {len(tables["stability"])} stability rows, '
        f'{len(tables["seeds"])} seed rows: {out}/routes.md', file=sys.stderr)


if __name__ == '__main__':
  from moejax import cli  # pylint: disable=import-outside-toplevel
  flags.DEFINE_multi_string('workdir', [], 'A trained run; repeat for seeds of one configuration.')
  flags.DEFINE_integer('sequences', 64, 'Held-out sequences (of data.seq_len tokens) replayed at each checkpoint.')
  flags.DEFINE_string('out', None, 'Output directory; default WORKDIR/routes of the first workdir.')
  cli.cli(_main)

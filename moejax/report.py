"""A Markdown report with figures from every result under a root.

  python -m moejax.report --root=DIR --out=DIR

Writes OUT/report.md and three PNGs (held-out loss against N_total, against sparsity s = E/k and
against the number of experts, one line per fixed active-parameter budget), then the results
table. The library is `moejax.studies.report.write_report` (figures: `moejax.studies.figures`).
"""

from __future__ import annotations

import sys

from absl import app, flags

from moejax.studies import figures, report

FLAGS = flags.FLAGS


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.root or not FLAGS.out:
    raise app.UsageError('--root and --out are required')
  path = report.write_report(FLAGS.root, FLAGS.out)
  print(f'wrote {path} and {len(figures.PLOTS)} figures', file=sys.stderr)


if __name__ == '__main__':
  from moejax import cli  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('root', None, 'Directory holding result.json files (as for moejax.results).')
  flags.DEFINE_string('out', None, 'Directory for report.md and the PNG figures.')
  cli.cli(_main, interrupted='nothing was written (the report under --out appears whole or not at all)')

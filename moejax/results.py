"""Gather every result.json under a root into one table, seeds grouped.

  python -m moejax.results --root=DIR|gs://bucket/dir [--format=md|csv|json] [--out=FILE]

One row per configuration (seeds grouped: mean, standard deviation and count of the held-out
loss); failed points and unreadable files are listed, never counted. The library is
`moejax.studies.results` (`config_hash` stays importable from here).
"""

from __future__ import annotations

import sys

from absl import app, flags

from moejax import files
from moejax.studies import results

FLAGS = flags.FLAGS


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.root:
    raise app.UsageError('--root is required')
  gathered = results.gather(FLAGS.root)
  rows, varied = results.table(gathered.records)
  text = results.formatted(rows, varied, gathered, FLAGS.format)
  if FLAGS.out:
    files.atomic_write(FLAGS.out, text)
  else:
    sys.stdout.write(text)
  results.warn_unreadable(gathered)
  if not gathered.records:
    print(f'moejax: warning: no complete result.json under {FLAGS.root}', file=sys.stderr)
  print(f'{len(gathered.records)} runs in {len(rows)} configurations, '
        f'{len(gathered.failed)} failed, {len(gathered.unreadable)} skipped', file=sys.stderr)


if __name__ == '__main__':
  from moejax import cli  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('root', None, 'Directory (or gs:// prefix) holding result.json files, at any depth.')
  flags.DEFINE_enum('format', 'md', ['md', 'csv', 'json'], 'Output format.')
  flags.DEFINE_string('out', None, 'Write the table here (atomically) instead of stdout.')
  cli.cli(_main)

"""`python -m moejax.accounting --config=FILE [--json]`: N_total, N_active, FLOPs and bytes of a config.

The counting itself is `moejax.model.accounting` (conventions in its docstring).
"""

from __future__ import annotations

import json
from typing import Any

from absl import app, flags

from moejax import config as config_lib
from moejax.model import accounting


def _main(argv):
  del argv
  if flags.FLAGS.config is None:
    raise app.UsageError('--config is required')
  cfg = config_lib.validate(flags.FLAGS.config)
  record = accounting.count(cfg)
  if flags.FLAGS.json:
    print(json.dumps(record, indent=2))
    return
  for key, value in record.items():
    print(f'{key:>24}: {_format(value)}')


def _format(value: Any) -> str:
  """A table cell: 1,234 for ints, 4 significant digits for floats, lists and the rest element-wise."""
  if isinstance(value, bool) or value is None or isinstance(value, str):
    return str(value)
  if isinstance(value, int):
    return f'{value:,}'
  if isinstance(value, float):
    return f'{value:.4g}'
  if isinstance(value, (list, tuple)):
    return '[' + ', '.join(_format(v) for v in value) + ']'
  if isinstance(value, dict):
    return '{' + ', '.join(f'{k}: {_format(v)}' for k, v in value.items()) + '}'
  return str(value)


if __name__ == '__main__':
  from moejax import cli  # pylint: disable=import-outside-toplevel
  cli.define_config_flag()
  flags.DEFINE_bool('json', False, 'Print the record as JSON.')
  cli.cli(_main)

"""Command-line plumbing shared by every `python -m moejax.X` entry point.

One place for: the `--config=FILE[:arg]` flag, absl flag parsing that turns every bad
flag, bad experiment file or bad override into one `moejax: error: ...` line, the
`cli` wrapper around `absl.app.run`, and amount parsing ('2GB', '1.5e9').
No module here imports an entry point, so entry points can import each other freely.
"""

from __future__ import annotations

import math
import re
import sys

from absl import app, flags
from ml_collections import config_flags

import moejax
from moejax import config as config_lib
from moejax.errors import ConfigError, Interrupted, MoejaxError

FLAGS = flags.FLAGS

_UNITS = {'b': 1, 'kb': 1e3, 'mb': 1e6, 'gb': 1e9, 'tb': 1e12, 'kib': 2**10, 'mib': 2**20, 'gib': 2**30, 'tib': 2**40}


def define_config_flag() -> None:
  """--config=experiments/x.py[:arg] with --config.a.b=v overrides; lock_config makes typos fail."""
  config_flags.DEFINE_config_file('config', None, 'Experiment file, optionally with :arg.', lock_config=True)


_HINTS = {'amount': 'use e.g. 1.5e9 (parameters) or 2GB / 3GiB (bytes)', 'bytes': 'use e.g. 300MB or 2GiB (bytes)',
          'bandwidth': 'use e.g. 3.35TB or 80GB/s (bytes per second)'}


def parse_amount(text: str, kind: str = 'amount') -> tuple[float, bool]:
  """'2GB' -> (2e9, True) (bytes); '1.5e9' -> (1.5e9, False) (parameters). Finite values only.

  kind='bytes' (a byte-only flag) and kind='bandwidth' (bytes per second, '80GB/s' as well as '80GB') only change
  the hint an error gives; the caller decides what a plain number means.
  """
  text = str(text)
  hint = _HINTS[kind]
  body = re.sub(r'\s*/\s*s\s*$', '', text) if kind == 'bandwidth' else text
  match = re.fullmatch(r'\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*', body)
  if not match:
    raise ConfigError(f'cannot parse the amount {text!r}; {hint}')
  try:
    value = float(match.group(1))
  except ValueError:
    raise ConfigError(f'cannot parse the amount {text!r}; {hint}') from None
  if not math.isfinite(value):
    raise ConfigError(f'the amount {text!r} is not finite; {hint}')
  unit = match.group(2).lower()
  if not unit:
    return value, False
  if unit not in _UNITS:
    raise ConfigError(f'unknown unit {match.group(2)!r} in {text!r}; use one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB'
                      + (' (optionally /s)' if kind == 'bandwidth' else ''))
  if not math.isfinite(value * _UNITS[unit]):
    raise ConfigError(f'the amount {text!r} is not finite; {hint}')
  return value * _UNITS[unit], True


def require_positive(counts: tuple[str, ...] = (), amounts: tuple[str, ...] = ()) -> None:
  """Registers flag validators: each of `counts` (integer flags) unset or >= 1, each of `amounts` (float flags)
  unset or finite and > 0. A bad value is then one `moejax: error:` line at parsing, before anything runs."""
  for name in counts:
    flags.register_validator(name, lambda v: v is None or v >= 1, f'--{name} must be a whole number >= 1')
  for name in amounts:
    flags.register_validator(name, lambda v: v is None or (math.isfinite(v) and v > 0),
                             f'--{name} must be a finite number > 0')


def fail(error: MoejaxError) -> None:
  """Prints the one-line error and exits with its code."""
  print(f'moejax: error: {error}', file=sys.stderr, flush=True)
  sys.exit(error.exit_code)


def _one_line(text: str) -> str:
  return ' '.join(str(text).replace('\\n', ' ').replace("\\'", "'").strip("'").split())


def _experiment_file_error(path: str, error: BaseException) -> ConfigError | None:
  """One line naming the experiment file and line, when `error` was raised inside that file; else None."""
  line = config_lib.error_line(error, path)
  if line is None:
    return None
  return ConfigError(f'experiment file {path}, line {line}: {type(error).__name__}: {_one_line(error)}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad flag, experiment file or --config override is one line and exit code 2."""
  found = config_lib.config_flag(argv)
  if found:
    try:
      config_lib.check_experiment_file(*found)  # missing file, syntax error, undeclared :arg
    except MoejaxError as e:
      fail(e)
  try:
    return flags.FLAGS(argv)
  except MoejaxError as e:
    fail(e)
  except Exception as e:  # pylint: disable=broad-except
    # config_flags wraps what get_config() raised; blame the experiment file only for its own errors.
    cause = e.__cause__ or e.__context__ or e
    if isinstance(cause, MoejaxError):
      fail(cause)
    located = _experiment_file_error(found[0], cause) if found else None
    if located is None and not isinstance(e, (flags.Error, AttributeError, KeyError, TypeError, ValueError)):
      raise
    fail(located or ConfigError(f'bad flag or config override: {_one_line(e)}'))
  return []


def cli(main_fn, interrupted: str = 'nothing saved since the last checkpoint (a single Ctrl-C during training '
        'saves one first)') -> None:
  """Runs an absl main with moejax logging, importable experiment files and one-line errors.

  A usage error (`app.UsageError`: a required flag missing, stray arguments) is one line and exit 2, without the
  help text. Ctrl-C outside a training loop (which handles it itself, see `train`) ends with one line
  ('interrupted (Ctrl-C): ' + `interrupted`, what the command leaves behind) and exit status 130 instead of a
  traceback.
  """
  moejax.setup_logging()
  config_lib.add_experiment_root(sys.argv)

  def main(argv):
    try:
      return main_fn(argv)
    except app.UsageError as e:  # absl would print the whole --help first: one line, exit 2, like any bad flag
      raise ConfigError(str(e)) from None

  try:
    app.run(main, flags_parser=parse_flags)
  except MoejaxError as e:
    fail(e)
  except KeyboardInterrupt:
    fail(Interrupted(f'interrupted (Ctrl-C): {interrupted}'))

"""Loading experiment files (errors name file and line), `:arg` variants, dotted overrides."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import traceback
from typing import Any, Sequence

import ml_collections

from moejax.errors import ConfigError


def load_module(path: str):
  """Imports an experiment file (`experiments/x.py`) as a module; errors name the file (and line)."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  try:
    with open(path, 'rb') as f:
      source = f.read()
  except OSError as e:
    raise ConfigError(f'config file {path} cannot be read: {e.strerror or e}') from None
  if b'\0' in source:
    raise ConfigError(f'experiment file {path} is not Python source (it has NUL bytes)')
  try:
    code = compile(source, path, 'exec')
  except SyntaxError as e:
    raise ConfigError(f'experiment file {path}, line {e.lineno}: SyntaxError: {e.msg}') from None
  name = 'moejax_experiment_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    exec(code, module.__dict__)  # pylint: disable=exec-used
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (any error in a user's file is one line)
    raise ConfigError(f'experiment file {path}, line {error_line(e, path) or "?"}: {type(e).__name__}: {e}') from None
  return module


def error_line(error: BaseException, path: str) -> int | None:
  """The line of `path` where `error` was raised (its innermost frame in that file), or None."""
  frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
  return frames[-1].lineno if frames else None


def check_arg(module, path: str, arg: str | None) -> None:
  """Refuses an `:arg` the experiment file does not declare.

  A file declares its variants with `ARGS = ('tiny', ...)` or a function `check_arg(arg)` that
  raises ConfigError for a bad one; a file with neither takes no argument.
  """
  if hasattr(module, 'check_arg'):
    try:
      module.check_arg(arg)
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f'experiment file {path}, line {error_line(e, path) or "?"}: check_arg({arg!r}): '
                        f'{type(e).__name__}: {e}') from None
    return
  declared = tuple(getattr(module, 'ARGS', ()))
  if arg is not None and arg not in declared:
    known = f'its variants are {", ".join(repr(a) for a in declared)}' if declared else 'it declares none (ARGS)'
    raise ConfigError(f'{path} has no variant {arg!r}: {known}')


def check_experiment_file(path: str, arg: str | None) -> None:
  """Loads `path` and checks `arg` against its declared variants (one ConfigError line on any problem)."""
  check_arg(load_module(path), path, arg)


def config_flag(argv: Sequence[str]) -> tuple[str, str | None] | None:
  """(path, arg) of the `--config=path[:arg]` command-line flag, or None."""
  for i, item in enumerate(argv):
    value = item.split('=', 1)[1] if item.startswith('--config=') else (
        argv[i + 1] if item == '--config' and i + 1 < len(argv) else None)
    if value is not None:
      path, _, arg = value.partition(':')
      return path, (arg or None)
  return None


def add_experiment_root(argv: Sequence[str]) -> None:
  """Puts the parent of a `--config=.../experiments/x.py` file on sys.path, so `from experiments import base` works."""
  found = config_flag(argv)
  if found:
    root = os.path.dirname(os.path.dirname(os.path.abspath(found[0])))
    if root not in sys.path:
      sys.path.insert(0, root)


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'moe': {'num_experts': 8}} -> {'moe.num_experts': 8} (a config's JSON form as dotted overrides).

  Not flax's `traverse_util.flatten_dict(sep='.')`, which gives the same result: importing flax
  takes about 4 s and loads jax, and config-only commands (validation, results, the design
  search) must not pay that before they can reject a bad flag.
  """
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Returns a copy of `cfg` with dotted `{'moe.num_experts': 8}` overrides; unknown keys and bad types raise."""
  cfg = copy.deepcopy(cfg)
  was_locked = cfg.is_locked
  cfg.lock()  # (a locked ConfigDict refuses new keys instead of adding them)
  try:
    for dotted, value in overrides.items():
      try:
        cfg.update_from_flattened_dict({dotted: value})
      except (KeyError, AttributeError):
        raise ConfigError(f'unknown config key: {dotted}') from None
      except (TypeError, ValueError) as e:
        raise ConfigError(f'{dotted}={value!r}: wrong type ({e})') from None
  finally:
    if not was_locked:
      cfg.unlock()
  return cfg

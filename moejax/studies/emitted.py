"""Experiment files written by the study commands (`moejax.design --emit`, `moejax.frontier --emit`).

An emitted file is an ordinary experiment file: its `get_config` is a source experiment's, its
`get_sweep` the chosen points, so `python -m moejax.sweep --config=FILE` trains them and a reviewer
reads the command that made it in its docstring. The source is named relative to the emitted
file, so the pair can move together.
"""

from __future__ import annotations

import os

from moejax import files
from moejax.errors import WorkdirError

# source_arg for a file that passes its own argument to the source (and checks it there).
PASS_ARG = object()


def write(path: str, doc: str, source: str, sweep: list[dict], sweep_doc: str, source_arg=PASS_ARG,
          extra: str = '') -> None:
  """Writes (atomically) the experiment file at `path`: docstring `doc`, `get_config` = `source`'s at
  `source_arg` (PASS_ARG: the file's own argument, checked by the source's `check_arg`), `extra` module
  code after the source's name (such as a metadata dict), and `get_sweep` returning `sweep`."""
  rel = os.path.relpath(os.path.abspath(source), os.path.dirname(os.path.abspath(path)))
  head = f'_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), {rel!r})\n'
  if source_arg is PASS_ARG:
    head += '''

def check_arg(arg):
  """The source experiment's variants."""
  config_lib.check_arg(config_lib.load_module(_SOURCE), _SOURCE, arg)
'''
    get_config = '  return config_lib.load_module(_SOURCE).get_config(arg)'
  else:
    head += f'_SOURCE_ARG = {source_arg!r}\n'
    get_config = '  del arg\n  return config_lib.load_module(_SOURCE).get_config(_SOURCE_ARG)'
  body = ',\n'.join('    ' + repr(p) for p in sweep)
  text = f'''"""{doc}"""

import os

from moejax import config as config_lib

{head}{extra}

def get_config(arg=None):
  """The source experiment's config; the designs are sweep points."""
{get_config}


def get_sweep(arg=None):
  """{sweep_doc}"""
  del arg
  return [
{body},
  ]
'''
  try:
    files.atomic_write(path, text)
  except OSError as e:
    raise WorkdirError(f'cannot write --emit={path}: {e.strerror or e}') from None

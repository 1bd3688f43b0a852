"""The output directory of export and import: written beside its target, renamed at the end, or removed.

`staged(out, what)` yields a fresh hidden sibling `.OUT.partial-PID-*` of `out`, created with
the permissions `mkdir` gives under the current umask (0755 under the default), not mkdtemp's
0700. On success it is renamed to `out`; on any failure it is removed, and a full disk or
another OS error becomes one `WorkdirError` line. SIGTERM while it is open raises
`Preempted` (exit 143) so the same cleanup runs; a SIGKILL leaves the sibling behind, and the
next `staged` of the same `out` removes it (its PID is gone).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from typing import Iterator

from moejax import files
from moejax.errors import WorkdirError


def _partial_prefix(out: str) -> str:
  return f'.{os.path.basename(out)}.partial-'


def remove_stale(out: str) -> list[str]:
  """Removes the partial siblings of `out` whose writer is gone; returns their paths."""
  removed = []
  pattern = os.path.join(glob.escape(os.path.dirname(out)), glob.escape(_partial_prefix(out)) + '*')
  for path in glob.glob(pattern):
    pid = os.path.basename(path)[len(_partial_prefix(out)):].split('-', 1)[0]
    if pid.isdigit() and int(pid) != os.getpid() and files._alive(int(pid)):  # pylint: disable=protected-access
      continue
    shutil.rmtree(path, ignore_errors=True)
    removed.append(path)
  return removed


def prepare_out(out: str) -> str:
  """A fresh temporary directory beside `out` (which must not exist, or be empty)."""
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise WorkdirError(f'{out} already exists and is not an empty directory; remove it or choose another path')
  parent = os.path.dirname(out)
  try:
    os.makedirs(parent, exist_ok=True)
    remove_stale(out)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f'{_partial_prefix(out)}{os.getpid()}-')
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # what os.mkdir gives; mkdtemp makes 0700
    return tmp
  except OSError as e:
    raise WorkdirError(f'cannot write beside {out}: {e.strerror or e}') from None


def finish_out(tmp: str, out: str) -> None:
  """Renames the finished temporary directory to `out` (replacing an empty directory)."""
  out = os.path.abspath(out)
  if os.path.isdir(out):
    os.rmdir(out)
  os.replace(tmp, out)


def sigterm_raises(out: str, what: str):
  """While open (main thread only), SIGTERM raises Preempted (one line, exit 143) instead of killing the process."""
  return files.sigterm_raises(f'{what} stopped by SIGTERM: nothing was written under {os.path.abspath(out)}; '
                              f'rerun to {what}')


@contextlib.contextmanager
def staged(out: str, what: str) -> Iterator[str]:
  """Yields a temporary sibling of `out` to fill; renamed to `out` on success, removed on any failure."""
  out = os.path.abspath(out)
  tmp = prepare_out(out)
  try:
    with sigterm_raises(out, what):
      yield tmp
      finish_out(tmp, out)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    cause = 'no space left on device' if e.errno == errno.ENOSPC else (e.strerror or str(e))
    raise WorkdirError(f'cannot {what} to {out}: {cause}; nothing was written under it') from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise

"""The one atomic-write helper and the one JSON reader every module uses.

A write goes to a hidden temp file beside its target, is flushed and fsynced, then renamed
over the target: a reader sees the old file or the new one, never half of one, and a crash
leaves at most a `.NAME.*.tmp` file that the next write of the same target removes.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import tempfile
import threading
from typing import Any, Callable, Iterator

from moejax.errors import DataError, Interrupted, MoejaxError, Preempted, WorkdirError

TMP_SUFFIX = '.tmp'


def _temp_prefix(path: str) -> str:
  return '.' + os.path.basename(path) + '.'


def remove_stale_temps(path: str) -> None:
  """Removes temp files a killed writer of `path` left beside it (their pid is gone)."""
  directory = os.path.dirname(os.path.abspath(path))
  for tmp in glob.glob(os.path.join(glob.escape(directory), glob.escape(_temp_prefix(path)) + '*' + TMP_SUFFIX)):
    pid = os.path.basename(tmp)[len(_temp_prefix(path)):].split('-', 1)[0]
    if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
      continue
    with contextlib.suppress(OSError):
      os.remove(tmp)


def pid_alive(pid: int) -> bool:
  """Whether process `pid` exists (a stale temp file or directory names the pid that wrote it)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temp path beside `path`; on a clean exit it is fsynced and renamed over `path`.

  For writers that want a file name (matplotlib's savefig, a tokenizer's save); on any
  exception (SIGTERM's Preempted included) the temp file is removed and the target kept.
  """
  directory = os.path.dirname(os.path.abspath(path))
  remove_stale_temps(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(path) + f'{os.getpid()}-',
                             suffix=TMP_SUFFIX)
  os.close(fd)
  try:
    yield tmp
    _set_default_mode(tmp)
    with open(tmp, 'rb+') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_set(directory: str, last: str | None = None) -> Iterator[Callable[[str], str]]:
  """A set of files written together into `directory` (a report: its pages and figures). Yields `path(name)`, the
  temp file to write the file `name` to. On a clean exit every file is fsynced and renamed into place, `last` last
  (its new version then means the set is complete); on any exception (Ctrl-C, SIGTERM's Preempted, a full disk)
  every temp file is removed and the directory's previous files stay as they were. Temps follow `atomic_path`'s
  naming, so one a killed writer left is removed by the next write of that file."""
  temps: dict[str, str] = {}

  def path(name: str) -> str:
    target = os.path.join(directory, name)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(target) + f'{os.getpid()}-', suffix=TMP_SUFFIX)
    os.close(fd)
    temps[name] = tmp
    return tmp

  try:
    yield path
    for name in sorted(temps, key=lambda n: n == last):
      _set_default_mode(temps[name])
      with open(temps[name], 'rb+') as f:
        os.fsync(f.fileno())
    for name in sorted(temps, key=lambda n: n == last):
      os.replace(temps.pop(name), os.path.join(directory, name))
    _fsync_dir(directory)
  finally:
    for tmp in temps.values():
      with contextlib.suppress(OSError):
        os.remove(tmp)


@contextlib.contextmanager
def sigterm_raises(message: str) -> Iterator[None]:
  """While open (main thread only), SIGTERM raises `Preempted(message)` (one line, exit 143) instead of killing the
  process, so the cleanup of whatever is being written runs."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    del signum, frame
    raise Preempted(message)

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def output(out: str, what: str, last: str) -> Iterator[Callable[[str], str]]:
  """`atomic_set` under the directory `out` for a command's output (a report, an analysis): its files appear
  together (`last` last) or not at all. An interrupt (Ctrl-C, SIGTERM) or an OS error (a full disk, a read-only
  directory) is one line naming `what`, and the files already under `out` stay as they were."""
  kept = f'the files under {out} are as they were'
  try:
    os.makedirs(out, exist_ok=True)
    with sigterm_raises(f'{what} stopped by SIGTERM: {kept}'), atomic_set(out, last) as path:
      yield path
  except OSError as e:
    raise WorkdirError(f'cannot write {what} under {out}: {e.strerror or e}; {kept}') from None
  except KeyboardInterrupt:
    raise Interrupted(f'interrupted (Ctrl-C): {what} was not written; {kept}') from None


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes text or bytes to `path` atomically (temp file, fsync, rename)."""
  with atomic_path(path) as tmp:
    with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
      f.write(data)


def atomic_write_json(path: str, value: Any, *, indent: int | None = 1, sort_keys: bool = True) -> None:
  """Writes `value` as JSON (newline-terminated) to `path` atomically."""
  atomic_write(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + '\n')


def read_json(path: str, what: str, error: type[MoejaxError] = DataError, *, object_only: bool = True,
              hint: str = '') -> Any:
  """Reads a JSON file or raises `error` with one line naming `what`, the path, the cause (and `hint`)."""
  tail = f'; {hint}' if hint else ''
  try:
    with open(path) as f:
      value = json.load(f)
  except FileNotFoundError:
    raise error(f'{what} {path} does not exist{tail}') from None
  except OSError as e:
    raise error(f'{what} {path} cannot be read: {e.strerror or e}{tail}') from None
  except ValueError as e:
    raise error(f'{what} {path} is not valid JSON ({e}){tail}') from None
  if object_only and not isinstance(value, dict):
    raise error(f'{what} {path} is not a JSON object{tail}')
  return value


def _set_default_mode(path: str) -> None:
  # mkstemp makes 0600; give the file the permissions open() would under the current umask.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def _fsync_dir(directory: str) -> None:
  # The rename is durable only once the directory entry is on disk.
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)

"""Advisory file locks that give a token store, and each of its chunks, one owner at a time.

A lock is an exclusive `flock` on a small file; the kernel releases it when its owner ends,
even by SIGKILL, so a lock is never stale. The owner removes the file as it releases the
lock, so a finished store holds no lock files. That removal is safe because a process that
wins the lock re-checks that the path still names the file it locked (else it locked a
removed file, owns nothing, and tries again): the usual flock-and-unlink protocol.

The file holds `pid N on HOST since TIME` of its owner, for the message of whoever waits.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
from typing import Callable

from moejax.errors import DataError


class Lock:
  """A held lock; `release()` removes its file and lets the next owner in."""

  def __init__(self, f, path: str):
    self._f, self.path = f, path

  def release(self) -> None:
    if self._f is None:
      return
    with contextlib.suppress(OSError):
      os.remove(self.path)  # (while still held: no one else owns this file)
    self._f.close()
    self._f = None

  def __enter__(self) -> 'Lock':
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _same_file(f, path: str) -> bool:
  try:
    return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
  except FileNotFoundError:
    return False


def acquire(path: str, wait: bool = True, on_wait: Callable[[str], None] | None = None,
            make_parent: bool = False) -> Lock | None:
  """The lock at `path`: waits for it (calling `on_wait(holder)` once), or with `wait=False` returns None if held."""
  told = False
  while True:
    try:
      if make_parent:
        os.makedirs(os.path.dirname(path), exist_ok=True)
      f = open(path, 'a+')
    except OSError as e:
      raise DataError(f'cannot create the lock {path}: {e.strerror or e}') from None
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      if not wait:
        f.close()
        return None
      if on_wait is not None and not told:
        f.seek(0)
        on_wait(f.read().strip() or 'another process')
        told = True
      try:
        fcntl.flock(f, fcntl.LOCK_EX)  # (a signal handler that raises ends the wait)
      except BaseException:
        f.close()
        raise
    if _same_file(f, path):
      with contextlib.suppress(OSError):  # who holds it is only for messages
        f.seek(0)
        f.truncate()
        f.write(f'pid {os.getpid()} on {socket.gethostname()} since '
                f'{datetime.datetime.now().isoformat(timespec="seconds")}\n')
        f.flush()
      return Lock(f, path)
    f.close()

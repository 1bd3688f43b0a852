"""Running a preparation's chunk jobs in worker processes, and stopping them cleanly.

A `concurrent.futures` process pool (spawn) rather than `multiprocessing.Pool`: a worker that
dies (SIGKILL, the OOM killer) breaks the pool with an error instead of hanging it forever.

Stopping: Ctrl-C reaches the whole foreground process group, so workers ignore SIGINT and the
driver alone decides (they are started with SIGINT ignored, which a spawned interpreter keeps).
The driver, stopped by any exception (Ctrl-C, SIGTERM's handler, a worker's error), sends the
workers SIGTERM and waits for them (SIGKILL after `STOP_GRACE_S`): a worker's SIGTERM handler
removes the temporary files of the chunk it is writing and exits at once (the driver removes
what a killed worker left). Nothing is left to write to a closed pipe, so no BrokenPipe
tracebacks, and the pool's queues are closed before the interpreter exits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence

from moejax.errors import DataError

STOP_GRACE_S = 5.0  # a stopped worker that has not ended after this is killed
# Temporary files the chunk being written in this process has open (removed on SIGTERM in a worker).
OPEN_TEMPS: set[str] = set()


@contextlib.contextmanager
def temp_registered(path: str):
  """Marks `path` as a temporary file of this process for as long as the block runs."""
  OPEN_TEMPS.add(path)
  try:
    yield path
  finally:
    OPEN_TEMPS.discard(path)


def _worker_sigterm(signum, frame):
  del frame
  for path in list(OPEN_TEMPS):
    with contextlib.suppress(OSError):
      os.remove(path)
  os._exit(128 + signum)  # pylint: disable=protected-access  (no exception: the pool would send it back as a result)


def _worker_init() -> None:
  os.environ['RAYON_NUM_THREADS'] = '1'  # one process per core: the tokenizers' own threads would oversubscribe
  logging.basicConfig(level=logging.WARNING)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, _worker_sigterm)


@contextlib.contextmanager
def _sigint_ignored():
  """SIGINT ignored while workers are spawned (they inherit it and stay immune to the group's Ctrl-C)."""
  try:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  except ValueError:  # not the main thread: nothing to do
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


def _stop(executor: futures.ProcessPoolExecutor) -> None:
  """Ends every worker (SIGTERM, then SIGKILL after a grace period), then the pool.

  The SIGKILL matters: a worker killed while it held the result queue's write lock (a
  worker that had just sent a result) leaves the others blocked on that lock for ever, and
  the pool's own shutdown waits for every worker to end.
  """
  processes = list((getattr(executor, '_processes', None) or {}).values())  # (3.11 has no terminate_workers())
  for p in processes:
    with contextlib.suppress(Exception):
      p.terminate()
  for p in processes:
    with contextlib.suppress(Exception):
      p.join(STOP_GRACE_S)
      if p.is_alive():
        p.kill()
        p.join()
  executor.shutdown(wait=True, cancel_futures=True)


def run(fn: Callable, args: Sequence[tuple], workers: int, on_result: Callable[[tuple, object], None]) -> None:
  """Calls `fn(*a)` for every `a` in `args` (in `workers` processes when > 1); `on_result(a, result)` in the caller."""
  if workers <= 1 or len(args) <= 1:
    for a in args:
      on_result(a, fn(*a))
    return
  executor = futures.ProcessPoolExecutor(min(workers, len(args)), mp_context=multiprocessing.get_context('spawn'),
                                         initializer=_worker_init)
  try:
    with _sigint_ignored():
      pending = {executor.submit(fn, *a): a for a in args}
    for future in futures.as_completed(pending):
      on_result(pending[future], future.result())
  except BrokenProcessPool:
    _stop(executor)
    raise DataError('a preparation worker process died (killed, or out of memory?); finished chunks are kept: '
                    'rerun the same command to resume') from None
  except BaseException:
    _stop(executor)
    raise
  executor.shutdown(wait=True)

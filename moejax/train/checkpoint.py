"""Orbax checkpoints of the train state plus a JSON record (step, data-iterator state, config).

Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-save never replaces the previous checkpoint. On restore, a step that cannot be
read (corrupt or truncated files) is moved aside to `<directory>-unreadable/<step>` (never
deleted) with one warning line, and the next older one is used; the run then retrains
from there and saves that step again. A save that fails (disk full, permissions) raises
`CheckpointError` naming the directory and the cause, after removing Orbax's temporary
folder; the previous checkpoints are untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from moejax.errors import CheckpointError
from moejax.model import stack

log = logging.getLogger(__name__)

_TMP_MARK = '.orbax-checkpoint-tmp'


def _cause(e: BaseException) -> str:
  """The innermost error's gist: what went wrong, without Orbax's and tensorstore's wrapping."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  if isinstance(e, OSError) and e.strerror:
    return f'{e.strerror} ({e.filename})' if e.filename else e.strerror
  text = str(e).strip()
  code = re.search(r"os_error_code='?(\d+)", text)  # tensorstore wraps OS errors in long ValueErrors
  if code:
    return os.strerror(int(code.group(1)))
  text = text.splitlines()[0][:200] if text else ''
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _free_bytes(directory: str) -> int | None:
  if '://' in directory:
    return None
  with contextlib.suppress(OSError):
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
  return None


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """Orbax logs every failed write (with tracebacks) before raising; we report the failure in one line."""
  loggers = [logging.getLogger(n) for n in ('absl', 'orbax', 'orbax.checkpoint', 'asyncio')]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _kept(steps: list[int]) -> str:
  return 'steps ' + ', '.join(map(str, steps)) if steps else 'no earlier checkpoint'


class Checkpointer:
  """Saves and restores {'state': pytree, 'meta': json dict} under `directory`."""

  def __init__(self, directory: str, max_to_keep: int = 2, use_async: bool = True, keep_every_steps: int | None = None,
               spans=None):
    # spans (`model.stack.storage_spans(cfg)`): the states given and returned hold a scanned model's stacked
    # layers; on disk they are per layer (`stack.to_layers`), so a checkpoint restores across `model.scan_layers`.
    # The conversions run under jit (eager slicing refuses arrays that span processes), compiled once per shape.
    self.spans = spans
    self._jits = {}  # one compiled split or stack per stacked leaf's shape, dtype, sharding and row count
    # grain (the data pipeline) imports attrs lazily; imported for the first time while orbax's background
    # threads run, CPython's import lock can fail (KeyError in _ModuleLock, seen once in the test suite). Import
    # it before orbax starts any thread.
    import grain  # pylint: disable=import-outside-toplevel,unused-import
    # Orbax requires absolute local paths; remote ones (gs://...) pass through.
    self.directory = epath.Path(directory if '://' in directory else os.path.abspath(directory))
    # keep_every_steps (routing analysis, moejax.routes): the latest max_to_keep, plus every multiple of n.
    keep = {'max_to_keep': max_to_keep} if not keep_every_steps else {
        'preservation_policy': ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(max_to_keep), ocp.checkpoint_managers.EveryNSteps(keep_every_steps)])}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=use_async, create=True, **keep)
    try:
      with _quiet_orbax():
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise CheckpointError(f'cannot open checkpoint directory {self.directory}: {_cause(e)}') from None
    self._saving: int | None = None

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving (asynchronously when enabled); `wait` blocks until it is on disk."""
    self._finish()  # a failure of the previous async save surfaces here, before anything new is written
    made = []  # per-layer copies of a scanned model's stacked leaves (nothing else is copied), freed once Orbax has
    if self.spans:  # them on the host (its save returns then; its writer thread would keep them on the device)
      state = stack.to_layers(state, self.spans, split=lambda x, r: self._split(x, r, made))
    # Check the space first: a write that fails midway makes tensorstore print a traceback per
    # pending write (the arrays' raw size bounds the zstd-compressed checkpoint from above).
    needed = sum(x.nbytes for x in jax.tree.leaves(state)) + (1 << 20)
    free = _free_bytes(str(self.directory))
    if free is not None and free < needed:
      raise CheckpointError(f'saving checkpoint step {step} in {self.directory} failed: No space left on device '
                            f'(needs up to {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free); '
                            f'kept {_kept(self.steps())}')
    self._saving = step
    with self._guard():
      self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    for x in made:
      x.delete()

  @contextlib.contextmanager
  def _guard(self) -> Iterator[None]:
    try:
      with _quiet_orbax():
        yield
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
      step, self._saving = self._saving, None
      self._remove_temporaries()
      logging.getLogger('asyncio').setLevel(logging.CRITICAL)  # its futures of the failed writes are garbage now
      raise CheckpointError(f'saving checkpoint step {step} in {self.directory} failed: {_cause(e)}; '
                            f'kept {_kept(self.steps())}') from None

  def _finish(self) -> None:
    if self._saving is not None:
      with self._guard():
        self._mngr.wait_until_finished()
      self._saving = None

  def _remove_temporaries(self) -> None:
    """Deletes Orbax's half-written temporary step folders (never a finished step)."""
    if jax.process_index() != 0 or '://' in str(self.directory):
      return
    with contextlib.suppress(OSError):
      for name in os.listdir(self.directory):
        if _TMP_MARK in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def steps(self) -> list[int]:
    """The finished steps on disk, oldest first."""
    with contextlib.suppress(Exception):
      self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def _move_aside(self, step: int) -> str:
    """Renames an unreadable step folder to `<directory>-unreadable/<step>[-<time>]`; returns the new path."""
    aside = f'{self.directory}-unreadable'
    target = os.path.join(aside, str(step))
    if jax.process_index() == 0:
      try:
        os.makedirs(aside, exist_ok=True)
        if os.path.exists(target):
          target = f'{target}-{time.strftime("%Y%m%d-%H%M%S")}'
        os.replace(os.path.join(str(self.directory), str(step)), target)
      except OSError as e:
        raise CheckpointError(f'cannot move unreadable checkpoint step {step} to {aside}: {e.strerror or e}') from None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f'moejax_move_aside_{step}')
    self._mngr.reload()
    return target

  def restore_latest(self, abstract_state: Any, move_aside: bool = True) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest readable checkpoint, or None when there is none.

    An unreadable newer step is moved aside (`move_aside=True`, what training does, so its
    step can be saved again) or skipped (False, what evaluation does).
    """
    failed = []
    for step in reversed(self.steps()):
      try:
        with _quiet_orbax():
          restored = self._mngr.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(stack.to_layers(abstract_state, self.spans)),
              meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types for damaged files)
        log.warning('checkpoint step %d is unreadable (%s); trying an older one', step, _cause(e))
        failed.append((step, _cause(e)))
        continue
      # Only once an older step restored are the newer ones known to be damaged rather than
      # unreadable for another reason (a shape change, no memory): then they move aside.
      if move_aside and failed and '://' not in str(self.directory):
        for bad, _ in failed:
          log.warning('moved unreadable checkpoint step %d to %s', bad, self._move_aside(bad))
      return step, self._stacked(restored['state']), restored['meta']
    if failed:
      raise CheckpointError(f'no readable checkpoint in {self.directory} (left in place): step {failed[0][0]}: '
                            f'{failed[0][1]}')
    return None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) of one kept step (routing analysis reads every kept step); CheckpointError if unreadable."""
    try:
      with _quiet_orbax():
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(stack.to_layers(abstract_state, self.spans)), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types for damaged files)
      raise CheckpointError(f'checkpoint step {step} in {self.directory} is unreadable: {_cause(e)}') from None
    return self._stacked(restored['state']), restored['meta']

  def _stacked(self, state: Any) -> Any:
    """A restored per-layer state in the stacked layout: each stacked leaf built from its rows,
    which are deleted at once, so the device holds one state plus one leaf, never two states."""
    if not self.spans:
      return state
    return stack.to_stacked(state, self.spans, stack=self._stack)

  def _split(self, x: jax.Array, r: int, made: list) -> list:
    """The r rows of a stacked leaf, one jit per kind of leaf (eager slicing refuses arrays spanning processes)."""
    key = ('split', x.shape, x.dtype, x.sharding, r)
    if key not in self._jits:
      self._jits[key] = jax.jit(lambda a: tuple(a[q] for q in range(r)),
                                out_shardings=(stack.row_sharding(x.sharding),) * r)
    rows = list(self._jits[key](x))
    made.extend(rows)
    return rows

  def _stack(self, rows: tuple) -> jax.Array:
    first = rows[0]
    key = ('stack', first.shape, first.dtype, first.sharding, len(rows))
    if key not in self._jits:
      self._jits[key] = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=stack.stacked_sharding(first.sharding))
    out = self._jits[key](*rows)
    for x in rows:
      x.delete()
    return out

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises CheckpointError if it failed."""
    self._finish()

  def close(self) -> None:
    """Waits for the last save, then releases Orbax's threads (also after a failure)."""
    try:
      self._finish()
    finally:
      with contextlib.suppress(Exception), _quiet_orbax():
        self._mngr.close()


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)

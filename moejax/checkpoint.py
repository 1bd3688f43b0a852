"""Orbax checkpoints of the train state plus a JSON record (step, data-iterator state, config).

Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-save never replaces the previous checkpoint. On restore, a latest step that
cannot be read (corrupt or truncated files) is reported and the next older one is used.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from moejax.errors import CheckpointError

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores {'state': pytree, 'meta': json dict} under `directory`."""

  def __init__(self, directory: str, max_to_keep: int = 2, use_async: bool = True):
    # Orbax requires absolute local paths; remote ones (gs://...) pass through.
    self.directory = epath.Path(directory if '://' in directory else os.path.abspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=use_async,
                                           create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts saving (asynchronously when enabled); `wait` blocks until it is on disk."""
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                    force=True)

  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest readable checkpoint, or None when there is none."""
    steps = self.steps()
    errors = []
    for step in reversed(steps):
      try:
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        if errors:
          log.warning('restored older checkpoint step %d; newer ones unreadable: %s', step, '; '.join(errors))
        return step, restored['state'], restored['meta']
      except Exception as e:  # orbax/tensorstore raise many error types for damaged files
        errors.append(f'step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}')
    if errors:
      raise CheckpointError(f'no readable checkpoint in {self.directory}: {errors[0]}')
    return None

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)

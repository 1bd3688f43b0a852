"""Checkpoints: unreadable steps are moved aside (never deleted), failed saves are one clear error."""

import errno
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moejax import checkpoint
from moejax.errors import CheckpointError

STATE = {'w': jnp.arange(6, dtype=jnp.float32), 'step': jnp.int32(0)}


def _corrupt(step_dir):
  for dirpath, _, files in os.walk(step_dir):
    for f in files:
      with open(os.path.join(dirpath, f), 'wb') as fh:
        fh.write(b'garbage')


def _saved(directory, steps=(1, 2)):
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=3, use_async=False)
  for s in steps:
    ckpt.save(s, dict(STATE, step=jnp.int32(s)), {'step': s})
  ckpt.wait()
  return ckpt


def test_unreadable_newest_step_is_moved_aside_and_can_be_saved_again(tmp_path, caplog):
  ckpt = _saved(tmp_path / 'checkpoints')
  _corrupt(tmp_path / 'checkpoints' / '2' / 'state')
  step, state, meta = ckpt.restore_latest(checkpoint.abstract(STATE))
  assert step == 1 and meta == {'step': 1} and int(state['step']) == 1
  assert (tmp_path / 'checkpoints-unreadable' / '2').is_dir()  # renamed, not deleted
  assert ckpt.steps() == [1]
  assert sum('moved it to' in r.getMessage() for r in caplog.records) == 1
  ckpt.save(2, dict(STATE, step=jnp.int32(2)), {'step': 2})  # before the fix: StepAlreadyExistsError
  ckpt.wait()
  assert ckpt.steps() == [1, 2]
  ckpt.close()


def test_eval_restore_skips_but_keeps_an_unreadable_step(tmp_path):
  ckpt = _saved(tmp_path / 'checkpoints')
  _corrupt(tmp_path / 'checkpoints' / '2' / 'state')
  assert ckpt.restore_latest(checkpoint.abstract(STATE), move_aside=False)[0] == 1
  assert ckpt.steps() == [1, 2] and not (tmp_path / 'checkpoints-unreadable').exists()
  ckpt.close()


def test_no_readable_step_is_one_error(tmp_path):
  ckpt = _saved(tmp_path / 'checkpoints', steps=(1,))
  _corrupt(tmp_path / 'checkpoints' / '1' / 'state')
  with pytest.raises(CheckpointError, match='no readable checkpoint'):
    ckpt.restore_latest(checkpoint.abstract(STATE))
  ckpt.close()


@pytest.mark.parametrize('use_async', [False, True])
def test_failed_save_is_one_error_and_keeps_the_previous_step(tmp_path, monkeypatch, use_async):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), use_async=use_async)
  ckpt.save(1, STATE, {'step': 1})
  ckpt.wait()
  real_save = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    os.makedirs(os.path.join(str(self.directory), f'{step}.orbax-checkpoint-tmp-123'))  # what orbax leaves behind
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))

  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk)
  with pytest.raises(CheckpointError) as info:
    ckpt.save(2, STATE, {'step': 2})
  message = str(info.value)
  assert 'saving checkpoint step 2' in message and str(tmp_path / 'checkpoints') in message
  assert 'No space left on device' in message and 'kept steps 1' in message
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']  # no temporary folder left
  monkeypatch.setattr(ocp.CheckpointManager, 'save', real_save)
  ckpt.close()
  fresh = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  step, state, _ = fresh.restore_latest(checkpoint.abstract(STATE))
  assert step == 1 and np.array_equal(state['w'], STATE['w'])
  fresh.close()

"""Checkpoints: unreadable steps are moved aside (never deleted), failed saves are one clear error."""

import errno
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moejax.train import checkpoint
from moejax.train import loop as loop_lib
from moejax.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  assert sum('moved unreadable checkpoint step 2' in r.getMessage() for r in caplog.records) == 1
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
  with pytest.raises(CheckpointError, match=r'no readable checkpoint .* \(left in place\)'):
    ckpt.restore_latest(checkpoint.abstract(STATE))
  assert ckpt.steps() == [1] and not (tmp_path / 'checkpoints-unreadable').exists()
  ckpt.close()


def test_a_step_that_fails_for_another_reason_is_never_moved(tmp_path):
  # A restore target of another shape (a changed config) fails on every step: none is damaged.
  ckpt = _saved(tmp_path / 'checkpoints')
  with pytest.raises(CheckpointError, match='no readable checkpoint'):
    ckpt.restore_latest(checkpoint.abstract(dict(STATE, w=jnp.zeros(7))))
  assert ckpt.steps() == [1, 2] and not (tmp_path / 'checkpoints-unreadable').exists()
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



def test_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tiny_cfg, corpus_glob, small_disk):
  workdir = small_disk / 'run'
  loop_lib.run(tiny_cfg, str(workdir), stop_after=3)
  free = os.statvfs(small_disk)
  with open(small_disk / 'ballast', 'wb') as f:  # leave 48 KB: enough for logs, not for a checkpoint
    f.write(b'\0' * (free.f_bavail * free.f_frsize - 48 * 1024))
  out = subprocess.run([sys.executable, '-m', 'moejax.main', f'--config=tests/testdata/tiny.py:{corpus_glob}',
                        f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True, timeout=180)
  errors = [l for l in out.stderr.splitlines() if 'Traceback' in l or 'error' in l.lower()]
  assert out.returncode == 1, out.stderr
  assert len(errors) == 1 and errors[0].startswith('moejax: error: saving checkpoint step 6 in '), out.stderr
  assert 'No space left on device' in errors[0] and 'kept steps 3' in errors[0]
  assert os.listdir(workdir / 'checkpoints') == ['3']  # no temporary folder, the last good step intact
  os.remove(small_disk / 'ballast')
  assert loop_lib.run(tiny_cfg, str(workdir))['steps'] == 6  # resumes from step 3 and finishes

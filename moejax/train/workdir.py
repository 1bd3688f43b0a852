"""A run's workdir: writable, owned by one run at a time, and bound to one configuration.

Files (see docs/reliability.md):
  config.json       the resolved config the workdir trains (written before step 0)
  provenance.json   {'config_hash', 'created', 'changes': [...]}: the hash the workdir was
                    started with and every deliberate configuration change since
  .lock             an advisory `flock` held by the run that owns the workdir (released by
                    the kernel when that process ends, even on SIGKILL)

A rerun, or `--mode=eval`, with a configuration that differs from config.json in any key
outside `config.RUN_NEUTRAL_KEYS` is refused with one line naming the differing keys, unless the caller
passes `allow_change=True` (`--allow_config_change`); the change is then recorded in
provenance.json and, through `changes()`, in result.json. A workdir that holds no
checkpoint and no result has trained nothing, so a new configuration simply claims it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Any, Iterator

from moejax import files
from moejax import config as config_lib
from moejax.errors import ConfigMismatch, WorkdirBusy, WorkdirError

def _flat(cfg) -> dict[str, Any]:
  return config_lib.flatten(json.loads(cfg.to_json_best_effort()))


def config_hash(flat: dict[str, Any]) -> str:
  """The workdir's binding hash: `config.config_hash` without the run-neutral keys (12 hex digits)."""
  return config_lib.config_hash(flat)


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list]:
  """{key: [old, new]} for the keys outside `config.RUN_NEUTRAL_KEYS` both configs have and that differ.

  Keys present on one side only (added to moejax after the workdir was started) are not compared.
  """
  same = lambda a, b: json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
  return {k: [old[k], new[k]] for k in sorted(set(old) & set(new)) if not config_lib.key_in(k, config_lib.RUN_NEUTRAL_KEYS) and not same(old[k], new[k])}


def prepare(workdir: str, index: int = 0) -> None:
  """Creates `workdir` and proves it writable; raises WorkdirError with one line otherwise."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_probe.{index}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'workdir {workdir!r} is not writable: {e.strerror or e}') from None


@contextlib.contextmanager
def lock(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds WORKDIR/.lock for the duration; raises WorkdirBusy when another live process holds it."""
  if not enabled:
    yield
    return
  path = os.path.join(workdir, '.lock')
  try:
    f = open(path, 'a+')
  except OSError as e:
    raise WorkdirError(f'cannot create the lock {path}: {e.strerror or e}') from None
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise WorkdirBusy(f'workdir {workdir} is in use by {holder}; wait for it, stop it, or use another --workdir'
                        ) from None
    try:
      f.seek(0)
      f.truncate()
      f.write(f'pid {os.getpid()} on {socket.gethostname()} since {_now()}\n')
      f.flush()
    except OSError as e:
      raise WorkdirError(f'cannot write the lock {path}: {e.strerror or e}') from None
    yield
  finally:
    f.close()  # closing releases the flock


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec='seconds')


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  return files.read_json(path, 'workdir file', WorkdirError, hint='move it away or use another --workdir')


def has_trained(workdir: str) -> bool:
  """Whether the workdir holds a checkpoint or a result (so its configuration is bound)."""
  return os.path.exists(os.path.join(workdir, 'result.json')) or last_step(workdir) is not None


def last_step(workdir: str) -> int | None:
  """The newest finished checkpoint step on disk, or None."""
  ckpts = os.path.join(workdir, 'checkpoints')
  steps = [int(n) for n in os.listdir(ckpts) if n.isdigit()] if os.path.isdir(ckpts) else []
  return max(steps) if steps else None


def bind(workdir: str, cfg, mode: str = 'train', allow_change: bool = False, write: bool = True) -> list[dict]:
  """Checks `cfg` against the configuration the workdir was started with; returns the change history.

  Fresh (or untrained) workdir: records cfg (config.json, provenance.json). Same configuration:
  nothing to do. Another configuration: ConfigMismatch naming the keys, or with `allow_change`
  a recorded change. `write=False` (non-leader processes) checks without writing.
  """
  flat = _flat(cfg)
  config_path, prov_path = os.path.join(workdir, 'config.json'), os.path.join(workdir, 'provenance.json')
  stored = _read_json(config_path)
  provenance = _read_json(prov_path) or {}
  if stored is None or not has_trained(workdir):
    if mode == 'eval':
      return provenance.get('changes', [])  # eval on an empty workdir fails later with "no checkpoint"
    provenance = {'config_hash': config_hash(flat), 'created': _now(), 'changes': []}
  else:
    diff = differences(config_lib.flatten(stored), flat)
    if not diff:
      return provenance.get('changes', [])
    shown = ', '.join(f'{k} ({json.dumps(a, default=str)} -> {json.dumps(b, default=str)})'
                      for k, (a, b) in list(diff.items())[:6]) + (f' and {len(diff) - 6} more' if len(diff) > 6 else '')
    if not allow_change:
      raise ConfigMismatch(f'workdir {workdir} was started with another configuration: {shown}; use another '
                           '--workdir, or pass --allow_config_change to change it deliberately (recorded in result.json)')
    provenance.setdefault('config_hash', config_hash(config_lib.flatten(stored)))
    provenance.setdefault('changes', []).append({'time': _now(), 'mode': mode, 'at_step': last_step(workdir),
                                                 'new_config_hash': config_hash(flat), 'keys': diff})
  if write:
    try:
      if mode != 'eval':  # a rescoring changes no trained weights: config.json stays what was trained
        files.atomic_write(config_path, cfg.to_json_best_effort(indent=2))
      files.atomic_write(prov_path, json.dumps(provenance, indent=2, default=str) + '\n')
    except OSError as e:
      raise WorkdirError(f'cannot record the configuration in {workdir}: {e.strerror or e}') from None
  return provenance['changes']

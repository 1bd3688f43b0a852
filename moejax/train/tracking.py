"""Optional experiment tracking with Weights & Biases (the `wandb` config section; off by default).

With `wandb.mode` 'offline' or 'online', `run.execute` opens one W&B run per workdir on the
leader process: the resolved config (flattened, `model.model_dim`) at the start, every
metrics.jsonl row as it is written (`moejax/train/metrics.py`), the final held-out score as a
last history row, and result.json (without its config) as the run summary at the end. Every
row carries its training `step`, made the x-axis of every chart (W&B's own `_step` only
counts rows and must grow), so decay-branch scores logged ahead of the main run (at the
step their branch ends) and the steps a resumed run repeats are all kept. The run id is kept in WORKDIR/wandb_run.json, so a resumed workdir resumes
the same W&B run. metrics.jsonl stays the record of truth: a tracking failure after the start
is a warning, never a lost training run. wandb is imported only when a run is tracked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import string
from typing import Any, Iterator

from moejax import config as config_lib, files
from moejax.errors import ConfigError, WorkdirError
from moejax.train import metrics as metrics_lib

log = logging.getLogger(__name__)

RUN_FILE = 'wandb_run.json'  # WORKDIR/wandb_run.json: {'id': the W&B run id}


def enabled(cfg) -> bool:
  """Whether `cfg` asks for a tracked run."""
  return cfg.wandb.mode != 'disabled'


def check_installed(cfg) -> None:
  """Raises ConfigError (one line) when `cfg` asks for tracking and wandb cannot be imported (before jax loads)."""
  if not enabled(cfg):
    return
  try:
    import wandb  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
  except ImportError as e:
    raise ConfigError(f"wandb.mode={cfg.wandb.mode!r} needs the wandb package, which cannot be imported "
                      f"({' '.join(str(e).split())}): pip install 'moejax[wandb]', or set "
                      "--config.wandb.mode=disabled") from None


def run_id(workdir: str) -> str:
  """The workdir's W&B run id: the one WORKDIR/wandb_run.json keeps, else a new one, written before use."""
  path = os.path.join(workdir, RUN_FILE)
  if os.path.exists(path):
    stored = files.read_json(path, 'W&B run file', WorkdirError, hint='move it away to start a new W&B run')
    if isinstance(stored.get('id'), str) and stored['id']:
      return stored['id']
  new = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
  try:
    files.atomic_write_json(path, {'id': new})
  except OSError as e:
    raise WorkdirError(f'cannot record the W&B run id in {path}: {e.strerror or e}') from None
  return new


class Tracker:
  """One W&B run: `log` metrics rows, `result` the result record, `finish` (with a failure's exit code)."""

  def __init__(self, cfg, workdir: str):
    import wandb  # pylint: disable=import-outside-toplevel  (the optional extra: only tracked runs load it)
    w = cfg.wandb
    flat = config_lib.flatten(json.loads(cfg.to_json_best_effort()))
    identity = run_id(workdir)
    try:
      self.run = wandb.init(
          project=w.project, entity=w.entity or None, name=w.name or cfg.name, group=w.group or None,
          tags=[t.strip() for t in w.tags.split(',') if t.strip()], dir=w.dir or workdir, mode=w.mode,
          id=identity, resume='allow', config=flat, settings=wandb.Settings(quiet=True))
      self.run.define_metric('step')
      self.run.define_metric('*', step_metric='step')
    except Exception as e:  # pylint: disable=broad-except  (wandb raises its own classes: no login, no network)
      raise ConfigError(f"wandb.init failed (wandb.mode={w.mode!r}): {' '.join(str(e).split()).rstrip('.')}; or set "
                        '--config.wandb.mode=offline (and `wandb sync` the run later)') from None
    self._failed = self._finished = False
    log.info('tracking with W&B (%s): run %s in project %s, files under %s', w.mode, self.run.id, w.project,
             w.dir or workdir)

  def _guard(self, what: str, fn, *args, **kwargs) -> None:
    if self._failed:
      return
    try:
      fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  (metrics.jsonl has the row; training goes on)
      self._failed = True
      log.warning('W&B %s failed (%s); tracking stops, metrics.jsonl keeps every row', what, e)

  def log(self, step: int, record: dict[str, Any]) -> None:
    """Logs one metrics row (its finite numbers) at training step `step`."""
    self._guard('log', self.run.log, {'step': step, **dict(metrics_lib.scalar_items(record))})

  def result(self, record: dict) -> None:
    """Logs result.json's final held-out score as a history row and the record (less its config) as the summary."""
    final = {'eval_loss': record['eval']['loss'], 'eval_bits_per_byte': record['eval']['bits_per_byte'],
             'tokens': record['train']['tokens']}
    self.log(record['train']['steps'], final)
    self._guard('summary', self.run.summary.update, {k: v for k, v in record.items() if k != 'config'})

  def finish(self, exit_code: int = 0) -> None:
    """Closes the run (once); a non-zero exit code marks it failed in W&B."""
    if not self._finished:
      self._finished = True
      with contextlib.suppress(Exception):
        self.run.finish(exit_code=exit_code)


@contextlib.contextmanager
def start(cfg, workdir: str, leader: bool = True) -> Iterator[Tracker | None]:
  """Yields the run's Tracker (None when untracked or off the leader) and finishes it, with the failure's exit code
  when the block raises (a preempted run shows as failed until its resume finishes it)."""
  if not (leader and enabled(cfg)):
    yield None
    return
  tracker = Tracker(cfg, workdir)
  try:
    yield tracker
  except BaseException as e:
    tracker.finish(exit_code=getattr(e, 'exit_code', 1))
    raise
  tracker.finish()

"""The training loop around the train step.

The loop resumes from the latest checkpoint (state, step and data-iterator position),
saves every `checkpoint.every_steps` and at the end, turns SIGTERM into a saved
checkpoint plus `Preempted`, and stops with `NonFiniteLossError` on a NaN/inf loss
without ever saving the bad state. With `optim.decay_branches` it also runs the WSD decay
branches (`moejax/train/optim.py`): at a branch's decay start it copies the state, decays it on the
batches the main run is about to see (the data iterator is rewound afterwards), scores the
held-out set and drops the copy, so one run gives the loss of several run lengths.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax import data, files
from moejax.errors import CheckpointError, DataError, Interrupted, NonFiniteLossError, Preempted
from moejax.parallel import distributed
from moejax.parallel import mesh as mesh_lib
from moejax.train import checkpoint, evaluate as eval_lib, metrics as metrics_lib, optim, record
from moejax.model import stack
from moejax.train import workdir as workdir_lib
from moejax.train.state import Setup, setup
from moejax.train.step import cached_train_step

log = logging.getLogger(__name__)


class _StopSignals:
  """Records SIGTERM and Ctrl-C instead of dying mid-step; restores the previous handlers on exit.

  The loop saves a checkpoint and stops at the next step boundary. A second Ctrl-C aborts at
  once (KeyboardInterrupt), for a user who does not want to wait for the save.
  """

  def __init__(self):
    self.signum: int | None = None

  def __enter__(self):
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signum is None:
      self.signum = signum
      if signum == signal.SIGINT:
        log.warning('Ctrl-C: saving a checkpoint at the end of this step (press Ctrl-C again to abort at once)')

  @property
  def raised(self) -> bool:
    return self.signum is not None

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def _check_finite(step: int, out: dict[str, jax.Array]) -> None:
  """Stops on a non-finite loss or gradient norm (a finite loss with an infinite gradient still makes NaN params)."""
  loss, grad_norm = (float(v) for v in jax.device_get((out['loss'], out['grad_norm'])))
  if not (np.isfinite(loss) and np.isfinite(grad_norm)):
    what = f'loss is {loss}' if not np.isfinite(loss) else f'gradient norm is {grad_norm}'
    raise NonFiniteLossError(f'{what} at step {step}; stopped without saving this state '
                             '(the last good checkpoint is kept; lower optim.peak_learning_rate?)')


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _duration(seconds: float) -> str:
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm.format_interval(seconds)


def run(cfg, workdir: str, stop_after: int | None = None, built: Setup | None = None, tracker=None) -> dict:
  """Trains `cfg` in `workdir` (resuming if possible); returns {'steps', 'tokens', 'wall_s', 'setup'}.

  `stop_after` stops (with a checkpoint) after that many total steps, as a preemption would.
  With `eval.every_steps`, the held-out loss is also scored every that many steps and
  written to the metrics (`eval_loss`, `eval_bits_per_byte`): the run's learning curve.
  `tracker` (`moejax/train/tracking.py`) also gets every metrics row.
  """
  workdir_lib.prepare(workdir, jax.process_index())
  s = built or setup(cfg)
  t_cfg = cfg.train
  batch_sharding = mesh_lib.batch_sharding(s.mesh, 2)
  dataset = data.train_dataset(s.corpus, cfg.data.seq_len, t_cfg.batch_size, cfg.data.seed,
                               mesh_lib.process_rows(batch_sharding, t_cfg.batch_size), cfg.data.read_threads,
                               cfg.data.prefetch_batches)
  data_iter = iter(dataset)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.checkpoint.max_to_keep,
                                 cfg.checkpoint.use_async, cfg.checkpoint.keep_every_steps, stack.storage_spans(cfg))
  loop = None
  try:
    state, wall_before, branches_done, routing_window = s.state, 0.0, [], None
    target = checkpoint.abstract(state)
    if ckpt.steps():  # the fresh state is dropped before a checkpoint loads: one state on the device, not two
      state = s.state = None
    restored = ckpt.restore_latest(target)
    if restored is None and state is None:  # the checkpoints listed a moment ago are gone (another process?)
      raise CheckpointError(f'the checkpoints in {workdir}/checkpoints disappeared while the run started; rerun')
    if restored is None and cfg.train.init_from:  # upcycling: a dense run's weights, only ever at step 0
      from moejax.train import upcycle  # pylint: disable=import-outside-toplevel
      state = upcycle.initialize(cfg, state, workdir)
    if restored is not None:
      step0, state, meta = restored
      if meta.get('imported'):  # weights from moejax.import_hf: no data read yet, so the data order starts fresh
        log.info('starting from the imported checkpoint (step %d): %s', step0, meta['imported'])
      elif meta.get('data_fingerprint') != s.corpus.fingerprint:
        raise DataError(f'checkpoint in {workdir} was trained on corpus {str(meta.get("data_fingerprint"))[:12]}, '
                        f'but data.source now gives {s.corpus.fingerprint[:12]}')
      else:
        data_iter.set_state(meta['data_iterator'])
      wall_before = meta['wall_s']
      branches_done = meta.get('branches_done', [])
      routing_window = meta.get('routing_window')
      log.info('resumed from step %d', step0)
    elif distributed.is_leader() and not os.path.exists(os.path.join(workdir, 'config.json')):
      files.atomic_write(os.path.join(workdir, 'config.json'), cfg.to_json_best_effort(indent=2))
    s.state = state  # (the train step takes its state shardings from s.state: the restored state's on a resume)
    loop = _Loop(cfg, s, workdir, ckpt, data_iter, batch_sharding, state, wall_before, restored is not None,
                 branches_done, tracker)
    end = t_cfg.steps if stop_after is None else min(stop_after, t_cfg.steps)
    loop.routing.restore(routing_window)
    loop.train_until(end)
  finally:
    if loop is not None:
      loop.close()  # (closes the checkpointer too)
    else:
      ckpt.close()
  s.state = loop.state
  return {'steps': loop.step, 'tokens': loop.step * loop.tokens_per_step,
          'wall_s': wall_before + time.time() - loop.t_start, 'setup': s, 'routing': loop.routing.summary()}


class _Loop:
  """The state of one training loop: steps, saves, signals, logging and periodic held-out scores."""

  def __init__(self, cfg, s: Setup, workdir, ckpt, data_iter, batch_sharding, state, wall_before, resumed,
               branches_done=(), tracker=None):
    self.cfg, self.s, self.workdir, self.ckpt, self.data_iter = cfg, s, workdir, ckpt, data_iter
    self.lrs = optim.learning_rates(cfg.optim, cfg.train.steps)
    self.branches: dict[int, list[int]] = {}  # decay start -> ends of the branches leaving the stable phase there
    for end in optim.branch_ends(cfg.optim, cfg.train.steps):
      self.branches.setdefault(optim.decay_start(cfg.optim, end), []).append(end)
    self.branches_done = set(branches_done)
    self.batch_sharding, self.state, self.wall_before = batch_sharding, state, wall_before
    self.step = int(state['step'])
    self.last_saved = self.step if resumed else None
    self.train_step = cached_train_step(s)
    self.seed = jnp.int32(cfg.seed)
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=distributed.is_leader(), tracker=tracker)
    self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    self.peak = metrics_lib.peak_flops(cfg.train.peak_tflops)
    self.progress = None
    self.routing = record.RoutingWindow(cfg.train.steps)  # result.json train.routing
    self.t_start = time.time()

  def save(self) -> None:
    """Saves the current state (never a non-finite one)."""
    if not bool(_all_finite(self.state)):
      raise NonFiniteLossError(f'parameters or optimizer state are not finite at step {self.step}; stopped without '
                               'saving this state (the last good checkpoint is kept; lower optim.peak_learning_rate?)')
    self.ckpt.save(self.step, self.state, {
        'step': self.step, 'data_iterator': self.data_iter.get_state(),
        'wall_s': self.wall_before + time.time() - self.t_start, 'branches_done': sorted(self.branches_done),
        'data_fingerprint': self.s.corpus.fingerprint, 'config': self.cfg.to_json_best_effort(),
        'routing_window': self.routing.state()})
    self.last_saved = self.step

  def train_until(self, end: int) -> None:
    cfg, t_cfg = self.cfg, self.cfg.train
    self.progress = _Progress(self.step, end)
    if self.peak is None:
      log.info('MFU is not reported: no peak FLOP/s known for %s; set train.peak_tflops', jax.devices()[0].device_kind)
    if self.step < end:
      log.info('training steps %d..%d; compiling the train step', self.step + 1, end)
    t_window, window_steps, pending, first = time.time(), 0, None, True
    with _StopSignals() as stop:
      self._run_branches(stop)  # (resumed exactly at a branch's decay start)
      # A signal may reach one process of a multi-process run first; stopping alone would leave the
      # others waiting in the next step's collectives, so every process asks all the others.
      while self.step < end and not distributed.any_process(stop.raised):
        tokens = mesh_lib.global_batch(next(self.data_iter), self.batch_sharding, t_cfg.batch_size)
        self.state, out = self.train_step(self.state, tokens, self.seed, self.lrs[self.step])
        self.step += 1
        self.routing.add(self.step, out)
        if first:  # the first step includes compilation: time it apart, and keep it out of tokens/s
          jax.block_until_ready(out['loss'])
          log.info('step %d: compiled and ran in %.1f s', self.step, time.time() - t_window)
          t_window, first = time.time(), False
        else:
          window_steps += 1
        # Check the previous step's loss now, so the host never waits on the step just dispatched.
        if pending is not None:
          _check_finite(*pending)
        pending = (self.step, out)
        self.progress.update(1)
        if self.step % t_cfg.log_every_steps == 0 or self.step == end:
          _check_finite(*pending)
          elapsed = time.time() - t_window
          self._log(out, window_steps, elapsed, end)
          t_window, window_steps = time.time(), 0
        if self.step in self.branches:
          _check_finite(*pending)
          self._run_branches(stop)
          t_window, window_steps = time.time(), 0
        if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step != end:
          self._score()
          t_window, window_steps = time.time(), 0
        if self.step % cfg.checkpoint.every_steps == 0 or self.step == end:
          _check_finite(*pending)
          self.save()
      if distributed.any_process(stop.raised) and self.step < end:  # (a signal during the last step: the run is complete)
        self._stop(stop.signum, pending)

  def _run_branches(self, stop) -> None:
    for end in self.branches.get(self.step, []):
      if end not in self.branches_done and not distributed.any_process(stop.raised):
        self._branch(end, stop)

  def _branch(self, end: int, stop) -> None:
    """Decays a copy of the state from this step to `end` on the main run's next batches, scores it, rewinds."""
    t0, start = time.time(), self.step
    lrs = optim.learning_rates(self.cfg.optim, self.cfg.train.steps, end)
    position = self.data_iter.get_state()
    state = jax.tree.map(lambda x: x.copy(), self.state)  # the step donates its input; the main state stays
    out = None
    try:
      for i in range(start, end):
        if distributed.any_process(stop.raised):
          log.info('decay branch to step %d abandoned at step %d (stop signal); it reruns on resume', end, i)
          return
        tokens = mesh_lib.global_batch(next(self.data_iter), self.batch_sharding, self.cfg.train.batch_size)
        state, out = self.train_step(state, tokens, self.seed, lrs[i])
      try:
        _check_finite(end, out)
        result = eval_lib.evaluate(self.s, state)
      except NonFiniteLossError as e:  # a diverged branch is a result (recorded as no loss); the main run goes on
        log.warning('decay branch %d..%d diverged (%s); recorded without a loss', start, end, e)
        result = {'loss': None, 'bits_per_byte': None}
    finally:
      self.data_iter.set_state(position)
    self.branches_done.add(end)
    self.writer.write(end, {'branch_eval_loss': result['loss'], 'branch_eval_bits_per_byte': result['bits_per_byte'],
                            'tokens': end * self.tokens_per_step})
    if result['loss'] is not None:
      log.info('decay branch %d..%d: held-out loss %.4f (%.4f bits/byte) in %.1f s', start, end, result['loss'],
               result['bits_per_byte'], time.time() - t0)

  def _log(self, out, window_steps: int, elapsed: float, end: int) -> None:
    scalars = dict(jax.device_get(out))
    if window_steps:
      scalars['tokens_per_s'] = window_steps * self.tokens_per_step / elapsed
      flops_per_s = scalars['tokens_per_s'] * self.s.accounting['flops_per_token'] / self.s.mesh.size
      scalars['model_tflops_per_device'] = flops_per_s / 1e12
      if self.peak:
        scalars['mfu'] = flops_per_s / self.peak
      scalars['eta_s'] = (end - self.step) * elapsed / window_steps
    self.writer.write(self.step, scalars)
    self.progress.log(self.step, scalars)

  def _score(self) -> None:
    t0 = time.time()
    result = eval_lib.evaluate(self.s, self.state)
    self.writer.write(self.step, {'eval_loss': result['loss'], 'eval_bits_per_byte': result['bits_per_byte'],
                                  'tokens': self.step * self.tokens_per_step})
    log.info('step %d: held-out loss %.4f (%.4f bits/byte) in %.1f s', self.step, result['loss'],
             result['bits_per_byte'], time.time() - t0)

  def _stop(self, signum: int, pending) -> None:
    if self.step != self.last_saved and self.step > 0:
      _check_finite(*pending)
      self.save()
    self.ckpt.wait()
    saved = f'checkpoint step {self.step} is in {self.workdir}' if self.step > 0 else 'no step had run, nothing to save'
    if signum == signal.SIGINT:
      raise Interrupted(f'Ctrl-C at step {self.step}: {saved}; rerun the same command to resume')
    raise Preempted(f'SIGTERM at step {self.step}: {saved}; rerun the same command to resume')

  def close(self) -> None:
    try:
      if self.progress is not None:
        self.progress.close()
      self.writer.close()
    finally:
      self.ckpt.close()


class _Progress:
  """A tqdm bar on a terminal; periodic log lines otherwise."""

  def __init__(self, start: int, end: int):
    self.bar = None
    if sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=end, initial=start, unit='step', dynamic_ncols=True, leave=False)

  def update(self, n: int) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def log(self, step: int, scalars: dict) -> None:
    text = f'step {step}: loss {scalars["loss"]:.4f} ce {scalars["ce"]:.4f}'
    if 'tokens_per_s' in scalars:
      text += (f' {scalars["tokens_per_s"]:,.0f} tok/s {scalars["model_tflops_per_device"]:.3f} TFLOP/s/device'
               + (f' mfu {scalars["mfu"]:.1%}' if 'mfu' in scalars else '') + f' eta {_duration(scalars["eta_s"])}')
    if self.bar is not None:
      self.bar.set_postfix_str(text)
    else:
      log.info(text)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()

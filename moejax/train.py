"""The train step (pure, jitted, donated) and the loop around it.

The loop resumes from the latest checkpoint (state, step and data-iterator position),
saves every `checkpoint.every_steps` and at the end, turns SIGTERM into a saved
checkpoint plus `Preempted`, and stops with `NonFiniteLossError` on a NaN/inf loss
without ever saving the bad state. With `optim.decay_branches` it also runs the WSD decay
branches (`optim.py`): at a branch's decay start it copies the state, decays it on the
batches the main run is about to see (the data iterator is rewound afterwards), scores the
held-out set and drops the copy, so one run gives the loss of several run lengths.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax import files
from moejax import accounting, checkpoint, data, distributed, mesh as mesh_lib, metrics as metrics_lib
from moejax import model as model_lib
from moejax import moe as moe_lib, optim
from moejax import workdir as workdir_lib
from moejax.errors import DataError, Interrupted, NonFiniteLossError, Preempted

log = logging.getLogger(__name__)


def token_nll(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in nats (float32)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32), targets_BL)


ROUTING_METRICS = ('expert_counts', 'load_max_over_mean', 'load_cv', 'dead_experts', 'drop_fraction', 'ep_drop_fraction',
                   'router_entropy', 'bias_abs_mean', 'aux_loss_per_layer', 'z_loss_per_layer')


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg,
                    state_shardings: Any = None, mesh=None) -> Callable:
  """Returns step(state, tokens_BL1, seed, lr) -> (state, metrics); the state buffers are donated.

  `seed` (the run's `cfg.seed`, int32) and `lr` (this step's learning rate, float32) are
  traced scalars, so one compiled step serves every seed, schedule and run length of a
  configuration; see `cached_train_step`. `optimizer` is `optim.make` (unit learning rate). `state_shardings` (from `shardings(state)`)
  pins the new state to the shardings the state came in with. With `mesh`, the step is traced
  under `jax.set_mesh(mesh)` (the MoE layers find the expert axis there) and its metrics are
  replicated, so every process can read them.

  The state is {'params', 'buffers', 'opt_state', 'step'}; only params get gradients. With
  load_balancing='aux_free' the expert biases in 'buffers' move after each step from that
  step's pre-drop expert counts (over the global batch).
  """
  moe_cfg = cfg.moe
  balance_coef = moe_lib.balance_coefficient(moe_cfg)

  def loss_fn(params, buffers, tokens_BL1, rng):
    logits_BLV, aux = nnx.merge(graphdef, params, buffers)(tokens_BL1[:, :-1], train=True, rng=rng)
    ce = jnp.mean(token_nll(logits_BLV, tokens_BL1[:, 1:]))
    loss = ce + balance_coef * aux['aux_loss'] + moe_cfg.z_loss_coef * aux['z_loss']
    return loss, (ce, aux)

  def step(state, tokens_BL1, seed, lr):
    rng = jax.random.fold_in(jax.random.key(seed), state['step'])
    (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], state['buffers'], tokens_BL1, rng)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    lr = jnp.asarray(lr, jnp.float32)
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    params = optax.apply_updates(state['params'], updates)
    buffers = state['buffers']
    if moe_cfg.load_balancing == 'aux_free' and 'expert_counts' in aux:
      buffers = moe_lib.update_expert_biases(buffers, aux['expert_counts'], moe_cfg.bias_update_rate)
    out = {'loss': loss, 'ce': ce, 'aux_loss': aux['aux_loss'], 'z_loss': aux['z_loss'],
           'grad_norm': optax.tree.norm(grads), 'learning_rate': lr}
    out.update({k: aux[k] for k in ROUTING_METRICS if k in aux})
    new_state = {'params': params, 'buffers': buffers, 'opt_state': opt_state, 'step': state['step'] + 1}
    # Keep every leaf on the sharding it came in with, so step n+1 reuses step n's executable
    # and parameters never silently become replicated.
    if state_shardings is not None:
      new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
    if mesh is not None:
      out = jax.lax.with_sharding_constraint(out, mesh_lib.replicated(mesh))
    return new_state, out

  return mesh_lib.under_mesh(jax.jit(step, donate_argnums=0), mesh)


def shardings(tree: Any) -> Any:
  """The sharding of every array leaf."""
  return jax.tree.map(lambda x: x.sharding, tree)


# Fields that never change what the train or eval step computes: runs that differ only in
# these share one compiled step (a sweep over seeds, learning rates or run lengths compiles once).
_NOT_IN_STEP = ('name', 'seed', 'data.seed', 'train.steps', 'optim.peak_learning_rate', 'optim.warmup_fraction',
                'optim.schedule', 'optim.decay_fraction', 'optim.final_lr_fraction', 'optim.decay_branches', 'data.source', 'data.heldout_bytes', 'data.heldout_max_fraction',
                'data.binary_documents', 'data.tfds_split', 'data.tfds_text_key', 'data.tfds_data_dir', 'data.tokenizer',
                'data.separator_token', 'data.tokenizer_train_bytes', 'data.text_field', 'data.cache_dir',
                'data.verify_store', 'data.read_threads', 'data.prefetch_batches', 'checkpoint', 'eval',
                'distributed', 'train.log_every_steps', 'train.peak_tflops')
_STEP_CACHE: collections.OrderedDict = collections.OrderedDict()
_STEP_CACHE_SIZE = 8


def step_key(cfg) -> str:
  """The part of a config that determines the compiled train step, as canonical JSON."""
  tree = cfg.to_dict()
  for dotted in _NOT_IN_STEP:
    *parents, leaf = dotted.split('.')
    node = tree
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  return json.dumps(tree, sort_keys=True, default=str)


def cached(kind: str, cfg, build: Callable[[], Callable]) -> Callable:
  """`build()` once per (kind, step_key(cfg)); the last few are kept (LRU)."""
  key = (kind, step_key(cfg))
  if key in _STEP_CACHE:
    _STEP_CACHE.move_to_end(key)
    return _STEP_CACHE[key]
  fn = _STEP_CACHE[key] = build()
  while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
    _STEP_CACHE.popitem(last=False)
  return fn


def cached_train_step(s: 'Setup') -> Callable:
  """The jitted train step for `s.cfg`, shared with earlier runs whose step_key is equal."""
  cfg = s.cfg
  return cached('train', cfg, lambda: make_train_step(s.graphdef, optim.make(cfg.optim), cfg, shardings(s.state),
                                                      s.mesh))


@dataclasses.dataclass
class Setup:
  """Everything a run builds from its config before the first step."""
  cfg: Any
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  state: dict
  corpus: data.Corpus
  accounting: dict


def _placed(cfg, mesh, param_state, buffer_state, abstract: bool = False) -> dict:
  """The sharded train state: arrays on their devices, or (abstract) ShapeDtypeStructs carrying the shardings."""
  put = _abstract if abstract else jax.device_put
  param_sh = mesh_lib.param_shardings(param_state, mesh)
  replicated = mesh_lib.replicated(mesh)
  params = put(nnx.to_pure_dict(param_state), param_sh)
  buffers = put(nnx.to_pure_dict(buffer_state), mesh_lib.param_shardings(buffer_state, mesh))
  optimizer = optim.make(cfg.optim)
  # Adam moments shard like their parameters; counters are replicated.
  opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, jax.eval_shape(optimizer.init, params), param_sh,
                                 transform_non_params=lambda _: replicated)
  opt_state = (put(jax.eval_shape(optimizer.init, params), opt_sh) if abstract
               else jax.jit(optimizer.init, out_shardings=opt_sh)(params))
  return {'params': params, 'buffers': buffers, 'opt_state': opt_state,
          'step': put(jnp.zeros((), jnp.int32), replicated)}


def abstract_state(cfg) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, train state as ShapeDtypeStructs with shardings) of cfg, allocating nothing: a restore target."""
  mesh = _make_mesh(cfg)
  graphdef, param_state, buffer_state = model_lib.split(nnx.eval_shape(lambda: model_lib.build(cfg)))
  return graphdef, _placed(cfg, mesh, param_state, buffer_state, abstract=True)


def _make_mesh(cfg, devices=None):
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  mesh_lib.check_batch(cfg.train.batch_size, mesh, 'train.batch_size')  # (a -1 mesh axis resolves only here)
  mesh_lib.check_batch(cfg.eval.batch_size, mesh, 'eval.batch_size')
  return mesh


def setup(cfg, corpus: data.Corpus | None = None) -> Setup:
  """Builds mesh, model, sharded params and optimizer state for a validated config."""
  corpus = corpus or data.corpus_from_config(cfg.data)
  data.check_vocab(cfg, corpus)
  mesh = _make_mesh(cfg)
  t0 = time.time()
  graphdef, param_state, buffer_state = model_lib.split(model_lib.build(cfg))
  state = _placed(cfg, mesh, param_state, buffer_state)
  acc = accounting.count(cfg)
  log.info('model %s: N_total %s, N_active %s, built on mesh %s in %.1f s', cfg.name, accounting.human(acc['n_total']),
           accounting.human(acc['n_active']), dict(mesh.shape), time.time() - t0)
  return Setup(cfg, mesh, graphdef, state, corpus, acc)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def compile_step(cfg, target=None) -> dict:
  """Lowers and compiles the train step for cfg's mesh without allocating the model or reading data.

  `target` (a `moejax.parallel.targets.Target`) builds the mesh over that TPU slice's or GPU
  node's devices and compiles with its real compiler on this machine; None: the local devices.
  Returns the per-device memory analysis in bytes: state (arguments), temporaries, and the
  peak estimate arguments + outputs - donated aliases + temporaries; plus compile time and
  the compiler that made the figures.
  """
  from moejax.parallel import aot  # pylint: disable=import-outside-toplevel
  mesh = _make_mesh(cfg, None if target is None else target.devices())
  with aot.kernel_context(target):  # the model's kernel and exchange choices follow the target's platform
    graphdef, param_state, buffer_state = model_lib.split(nnx.eval_shape(lambda: model_lib.build(cfg)))
    state = _placed(cfg, mesh, param_state, buffer_state, abstract=True)
    step = make_train_step(graphdef, optim.make(cfg.optim), cfg, shardings(state), mesh)
  tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32,
                                sharding=mesh_lib.batch_sharding(mesh, 2))
  c = aot.compile_for(target, None, state, tokens, jax.ShapeDtypeStruct((), jnp.int32),
                      jax.ShapeDtypeStruct((), jnp.float32), jitted=step)
  per_device = lambda tree: sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                                for x in jax.tree.leaves(tree))
  report = {'mesh': dict(mesh.shape), 'devices': mesh.size,
            'platform': jax.default_backend() if target is None else target.platform, 'compiler': c.compiler,
            'compile_s': c.compile_s, 'params_bytes': per_device(state['params']),
            'optimizer_bytes': per_device(state['opt_state'])}
  report.update(c.memory)
  return report


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
  seconds = int(round(seconds))
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


def run(cfg, workdir: str, stop_after: int | None = None, built: Setup | None = None) -> dict:
  """Trains `cfg` in `workdir` (resuming if possible); returns {'steps', 'tokens', 'wall_s', 'setup'}.

  `stop_after` stops (with a checkpoint) after that many total steps, as a preemption would.
  With `eval.every_steps`, the held-out loss is also scored every that many steps and
  written to the metrics (`eval_loss`, `eval_bits_per_byte`): the run's learning curve.
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
                                 cfg.checkpoint.use_async)
  loop = None
  try:
    state, wall_before, branches_done = s.state, 0.0, []
    restored = ckpt.restore_latest(checkpoint.abstract(state))
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
      log.info('resumed from step %d', step0)
    elif distributed.is_leader() and not os.path.exists(os.path.join(workdir, 'config.json')):
      files.atomic_write(os.path.join(workdir, 'config.json'), cfg.to_json_best_effort(indent=2))
    loop = _Loop(cfg, s, workdir, ckpt, data_iter, batch_sharding, state, wall_before, restored is not None,
                 branches_done)
    end = t_cfg.steps if stop_after is None else min(stop_after, t_cfg.steps)
    loop.train_until(end)
  finally:
    if loop is not None:
      loop.close()  # (closes the checkpointer too)
    else:
      ckpt.close()
  s.state = loop.state
  return {'steps': loop.step, 'tokens': loop.step * loop.tokens_per_step,
          'wall_s': wall_before + time.time() - loop.t_start, 'setup': s}


class _Loop:
  """The state of one training loop: steps, saves, signals, logging and periodic held-out scores."""

  def __init__(self, cfg, s: Setup, workdir, ckpt, data_iter, batch_sharding, state, wall_before, resumed,
               branches_done=()):
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
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=distributed.is_leader())
    self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    self.peak = metrics_lib.peak_flops(cfg.train.peak_tflops)
    self.progress = None
    self.t_start = time.time()

  def save(self) -> None:
    """Saves the current state (never a non-finite one)."""
    if not bool(_all_finite(self.state)):
      raise NonFiniteLossError(f'parameters or optimizer state are not finite at step {self.step}; stopped without '
                               'saving this state (the last good checkpoint is kept; lower optim.peak_learning_rate?)')
    self.ckpt.save(self.step, self.state, {
        'step': self.step, 'data_iterator': self.data_iter.get_state(),
        'wall_s': self.wall_before + time.time() - self.t_start, 'branches_done': sorted(self.branches_done),
        'data_fingerprint': self.s.corpus.fingerprint, 'config': self.cfg.to_json_best_effort()})
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
    from moejax import eval as eval_lib  # pylint: disable=import-outside-toplevel  (eval imports this module)
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
    from moejax import eval as eval_lib  # pylint: disable=import-outside-toplevel  (eval imports this module)
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

"""One configuration run end to end (`python -m moejax.main`): train and score, or score only, or compile only.

`execute` validates the config, locks and binds the workdir, trains (resuming), scores the
held-out set and writes WORKDIR/result.json (tracked in W&B with `wandb.mode`, moejax/train/tracking.py); `compile_check` compiles the train step for the
configured mesh without allocating it and reports per-device memory (docs/scaling-out.md).
jax loads only after validation, so bad flags and configs fail in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from moejax import cli, config as config_lib
from moejax.errors import ConfigError, MoejaxError, WorkdirError

log = logging.getLogger('moejax.main')  # (the name the run's log lines have always carried)


def execute(cfg, workdir: str, mode: str = 'train', allow_config_change: bool = False) -> dict:
  """Validates `cfg`, trains (mode 'train') and scores it; writes and returns the result record.

  The workdir is locked for the whole call and bound to cfg's configuration (`moejax.train.workdir`).
  """
  config_lib.validate(cfg)
  from moejax.train import tracking  # pylint: disable=import-outside-toplevel  (no jax)
  tracking.check_installed(cfg)
  # jax, flax and orbax load only now, so bad flags and configs fail in a fraction of a second.
  import jax  # pylint: disable=import-outside-toplevel
  from moejax import data
  from moejax.parallel import distributed
  from moejax.train import evaluate as eval_lib, loop as loop_lib, record as record_lib, restore as restore_lib
  from moejax.train import state as state_lib
  from moejax.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  distributed.initialize(cfg.distributed)  # before anything touches a device
  leader = distributed.is_leader()
  workdir_lib.prepare(workdir, jax.process_index())
  with contextlib.ExitStack() as stack:
    error = None
    try:  # process 0 takes the lock; every process checks the binding (process 0 records it)
      stack.enter_context(workdir_lib.lock(workdir, enabled=leader))
      changes = workdir_lib.bind(workdir, cfg, mode, allow_config_change, write=leader)
      tracker = stack.enter_context(tracking.start(cfg, workdir, leader))  # (finished before the lock is released)
    except MoejaxError as e:
      error = e
    if distributed.any_process(error is not None):  # all stop together, or the others hang in collectives
      raise error or WorkdirError(f'another process of this run could not take, bind or track workdir {workdir}')
    restore_lib.check_corpus_given(cfg, workdir)  # an imported workdir has no corpus until one is given
    corpus = data.corpus_from_config(cfg.data)
    if leader:  # the run keeps its own copy of its tokenizer (docs/data.md)
      data.tokenizers.snapshot(corpus.tokenizer, workdir)
    s = state_lib.setup(cfg, corpus)
    if mode == 'train':
      summary = loop_lib.run(cfg, workdir, built=s, tracker=tracker)
      state = s.state
    else:
      step, state = restore_lib.restore_state(s, workdir)
      summary = {'steps': step, 'tokens': step * cfg.train.batch_size * cfg.data.seq_len, 'wall_s': None}
    log.info('scoring the held-out split')
    record = record_lib.result_record(s, eval_lib.evaluate(s, state), summary, changes, workdir)
    record_lib.write_result(workdir, record)
    if tracker is not None:
      tracker.result(record)
  log.info('%s: held-out loss %.4f nats/token (%.4f bits/byte) over %d tokens', cfg.name,
           record['eval']['loss'], record['eval']['bits_per_byte'], record['eval']['tokens'])
  return record


def _gb(n: float) -> str:
  return f'{n / 1e9:.3f} GB'


def compile_check(cfg, device_memory: str | None, target_name: str | None = None) -> int:
  """--mode=compile: prints the memory report; returns the exit code (0 fits or unknown, 1 does not fit).

  `target_name` (tpu:v5p-8, gpu:h100x8, ...; moejax/parallel/targets.py) compiles for that slice or
  node with its real compiler on this machine and checks against its device memory."""
  config_lib.validate(cfg)
  target = None
  if target_name:
    import os  # pylint: disable=import-outside-toplevel
    from moejax.parallel import targets  # pylint: disable=import-outside-toplevel
    target = targets.parse(target_name)
    targets.check_installed(target.platform)
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the target's compiler runs here; no accelerator is probed
  import jax  # pylint: disable=import-outside-toplevel
  from moejax.parallel import distributed
  from moejax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  distributed.initialize(cfg.distributed)
  limit = None
  if device_memory:
    limit, is_bytes = cli.parse_amount(device_memory)
    if not is_bytes:
      raise ConfigError(f'--device_memory={device_memory} needs a unit, e.g. 80GB or 16GiB')
  r = state_lib.compile_step(cfg, target)
  if limit is None and target is not None:
    limit = target.device_memory_bytes
  if limit is None:
    stats = getattr(jax.devices()[0], 'memory_stats', lambda: None)() or {}
    limit = stats.get('bytes_limit')
  where = f'{target.name}, ' if target is not None else ''
  print(f'{cfg.name}: train step compiled for mesh {r["mesh"]} ({where}{r["devices"]} {r["platform"]} devices) '
        f'by {r["compiler"]} in {r["compile_s"]:.1f} s')
  print(f'  per device: params {_gb(r["params_bytes"])}, optimizer state {_gb(r["optimizer_bytes"])}')
  if 'peak_bytes' not in r:
    print('  the compiler gave no memory analysis on this platform')
    return 0
  print(f'  arguments {_gb(r["argument_bytes"])}, outputs {_gb(r["output_bytes"])} '
        f'(donated {_gb(r["alias_bytes"])}), temporaries {_gb(r["temp_bytes"])}')
  if limit is None:
    print(f'  peak {_gb(r["peak_bytes"])} per device; fits: unknown (pass --device_memory=80GB)')
    return 0
  fits = r['peak_bytes'] <= limit
  print(f'  peak {_gb(r["peak_bytes"])} of {_gb(limit)} per device: {"fits" if fits else "DOES NOT FIT"}')
  if not fits:
    print(f'moejax: error: {cfg.name} needs {_gb(r["peak_bytes"])} per device, over {_gb(limit)}; '
          'use more devices (mesh.fsdp / mesh.expert) or a smaller batch', file=sys.stderr)
  return 0 if fits else 1

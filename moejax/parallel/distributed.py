"""Joining a multi-process (multi-host) run: `jax.distributed.initialize` from config or environment.

`distributed.mode`:
  'auto'    join when the environment describes a multi-process run: a coordinator address
            (config or JAX_COORDINATOR_ADDRESS), a SLURM step (srun) with more than one task
            (SLURM_STEP_NUM_TASKS; a command typed in the job's own shell runs alone), or a
            TPU slice with more than one worker (TPU_WORKER_HOSTNAMES); else run alone;
  'multi'   always join (JAX detects SLURM, Cloud TPU, GKE, ... when no address is given);
  'single'  never join.

An address needs `num_processes` and `process_id` (config or JAX_NUM_PROCESSES /
JAX_PROCESS_ID). Forming the runtime is bounded by `initialization_timeout_s`: a coordinator
that cannot be reached, or a peer that never starts, ends this process with one error line
and exit code 4 when the time is up (a watchdog thread: JAX itself would abort the process
later with a fatal log, or wait).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import jax

from moejax.errors import ConfigError, DistributedError

log = logging.getLogger(__name__)
MODES = ('auto', 'multi', 'single')


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, '') else None


def wanted(dist_cfg) -> bool:
  """Whether this process should join a multi-process run (see the module docstring)."""
  if dist_cfg.mode not in MODES:
    raise ConfigError(f'distributed.mode={dist_cfg.mode!r} must be one of {MODES}')
  if dist_cfg.mode != 'auto':
    return dist_cfg.mode == 'multi'
  if dist_cfg.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if (_env_int('SLURM_STEP_NUM_TASKS') or 1) > 1:  # inside an srun step of several tasks (not the batch shell)
    return True
  return len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def arguments(dist_cfg) -> dict:
  """Keyword arguments for `jax.distributed.initialize`."""
  address = dist_cfg.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  count = dist_cfg.num_processes if dist_cfg.num_processes is not None else _env_int('JAX_NUM_PROCESSES')
  index = dist_cfg.process_id if dist_cfg.process_id is not None else _env_int('JAX_PROCESS_ID')
  if address and (count is None or index is None):
    raise ConfigError(f'distributed coordinator {address} needs distributed.num_processes and '
                      'distributed.process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)')
  if count is not None and index is not None and not 0 <= index < count:
    raise ConfigError(f'distributed.process_id={index} must be in [0, num_processes={count})')
  if dist_cfg.initialization_timeout_s < 1:
    raise ConfigError(f'distributed.initialization_timeout_s={dist_cfg.initialization_timeout_s} must be >= 1')
  args = {'initialization_timeout': int(dist_cfg.initialization_timeout_s)}
  if address:
    args.update(coordinator_address=address, num_processes=count, process_id=index)
  return args


def initialize(dist_cfg) -> bool:
  """Joins the multi-process runtime when `wanted`; returns whether this is a multi-process run.

  Idempotent (a sweep calls it for every point). Must run before anything else touches JAX.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if not wanted(dist_cfg):
    return False
  args = arguments(dist_cfg)
  timeout = args['initialization_timeout']
  where = args.get('coordinator_address', 'the environment\'s coordinator')
  who = f'process {args["process_id"]} of {args["num_processes"]}' if 'process_id' in args else 'this process'

  def give_up():
    print(f'moejax: error: {who} could not join the distributed run within {timeout} s '
          f'(coordinator {where}): is every process started and the address reachable?', file=sys.stderr, flush=True)
    os._exit(DistributedError.exit_code)  # pylint: disable=protected-access

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**args)
  except (RuntimeError, ValueError) as e:  # e.g. no cluster detected with mode='multi'
    raise DistributedError(f'{who} could not join the distributed run (coordinator {where}): '
                           f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
  finally:
    watchdog.cancel()
  log.info('joined the distributed run: process %d of %d, %d local / %d global devices', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def finish() -> None:
  """Leaves a multi-process run in a fixed order: a barrier, then the runtime's shutdown.

  Left to interpreter exit, the coordinator's service could be torn down while another
  process still had a request queued, which aborted process 0 (SIGABRT in gRPC's server
  destructor) after a complete run; seen once in a loaded two-process test.
  """
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  multihost_utils.sync_global_devices('moejax_finish')
  jax.distributed.shutdown()


def any_process(flag: bool) -> bool:
  """True on every process when any process has `flag` set (a tiny all-gather; no-op with one process)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))


def is_leader() -> bool:
  """Process 0 writes the run's shared files (result.json, metrics, config)."""
  return jax.process_index() == 0

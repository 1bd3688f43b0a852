"""Entry point: train and score one configuration.

  python -m moejax.main --config=experiments/quickstart.py --workdir=/tmp/run \\
      [--config.moe.num_experts=32 ...] [--mode=train|eval]

--mode=train (default) trains (resuming from the workdir's latest checkpoint), scores the
held-out set and writes WORKDIR/result.json. --mode=eval only scores the latest checkpoint.
--mode=compile lowers and compiles the train step for the configured mesh, without
allocating the model or reading data, and prints its per-device memory and whether it fits
in --device_memory (default: what the device reports); exit 1 when it does not fit. No
--workdir needed. --target=tpu:v5p-8 (or gpu:h100x8, ...; moejax/parallel/targets.py) compiles
for that TPU slice or GPU node with its real compiler on this machine (needs the
tpu-compile or gpu-compile extra) and checks against its device memory; without a target,
fake the device count on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N
(docs/scaling-out.md).
Any bad input ends with one line `moejax: error: ...` on stderr and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from absl import app, flags

from moejax import cli, config as config_lib
from moejax.errors import ConfigError, MoejaxError, WorkdirError

FLAGS = flags.FLAGS
log = logging.getLogger('moejax.main')  # (not __name__: run as -m it is '__main__')


def execute(cfg, workdir: str, mode: str = 'train', allow_config_change: bool = False) -> dict:
  """Validates `cfg`, trains (mode 'train') and scores it; writes and returns the result record.

  The workdir is locked for the whole call and bound to cfg's configuration (`moejax.workdir`).
  """
  config_lib.validate(cfg)
  # jax, flax and orbax load only now, so bad flags and configs fail in a fraction of a second.
  import jax  # pylint: disable=import-outside-toplevel
  from moejax import data, distributed, eval as eval_lib, train, workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  distributed.initialize(cfg.distributed)  # before anything touches a device
  leader = distributed.is_leader()
  workdir_lib.prepare(workdir, jax.process_index())
  with contextlib.ExitStack() as stack:
    error = None
    try:  # process 0 takes the lock; every process checks the binding (process 0 records it)
      stack.enter_context(workdir_lib.lock(workdir, enabled=leader))
      changes = workdir_lib.bind(workdir, cfg, mode, allow_config_change, write=leader)
    except MoejaxError as e:
      error = e
    if distributed.any_process(error is not None):  # all stop together, or the others hang in collectives
      raise error or WorkdirError(f'another process of this run could not take or bind workdir {workdir}')
    corpus = data.corpus_from_config(cfg.data)
    s = train.setup(cfg, corpus)
    if mode == 'train':
      summary = train.run(cfg, workdir, built=s)
      state = s.state
    else:
      step, state = eval_lib.restore_state(s, workdir)
      summary = {'steps': step, 'tokens': step * cfg.train.batch_size * cfg.data.seq_len, 'wall_s': None}
    log.info('scoring the held-out split')
    record = eval_lib.result_record(s, eval_lib.evaluate(s, state), summary, changes, workdir)
    eval_lib.write_result(workdir, record)
  log.info('%s: held-out loss %.4f nats/token (%.4f bits/byte) over %d tokens', cfg.name,
           record['eval']['loss'], record['eval']['bits_per_byte'], record['eval']['tokens'])
  return record


def _gb(n: float) -> str:
  return f'{n / 1e9:.3f} GB'


def compile_check(cfg, device_memory: str | None, target_name: str | None = None) -> int:
  """--mode=compile: prints the memory report; returns the exit code (0 fits or unknown, 1 does not fit)."""
  config_lib.validate(cfg)
  target = None
  if target_name:
    import os  # pylint: disable=import-outside-toplevel
    from moejax.parallel import targets  # pylint: disable=import-outside-toplevel
    target = targets.parse(target_name)
    targets.check_installed(target.platform)
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the target's compiler runs here; no accelerator is probed
  import jax  # pylint: disable=import-outside-toplevel
  from moejax import distributed, train  # pylint: disable=import-outside-toplevel
  distributed.initialize(cfg.distributed)
  limit = None
  if device_memory:
    limit, is_bytes = cli.parse_amount(device_memory)
    if not is_bytes:
      raise ConfigError(f'--device_memory={device_memory} needs a unit, e.g. 80GB or 16GiB')
  r = train.compile_step(cfg, target)
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


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None:
    raise app.UsageError('--config is required')
  if FLAGS.target and FLAGS.mode != 'compile':
    raise app.UsageError('--target applies to --mode=compile only')
  if FLAGS.mode == 'compile':
    try:
      code = compile_check(FLAGS.config, FLAGS.device_memory, FLAGS.target)
    except MoejaxError as e:
      cli.fail(e)
    sys.exit(code)
  if FLAGS.workdir is None:
    raise app.UsageError('--workdir is required')
  try:
    record = execute(FLAGS.config, FLAGS.workdir, FLAGS.mode, FLAGS.allow_config_change)
  except MoejaxError as e:
    cli.fail(e)
  from moejax import distributed  # pylint: disable=import-outside-toplevel
  distributed.finish()
  print(f'{record["name"]}: held-out loss {record["eval"]["loss"]:.4f} nats/token, '
        f'{record["eval"]["bits_per_byte"]:.4f} bits/byte -> {FLAGS.workdir}/result.json')


if __name__ == '__main__':
  cli.define_config_flag()
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and result.json.')
  flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'compile'],
                    'train (then eval), eval only, or compile only (memory check).')
  flags.DEFINE_string('device_memory', None, "--mode=compile: memory per device, e.g. '80GB' (default: reported)")
  flags.DEFINE_string('target', None, '--mode=compile: compile for this TPU slice or GPU node with its real '
                      'compiler, e.g. tpu:v5p-8, tpu:v6e-8, gpu:h100x8, gpu:h100x8x2 (needs the *-compile extra)')
  flags.DEFINE_bool('allow_config_change', False, 'Resume or rescore a workdir with a different configuration; '
                    'the change is recorded in provenance.json and result.json.')
  cli.cli(_main)

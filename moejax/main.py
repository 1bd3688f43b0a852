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

import sys

from absl import app, flags

from moejax import cli
from moejax.errors import MoejaxError
from moejax.train.run import compile_check, execute

FLAGS = flags.FLAGS


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
  from moejax.parallel import distributed  # pylint: disable=import-outside-toplevel
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

"""Export a run's latest checkpoint as a HuggingFace checkpoint (Llama, Mixtral, OLMoE, Qwen2-MoE or Qwen3-MoE layout).

  python -m moejax.export --workdir=DIR --out=HF_DIR [--layout=auto|llama|mixtral|olmoe|qwen2_moe|qwen3_moe]
      [--dtype=float32|bfloat16|float16] [--max_shard_size=5GB]

Flags, then one call of `moejax.interop.exporter.export` (docs/interop.md). A design no layout
expresses, an interruption (SIGTERM) or a full disk is one error line, and nothing is left
under --out or beside it.
"""

from __future__ import annotations

from absl import app, flags

from moejax import cli
from moejax.errors import ConfigError

FLAGS = flags.FLAGS


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  size, is_bytes = cli.parse_amount(FLAGS.max_shard_size)
  if not is_bytes:
    raise ConfigError(f'--max_shard_size={FLAGS.max_shard_size} needs a unit, e.g. 5GB')
  from moejax.interop import exporter  # pylint: disable=import-outside-toplevel  (jax loads only after the flags)
  layout = exporter.export(FLAGS.workdir, FLAGS.out, FLAGS.layout, FLAGS.dtype, int(size))
  print(f'{FLAGS.workdir} -> {FLAGS.out} ({layout}, {FLAGS.dtype})')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'A trained run\'s workdir (config.json and checkpoints/).', required=True)
  flags.DEFINE_string('out', None, 'The HuggingFace checkpoint directory to write (must not exist, or be empty).',
                      required=True)
  flags.DEFINE_string('layout', 'auto', 'auto, llama (dense runs), mixtral, olmoe, qwen2_moe or qwen3_moe.')
  flags.DEFINE_string('dtype', 'float32', 'Weights dtype: float32 (exact), bfloat16 or float16.')
  flags.DEFINE_string('max_shard_size', '5GB', 'Above this size the weights are split into numbered shards.')
  cli.cli(_main)

"""`python -m moejax.bench attention` (or `python -m moejax.bench.attention`): the compiled temporaries of one attention layer's forward+backward
per `model.attention` core, from the compiler's memory analysis (nothing is run, so long contexts fit).

Each row compiles grad(sum(attend(q, k, v))) with respect to q, k and v for one sequence of L tokens,
H query heads over G kv heads of width K, causal with document segment ids. On the CPU backend the
figures are the CPU compiler's; with `--target=tpu` they are the real TPU compiler's (a deviceless
v5p topology: needs libtpu, see /work/shared/STACK.md 3b).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from absl import flags

from moejax import cli
from moejax.bench import tables
from moejax.errors import ConfigError
from moejax.model import attention as attention_lib


def _device(target: str | None):
  if target != 'tpu':
    return jax.devices()[0]
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x1', chip_config_name='default',
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices[0]


def temporaries(impl: str, L: int, heads: int, kv_heads: int, head_dim: int, dtype, blocks=(512, 512),
                target: str | None = None) -> dict:
  """{'temp_bytes', 'compile_s'} of one compiled attention forward+backward."""
  mesh = jax.sharding.Mesh([_device(target)], ('d',))
  sharding = NamedSharding(mesh, PartitionSpec())
  shape = lambda h: jax.ShapeDtypeStruct((1, L, h, head_dim), dtype, sharding=sharding)
  segments = jax.ShapeDtypeStruct((1, L), jnp.int32, sharding=sharding)

  def loss(q, k, v, seg):
    return jnp.sum(attention_lib.attend(q, k, v, impl, seg, *blocks).astype(jnp.float32))

  start = time.time()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
      shape(heads), shape(kv_heads), shape(kv_heads), segments).compile()
  return {'temp_bytes': compiled.memory_analysis().temp_size_in_bytes, 'compile_s': time.time() - start}


def run(seq_lens, impls, heads: int, kv_heads: int, head_dim: int, dtype, blocks, target: str | None) -> list[dict]:
  """Rows {'L', 'core', 'temp_bytes', 'ratio_to_xla', 'scores_bytes', 'compile_s'}: temporaries per core and L."""
  if heads % kv_heads or any(i not in attention_lib.IMPLEMENTATIONS for i in impls):
    raise ConfigError(f'--heads={heads} must be a multiple of --kv_heads={kv_heads}, and --impls={",".join(impls)} '
                      f'each one of {attention_lib.IMPLEMENTATIONS}')
  rows = []
  for L in seq_lens:
    base = None
    for impl in impls:
      r = temporaries(impl, L, heads, kv_heads, head_dim, dtype, blocks, target)
      base = r['temp_bytes'] if impl == 'xla' else base
      rows.append({'L': L, 'core': impl, 'temp_bytes': r['temp_bytes'],
                   'ratio_to_xla': r['temp_bytes'] / base if base else None,
                   'scores_bytes': heads * L * L * 4, 'compile_s': r['compile_s']})
  return rows


def _ints(name: str, text: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(',') if x.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise ConfigError(f'--{name}={text!r} must be comma-separated positive integers')
  return values


def _main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  seq_lens, blocks = _ints('seq_lens', FLAGS.seq_lens), tuple(_ints('attention_blocks', FLAGS.attention_blocks))
  if len(blocks) != 2:
    raise ConfigError(f'--attention_blocks={FLAGS.attention_blocks!r} must be q_block,kv_block')
  target = FLAGS.target or None
  print(f'attention temporaries: {target or jax.default_backend()} compiler, jax {jax.__version__}; one sequence, '
        f'H={FLAGS.heads}, G={FLAGS.kv_heads}, K={FLAGS.head_dim}, {FLAGS.dtype}, blocks {blocks}, '
        'causal + document segment ids, forward+backward')
  rows = run(seq_lens, FLAGS.impls.split(','), FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim, jnp.dtype(FLAGS.dtype),
             blocks, target)
  print('\n'.join(tables.attention_table(rows)))


def define_flags() -> None:
  """This benchmark's flags (defined only when it runs as a command)."""
  flags.DEFINE_string('seq_lens', '1024,4096', 'Sequence lengths.')
  flags.DEFINE_integer('heads', 16, 'Query heads.')
  flags.DEFINE_integer('kv_heads', 16, 'Key/value heads.')
  flags.DEFINE_integer('head_dim', 128, 'Head width.')
  flags.DEFINE_string('impls', 'xla,blockwise', 'model.attention cores, xla first.')
  flags.DEFINE_string('attention_blocks', '512,512', 'q_block,kv_block.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
  flags.DEFINE_enum('target', None, ['tpu'], 'Compile with the deviceless TPU compiler (needs libtpu).')


def main() -> None:
  define_flags()
  cli.cli(_main)


if __name__ == '__main__':
  main()

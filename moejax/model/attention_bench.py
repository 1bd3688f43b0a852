"""`python -m moejax.bench attention`: the compiled temporaries of one attention layer's forward+backward
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


def run(seq_lens, impls, heads: int, kv_heads: int, head_dim: int, dtype, blocks, target: str | None) -> list[str]:
  """A Markdown table: temporaries per core and L, and their ratio to 'xla'."""
  if heads % kv_heads or any(i not in attention_lib.IMPLEMENTATIONS for i in impls):
    raise ConfigError(f'--heads={heads} must be a multiple of --kv_heads={kv_heads}, and --impls={",".join(impls)} '
                      f'each one of {attention_lib.IMPLEMENTATIONS}')
  lines = ['| L | core | temporaries | ratio to xla | [H, L, L] float32 scores | compile s |',
           '|---:|---|---:|---:|---:|---:|']
  for L in seq_lens:
    base = None
    for impl in impls:
      r = temporaries(impl, L, heads, kv_heads, head_dim, dtype, blocks, target)
      base = r['temp_bytes'] if impl == 'xla' else base
      ratio = f'{r["temp_bytes"] / base:.3f}' if base else '-'
      lines.append(f'| {L} | {impl} | {r["temp_bytes"] / 2**20:,.1f} MiB | {ratio} | '
                   f'{heads * L * L * 4 / 2**20:,.0f} MiB | {r["compile_s"]:.1f} |')
  return lines

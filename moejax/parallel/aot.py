"""Ahead-of-time compilation for a target (`targets.Target`): abstract inputs, one compile, its figures.

  compile_for(target, fn, *abstract_args) -> Compiled   fn lowered with the kernels set to the target's
                                                        platform and on-chip budget, then compiled by
                                                        the target's compiler; its memory analysis and
                                                        compile seconds
  kernel_cases()                                        the kernel-shape grid (docs/kernels.md)
  compile_kernels(target, case, ways)                   every Pallas kernel of one case, alone (ways=1) or
                                                        inside a `jax.shard_map` over `ways` devices

Used by `train.compile_step` (--mode=compile --target=...), tests/accel_compile_test.py and
`python -m moejax.parallel.aot` (the kernel grid from the command line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax import kernels, routing
from moejax.kernels import gmm, permute, router


@dataclasses.dataclass
class Compiled:
  compiler: str
  compile_s: float
  memory: dict  # argument/output/alias/temp/peak bytes per device ({} if the compiler gave none)
  executable: object = None


def memory_figures(compiled) -> dict:
  """Per-device bytes from a compiled executable's memory analysis; peak = arguments + outputs - aliases + temps."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return dict(argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
              alias_bytes=m.alias_size_in_bytes, temp_bytes=m.temp_size_in_bytes,
              peak_bytes=m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
              + m.temp_size_in_bytes)


def kernel_context(target):
  """Kernels lowered for `target` (None: the local backend)."""
  return kernels.target(target.platform, target.onchip_bytes) if target is not None else contextlib.nullcontext()


def compile_for(target, fn: Callable, *args, jitted=None) -> Compiled:
  """Lowers `fn` (or the given jitted function) on abstract `args` for `target` and compiles it there."""
  start = time.time()
  with kernel_context(target):
    compiled = (jitted or jax.jit(fn)).lower(*args).compile()
  name = target.compiler if target is not None else f'XLA:{jax.default_backend().upper()} (local)'
  return Compiled(name, time.time() - start, memory_figures(compiled), compiled)


@dataclasses.dataclass(frozen=True)
class KernelCase:
  name: str
  num_experts: int
  top_k: int
  model_dim: int  # D
  hidden: int  # F
  tokens: int  # per device
  dtype: str = 'bfloat16'
  block_size: int | None = None  # None: routing.auto_block_size

  @property
  def block(self) -> int:
    return self.block_size or routing.auto_block_size(self.tokens * self.top_k, self.num_experts)


def kernel_cases() -> list[KernelCase]:
  """The PERF.md shapes plus the grid's corners: E 8..256, k 1..8, D and F 512..16384, both dtypes, 1k-64k tokens."""
  return [
      KernelCase('mixtral', 8, 2, 4096, 14336, 4096, block_size=512),
      KernelCase('olmoe', 64, 8, 2048, 1024, 4096),
      KernelCase('qwen-moe', 64, 4, 2048, 1408, 8192),
      KernelCase('fine-128', 128, 8, 2048, 512, 4096),
      KernelCase('small-d', 64, 8, 1024, 512, 16384, 'float32'),
      KernelCase('e256-k8-64k', 256, 8, 512, 512, 65536),
      KernelCase('d16k-k1', 8, 1, 16384, 512, 1024, 'float32'),
      KernelCase('f16k-k3-odd', 16, 3, 512, 16384, 3000, 'float32'),
  ]


def _abstract(mesh, shape, dtype, spec=P()):
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=NamedSharding(mesh, spec))


def _kernels_fn(case: KernelCase):
  """Router, counting sort, row dispatch, the three grouped matmuls (forward, dx, dw) and the combine, with grads."""
  E, k, bs = case.num_experts, case.top_k, case.block

  def loss(logits_TE, x_TD, w_EDF, w_EFD):
    _, experts_TK, gates_TK, _ = router.route(logits_TE, k, impl='pallas')
    plan = routing.block_plan(experts_TK, E + 1, bs, ranks=lambda a, n: permute.expert_ranks(a, n, 'pallas'))
    be = jnp.minimum(plan.block_expert_N, E - 1)  # the padding expert's blocks reuse the last expert's weights
    x_RD = permute.dispatch_rows(x_TD, plan, 'pallas')
    h_RF = gmm.block_gmm(x_RD, w_EDF, be, bs, 'pallas')
    y_RD = gmm.block_gmm(h_RF, w_EFD, be, bs, 'pallas')
    y_TD = permute.combine_rows(y_RD, gates_TK.astype(y_RD.dtype), plan, 'pallas')
    return jnp.sum(y_TD.astype(jnp.float32) ** 2)

  return jax.grad(loss, argnums=(0, 1, 2, 3))


def compile_kernels(target, case: KernelCase, ways: int = 1) -> Compiled:
  """Compiles every kernel of `case` for `target`: on one device, or per device inside a shard_map over `ways`."""
  devices = target.devices()[:ways] if target is not None else jax.devices()[:ways]
  mesh = Mesh(np.array(devices), ('ep',))
  E, D, F, T = case.num_experts, case.model_dim, case.hidden, case.tokens
  shard = (lambda s: P('ep', *([None] * (len(s) - 1)))) if ways > 1 else (lambda s: P())
  shapes = [((T * ways, E), 'float32'), ((T * ways, D), case.dtype), ((E * ways, D, F), case.dtype),
            ((E * ways, F, D), case.dtype)]
  args = [_abstract(mesh, s, d, shard(s)) for s, d in shapes]
  fn = _kernels_fn(case)
  if ways > 1:
    specs = tuple(shard(s) for s, _ in shapes)
    fn = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs)
  return compile_for(target, fn, *args)


def main(argv=None) -> int:
  """python -m moejax.parallel.aot --target=tpu:v5p-8 [--ways=1,4] [--case=NAME]: the kernel grid, one line each."""
  import argparse  # pylint: disable=import-outside-toplevel
  from moejax.parallel import targets  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog='python -m moejax.parallel.aot')
  parser.add_argument('--target', required=True)
  parser.add_argument('--ways', default='1')
  parser.add_argument('--case', default=None)
  a = parser.parse_args(argv)
  target = targets.parse(a.target)
  failed = 0
  for case in kernel_cases():
    if a.case and case.name != a.case:
      continue
    for ways in (int(w) for w in a.ways.split(',')):
      try:
        c = compile_kernels(target, case, ways)
        print(f'{target.name} {case.name} ways={ways}: ok in {c.compile_s:.1f} s, '
              f'temp {c.memory.get("temp_bytes", 0) / 1e9:.3f} GB ({c.compiler})', flush=True)
      except Exception as e:  # pylint: disable=broad-except
        failed += 1
        first = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)
        print(f'{target.name} {case.name} ways={ways}: FAILED {type(e).__name__}: {first[:300]}', flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  raise SystemExit(main())

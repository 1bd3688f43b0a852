"""MoE kernels with plain-jnp reference twins of identical signatures (docs/kernels.md).

Implementations, chosen by `moe.kernels`:
  'reference'  plain jnp; gradients by autodiff (row gathers become scatter-adds);
  'xla'        plain jnp with custom VJPs whose backward passes use only gathers;
  'pallas'     Pallas kernels (router, block grouped matmul); interpret mode on CPU;
  'auto'       the per-platform choice in AUTO.

Each kernel is written per platform family: TPU (Mosaic, scalar prefetch; interpret mode on
CPU) and GPU (Triton: no scalar prefetch, tiles loaded with dynamic offsets). `platform()`
names the family the kernels are lowered for: the default backend, or the one set with
`target(...)`, which lets a CPU machine lower (not run) the GPU and TPU kernels through
`jax.export` (tests/kernels_test.py), or compile them with the real compilers
(`moejax.parallel.targets`). `onchip_bytes()` is the on-chip memory a kernel's tiles may
use on that target (scoped VMEM on TPU, shared memory per block on GPU): every kernel
derives its tiles from it, and a shape whose tiles cannot fit runs the XLA path after
one warning. 'auto' picks 'xla' until a platform's kernels have been
timed on its hardware (no GPU or TPU was lent while they were written; docs/kernels.md).
"""

from __future__ import annotations

import contextlib
import logging

import jax

IMPLEMENTATIONS = ('reference', 'xla', 'pallas')
AUTO = {'cpu': 'xla', 'gpu': 'xla', 'tpu': 'xla'}

log = logging.getLogger(__name__)
_warned: set[str] = set()


_target: tuple[str, int | None] | None = None  # (platform, on-chip bytes or None for its default)

# On-chip bytes a kernel may use when no target names them: the default scoped VMEM of
# v5e/v5p (16 MiB; v6e has 32) and the H100's opt-in shared memory per block. CPU runs
# the TPU kernels interpreted, so it takes the TPU budget (tests then see TPU tiles).
ONCHIP_BYTES = {'tpu': 16 << 20, 'cpu': 16 << 20, 'gpu': 232448}
# Scalar-prefetched operands (the row gather's indices) live in SMEM: 1 MiB on v5p (libtpu 0.0.42.1's
# "would exceed memory (size=1048576)" at 524,288 indices); half of it for one call's indices.
TPU_SMEM_INDEX_BYTES = 512 << 10
MOSAIC_VMEM_SHARE = 0.75  # of the scoped VMEM a kernel plans for: the rest for Mosaic's own scratch


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform the kernels are lowered for."""
  return _target[0] if _target else jax.default_backend()


def deviceless() -> bool:
  """True inside `target(...)`: lowering for a compile target, not for this machine's devices."""
  return _target is not None


def onchip_bytes() -> int:
  """The on-chip memory (scoped VMEM on TPU, shared memory per block on GPU) a kernel's tiles may use."""
  if _target and _target[1]:
    return _target[1]
  return ONCHIP_BYTES.get(platform(), ONCHIP_BYTES['tpu'])


@contextlib.contextmanager
def target(name: str, onchip: int | None = None):
  """Lower kernels for platform `name` (with `onchip` bytes of VMEM / shared memory) inside this block.

  For `jax.export(..., platforms=...)`, or compiling over a `moejax.parallel.targets` target's devices.
  """
  global _target  # pylint: disable=global-statement
  previous, _target = _target, (name, onchip)
  try:
    yield
  finally:
    _target = previous


def mosaic_block_ok(block: tuple[int | None, ...], array: tuple[int, ...]) -> bool:
  """Mosaic's rule: a block's last two dims divide by (8, 128) or equal the array's (None: a squeezed 1)."""
  block = tuple(1 if b is None else b for b in block)
  checks = [(block[-1], array[-1], 128)] + ([(block[-2], array[-2], 8)] if len(block) > 1 else [])
  return all(b == a or (b % m == 0 and a % b == 0) for b, a, m in checks)


def resolve(impl: str) -> str:
  """The implementation to use for `impl` ('auto' -> AUTO[platform])."""
  if impl == 'auto':
    return AUTO.get(platform(), 'xla')
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'kernel implementation {impl!r} must be auto or one of {IMPLEMENTATIONS}')
  return impl


def interpret() -> bool:
  """Pallas runs in interpret mode on CPU (the only mode XLA:CPU supports)."""
  return platform() == 'cpu'


def _manual_types(arrays):
  """(each array's manual-axis type or None, the union of their varying axes)."""
  types = [getattr(jax.typeof(x), 'manual_axis_type', None) for x in arrays]
  return types, frozenset().union(*(t.varying for t in types if t is not None))


def out_struct(shape, dtype, *likes) -> jax.ShapeDtypeStruct:
  """A pallas_call output type; inside `jax.shard_map` it varies over the union of `likes`' manual axes.

  shard_map's type checking (check_vma) needs that on every Pallas output.
  """
  types, varying = _manual_types(likes)
  if not varying:
    return jax.ShapeDtypeStruct(shape, dtype)
  kind = type(next(t for t in types if t is not None))
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=kind(varying=varying))


def same_vma(*arrays):
  """`arrays` cast to vary over the union of their manual axes (no-op outside `jax.shard_map`).

  A custom VJP's backward must return cotangents with its inputs' types; casting before the
  call makes autodiff of the cast do the psum that an input invariant over an axis needs
  (e.g. expert weights shared by the data shards of an expert-parallel region).
  """
  types, union = _manual_types(arrays)
  if any(t is None for t in types):
    return arrays
  return tuple(x if t.varying == union else jax.lax.pcast(x, tuple(sorted(union - t.varying)), to='varying')
               for x, t in zip(arrays, types))


def unpartitionable() -> bool:
  """True when a Mosaic (TPU) kernel would be traced on a multi-device mesh outside any `jax.shard_map`.

  XLA cannot partition a Mosaic custom call ("Mosaic kernels cannot be automatically
  partitioned"): the kernels then run the XLA path (one warning). Inside the expert-parallel
  shard_map every axis is manual and the kernels run per device. Triton calls compile either way.
  """
  if platform() != 'tpu':
    return False
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.size > 1 and not mesh.manual_axes


def fallback_outside_shard_map(what: str, impl: str) -> str:
  """`impl`, or 'xla' (warned once) when a 'pallas' TPU kernel would sit outside a shard_map on a mesh."""
  if impl == 'pallas' and unpartitionable():
    warn_once(f'mosaic-partition-{what}', f'moe.kernels=pallas: the TPU {what} kernel would run on a multi-device '
              'mesh outside a shard_map, which XLA cannot partition; using the XLA path there')
    return 'xla'
  return impl


def warn_once(key: str, message: str) -> None:
  """Logs `message` once per process (for fallbacks from a kernel to the XLA path)."""
  if key not in _warned:
    _warned.add(key)
    log.warning(message)

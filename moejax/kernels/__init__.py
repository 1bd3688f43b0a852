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
`jax.export` (tests/kernels_test.py). 'auto' picks 'xla' until a platform's kernels have been
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


_target: str | None = None


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform the kernels are lowered for."""
  return _target or jax.default_backend()


@contextlib.contextmanager
def target(name: str):
  """Lower kernels for platform `name` inside this block (with `jax.export(..., platforms=...)`)."""
  global _target  # pylint: disable=global-statement
  previous, _target = _target, name
  try:
    yield
  finally:
    _target = previous


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


def warn_once(key: str, message: str) -> None:
  """Logs `message` once per process (for fallbacks from a kernel to the XLA path)."""
  if key not in _warned:
    _warned.add(key)
    log.warning(message)

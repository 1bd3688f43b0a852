"""MoE kernels with plain-jnp reference twins of identical signatures (docs/kernels.md).

Implementations, chosen by `moe.kernels`:
  'reference'  plain jnp; gradients by autodiff (row gathers become scatter-adds);
  'xla'        plain jnp with custom VJPs whose backward passes use only gathers;
  'pallas'     Pallas kernels (router, block grouped matmul); interpret mode on CPU;
  'auto'       the per-platform choice in AUTO.

The Pallas kernels use TPU-style scalar prefetch (`pltpu.PrefetchScalarGridSpec`): they run
in interpret mode on CPU and are written for Mosaic TPU; a GPU (Triton / Mosaic GPU) grouped
matmul is the next issue's work, so 'auto' picks 'xla' until a platform's kernels are
verified on its hardware.
"""

from __future__ import annotations

import logging

import jax

IMPLEMENTATIONS = ('reference', 'xla', 'pallas')
AUTO = {'cpu': 'xla', 'gpu': 'xla', 'tpu': 'xla'}

log = logging.getLogger(__name__)
_warned: set[str] = set()


def resolve(impl: str) -> str:
  """The implementation to use for `impl` ('auto' -> AUTO[backend])."""
  if impl == 'auto':
    return AUTO.get(jax.default_backend(), 'xla')
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'kernel implementation {impl!r} must be auto or one of {IMPLEMENTATIONS}')
  return impl


def interpret() -> bool:
  """Pallas runs in interpret mode on CPU (the only mode XLA:CPU supports)."""
  return jax.default_backend() == 'cpu'


def warn_once(key: str, message: str) -> None:
  """Logs `message` once per process (for fallbacks from a kernel to the XLA path)."""
  if key not in _warned:
    _warned.add(key)
    log.warning(message)

"""What the benchmark commands share: the device line, fake CPU devices, interleaved timing."""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags

from moejax.errors import ConfigError


def device_line() -> str:
  """'<device kind> (<backend>) x<count>, jax <version>, <n> CPUs': the header every benchmark prints."""
  import jax  # pylint: disable=import-outside-toplevel
  return (f'{jax.devices()[0].device_kind} ({jax.default_backend()}) x{jax.device_count()}, jax {jax.__version__}, '
          f'{os.cpu_count()} CPUs, python {sys.version.split()[0]}')


def command(main_fn):
  """main_fn(argv) that refuses positional arguments and fakes --cpu_devices CPU devices (when defined) first."""

  def wrapped(argv):
    if len(argv) > 1:
      raise ConfigError(f'unexpected argument {argv[1]!r} (this command takes flags only; see --help)')
    # Must happen before the first device query starts the CPU backend.
    if 'cpu_devices' in flags.FLAGS and flags.FLAGS.cpu_devices:
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                                 + f' --xla_force_host_platform_device_count={flags.FLAGS.cpu_devices}')
    return main_fn(argv)

  return wrapped


def time_medians(fns: dict, rounds: int, reps: int = 3) -> dict:
  """Median seconds per call of each jitted fn(), interleaved rounds after one warm-up call each.

  A fn whose warm-up call raises (out of memory, a compile error) gets None, and the error's first
  line is logged, so one failing variant does not lose the others' timings.
  """
  import jax  # pylint: disable=import-outside-toplevel
  times = {}
  for k, f in fns.items():
    try:
      jax.block_until_ready(f())
      times[k] = []
    except Exception as e:  # pylint: disable=broad-except
      print(f'benchmark: {k} failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ""}',
            file=sys.stderr, flush=True)
  for _ in range(rounds):
    for k in times:
      t0 = time.perf_counter()
      for _ in range(reps):
        out = fns[k]()
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t0) / reps)
  return {k: statistics.median(times[k]) if k in times else None for k in fns}


def ratio(a: float | None, b: float | None) -> float | None:
  """a / b, or None when either is missing."""
  return None if a is None or b is None else a / b


def check_positive(**values) -> None:
  """One ConfigError line for the first flag under 1 (None values are unset flags)."""
  for name, value in values.items():
    if value is not None and value < 1:
      raise ConfigError(f'--{name}={value} must be >= 1')

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
  """Median seconds per call of each jitted fn(), interleaved rounds after one warm-up call each."""
  import jax  # pylint: disable=import-outside-toplevel
  for f in fns.values():
    jax.block_until_ready(f())
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      for _ in range(reps):
        out = f()
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t0) / reps)
  return {k: statistics.median(v) for k, v in times.items()}


def check_positive(**values) -> None:
  """One ConfigError line for the first flag under 1 (None values are unset flags)."""
  for name, value in values.items():
    if value is not None and value < 1:
      raise ConfigError(f'--{name}={value} must be >= 1')

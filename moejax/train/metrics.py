"""Run outputs: metrics to JSONL, TensorBoard and (optionally) W&B, MFU bookkeeping."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator

import numpy as np

# bf16 dense peak FLOP/s per device, by `device_kind` substring (PERF.md §3; TPU figures from vendor docs).
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'TPU v5p': 459e12, 'TPU v6': 918e12,
              'TPU v5 lite': 197e12, 'TPU v4': 275e12}


def to_jsonable(x: Any) -> Any:
  """Converts arrays and numpy scalars inside nested containers to JSON types."""
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, np.generic)) or type(x).__module__.startswith('jax'):
    arr = np.asarray(x)
    return arr.item() if arr.ndim == 0 else arr.tolist()
  return x


def peak_flops(override_tflops: float | None) -> float | None:
  """Per-device peak FLOP/s for MFU: the config override, else a lookup by device kind (None on CPU)."""
  if override_tflops is not None:
    return override_tflops * 1e12
  import jax  # pylint: disable=import-outside-toplevel  (the study tools import this module without jax)
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return None


def scalar_items(record: dict[str, Any]) -> Iterator[tuple[str, int | float]]:
  """The finite numbers of a metrics row but its `step`, a list's items as `key/i` (per MoE layer): what is charted."""
  for key, value in record.items():
    if key == 'step':
      continue
    items = [(f'{key}/{i}', v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
    for name, v in items:
      if isinstance(v, (int, float)) and math.isfinite(v):
        yield name, v


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl, its scalars to TensorBoard and to a W&B tracker."""

  def __init__(self, workdir: str, enabled: bool = True, tracker=None):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled  # False on every process but the leader of a multi-process run
    self.tracker = tracker  # a moejax.train.tracking.Tracker (its owner, run.execute, finishes it), or None
    self._tb = None
    if not enabled:
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:
      pass

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': step, **to_jsonable(scalars)}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for key, value in scalar_items(record):
        self._tb.add_scalar(key, value, step)
    if self.tracker is not None:
      self.tracker.log(step, record)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()

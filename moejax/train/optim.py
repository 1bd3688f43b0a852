"""The optax chain (global-norm clipping, then AdamW) and the learning-rate schedules.

The learning rate is not inside the optimizer: the train step takes it as an argument, and
the loop reads it from `learning_rates(...)`, a table computed once per run. One compiled
step therefore serves every schedule, peak learning rate and run length (a learning-rate
sweep or a decay branch never recompiles). The optimizer keeps a unit schedule, so its
state has the same layout as before the schedule moved out (old checkpoints restore).

Schedules (`optim.schedule`): 'cosine' decays from the end of warmup to final_lr_fraction x
peak at the last step; 'wsd' (warmup-stable-decay) holds the peak until the last
`optim.decay_fraction` of the steps, then decays linearly to final_lr_fraction x peak. In
WSD the learning rate of a step before the decay does not depend on the run's length (once
warmup is over), so runs of different lengths share their stable phase.

Decay branches (`optim.decay_branches`, WSD only): a branch ending at T_b steps is the WSD
run of length T_b that shares the main run's warmup and stable phase: it leaves the stable
phase at T_b - round(decay_fraction * T_b) and decays linearly to the final learning rate at
T_b (Hägele et al. 2024: such branches match separate runs of each length).

Weight decay applies to weight matrices only: vectors, norm scales (OLMoE's [H, K] QK-norm scale included) and
the attention's [H, K] biases are never decayed.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax


def wsd(peak: float, warmup: int, decay_start: int, decay_end: int, final: float) -> optax.Schedule:
  """Linear warmup 0 -> peak over `warmup` steps, peak until `decay_start`, linear to `final` at `decay_end`."""
  return optax.join_schedules([
      optax.linear_schedule(0.0, peak, max(warmup, 1)),
      optax.constant_schedule(peak),
      optax.linear_schedule(peak, final, max(decay_end - decay_start, 1)),
  ], [max(warmup, 1), max(decay_start, warmup + 1)])


def warmup_steps(optim_cfg, total_steps: int) -> int:
  return int(round(optim_cfg.warmup_fraction * total_steps))


def decay_start(optim_cfg, end: int) -> int:
  """The step at which a WSD run (or branch) of `end` steps leaves the stable phase."""
  return end - int(round(optim_cfg.decay_fraction * end))


def schedule(optim_cfg, total_steps: int, end: int | None = None) -> optax.Schedule:
  """The learning rate of each step (the optimizer's update count) of a run of `total_steps` steps.

  `end` (WSD only): the decay branch that ends at step `end` (main warmup and stable phase).
  """
  peak = optim_cfg.peak_learning_rate
  warmup = warmup_steps(optim_cfg, total_steps)
  if optim_cfg.schedule == 'wsd':
    end = total_steps if end is None else end
    return wsd(peak, warmup, decay_start(optim_cfg, end), end, peak * optim_cfg.final_lr_fraction)
  if end is not None:
    raise ValueError('decay branches need optim.schedule=wsd')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=peak * optim_cfg.final_lr_fraction)


def learning_rates(optim_cfg, total_steps: int, end: int | None = None) -> np.ndarray:
  """float32 [n]: the learning rate of steps 0..n-1 (n = end or total_steps), computed once on the host."""
  n = total_steps if end is None else end
  return np.asarray(jax.vmap(schedule(optim_cfg, total_steps, end))(np.arange(n)), np.float32)


def branch_ends(optim_cfg, total_steps: int) -> list[int]:
  """The lengths T_b of the decay branches (`optim.decay_branches`: fractions of train.steps), ascending."""
  text = str(optim_cfg.decay_branches or '').strip()
  if not text:
    return []
  return sorted({int(round(float(f) * total_steps)) for f in text.split(',') if f.strip()})


# Parameters of two or more axes that are not weight matrices: norm scales (a projection-wide QK-norm's is [H, K])
# and the attention's [H, K] query/key/value biases (moejax/model/layers.py).
NO_DECAY_NAMES = ('scale', 'bq', 'bk', 'bv')


def decay_mask(spans=None):
  """The weight-decay mask of a parameter tree: True for weight matrices, False for vectors and `NO_DECAY_NAMES`
  (norm scales, attention biases), the rank judged per layer (a scanned model's stacked leaves, `model.stack`,
  carry one more leading axis)."""
  from moejax.model import stack  # pylint: disable=import-outside-toplevel
  stacked = {i for i, (_, _, r) in enumerate(stack.entries(spans)) if r > 1}

  def mask(params: Any) -> Any:
    def per_leaf(path, p):
      keys = [getattr(k, 'key', None) for k in path[:2]]
      if getattr(path[-1], 'key', None) in NO_DECAY_NAMES:
        return False
      return p.ndim - (1 if keys[0] == 'blocks' and keys[1] in stacked else 0) >= 2
    return jax.tree_util.tree_map_with_path(per_leaf, params)
  return mask


def for_run(cfg) -> optax.GradientTransformation:
  """`make` for a run's whole config: its optimizer section, on the layout its model stores (`model.stack`)."""
  from moejax.model import stack  # pylint: disable=import-outside-toplevel
  return make(cfg.optim, stack.storage_spans(cfg))


def make(optim_cfg, spans=None) -> optax.GradientTransformation:
  """The optimizer at unit learning rate: the train step multiplies its updates by the step's learning rate.

  AdamW's update is -lr * (adam + wd * p), so scaling a unit-rate update by lr is exactly AdamW
  at lr (decoupled weight decay included). `spans`: a scanned model's stored layout (`model.stack.storage_spans`).
  """
  adamw = optax.adamw(lambda count: 1.0, b1=optim_cfg.adam_b1, b2=optim_cfg.adam_b2,
                      eps=optim_cfg.adam_eps, weight_decay=optim_cfg.weight_decay, mask=decay_mask(spans))
  if optim_cfg.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), adamw)
  return adamw

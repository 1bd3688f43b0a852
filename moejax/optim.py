"""The optax chain: global-norm clipping, then AdamW with linear warmup and a cosine or WSD decay.

Schedules (`optim.schedule`): 'cosine' decays from the end of warmup to final_lr_fraction x
peak at the last step; 'wsd' (warmup-stable-decay) holds the peak until the last
`optim.decay_fraction` of the steps, then decays linearly to final_lr_fraction x peak. In
WSD the learning rate of a step before the decay does not depend on the run's length (once
warmup is over), so runs of different lengths share their stable phase.

Weight decay applies to matrices only (ndim >= 2): norm scales are never decayed.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def wsd(peak: float, warmup: int, decay_start: int, decay_end: int, final: float) -> optax.Schedule:
  """Linear warmup 0 -> peak over `warmup` steps, peak until `decay_start`, linear to `final` at `decay_end`."""
  return optax.join_schedules([
      optax.linear_schedule(0.0, peak, max(warmup, 1)),
      optax.constant_schedule(peak),
      optax.linear_schedule(peak, final, max(decay_end - decay_start, 1)),
  ], [max(warmup, 1), max(decay_start, warmup + 1)])


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over warmup_fraction*steps, then cosine or WSD to final_lr_fraction * peak."""
  peak = optim_cfg.peak_learning_rate
  warmup = int(round(optim_cfg.warmup_fraction * total_steps))
  if optim_cfg.schedule == 'wsd':
    decay_start = total_steps - int(round(optim_cfg.decay_fraction * total_steps))
    return wsd(peak, warmup, decay_start, total_steps, peak * optim_cfg.final_lr_fraction)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=peak * optim_cfg.final_lr_fraction)


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay (matrices), False for vectors (norm scales)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """The optimizer for a run of `total_steps` steps."""
  adamw = optax.adamw(schedule(optim_cfg, total_steps), b1=optim_cfg.adam_b1, b2=optim_cfg.adam_b2,
                      eps=optim_cfg.adam_eps, weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  if optim_cfg.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip_norm), adamw)
  return adamw

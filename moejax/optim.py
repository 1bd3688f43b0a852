"""The optax chain: global-norm clipping, then AdamW with linear warmup and cosine decay.

Weight decay applies to matrices only (ndim >= 2): norm scales are never decayed.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over warmup_fraction*steps, then cosine to final_lr_fraction * peak."""
  peak = optim_cfg.peak_learning_rate
  warmup = int(round(optim_cfg.warmup_fraction * total_steps))
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

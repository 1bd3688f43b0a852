"""Upcycling vs from scratch at matched total training FLOPs (docs/studies.md, "Upcycling"), tiny, on CPU.

Question: does an MoE upcycled from a dense run beat an MoE trained from scratch when both
are charged the same total compute (the dense pretraining included)?
  dense     a dense SwiGLU LM (d=64, L=2, F=256), 200 steps;
  upcycled  E=8, k=2 experts of hidden 128 (granular upcycling, G=2: each expert one half of
            the dense FFN), zero router, renormalized gates x2 (the first forward equals the
            dense model's up to the 1% noise), 200 more steps from the dense checkpoint;
  scratch   the same MoE from random init, run long enough that its FLOPs equal dense + upcycled.
The MoE's active FFN equals the dense FFN, so FLOPs per token differ only by the router.

Run (one at a time; each point about 1-2 minutes on a shared 2-core CPU):
  python -m moejax.main --config=experiments/upcycling_tiny.py:dense --workdir=runs/upcycling/dense
  python -m moejax.main --config=experiments/upcycling_tiny.py:upcycled --config.seed=S --config.data.seed=S \
      --config.train.init_from=runs/upcycling/dense --workdir=runs/upcycling/upcycled_sS
  python -m moejax.main --config=experiments/upcycling_tiny.py:scratch --config.seed=S --config.data.seed=S \
      --workdir=runs/upcycling/scratch_sS
"""

import math

from moejax import base_config as base, config as config_lib
from moejax.model import accounting

ARGS = ('dense', 'upcycled', 'scratch')
STEPS = 200


def get_config(arg=None):
  """arg: 'dense', 'upcycled' (set train.init_from) or 'scratch' (steps matched to dense + upcycled FLOPs)."""
  c = base.get_config()
  c.name = f'upcycling-{arg or "dense"}'
  c.model.model_dim, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 64, 2, 2, 2
  c.model.ffn_hidden = 256
  c.moe.num_experts = 0 if arg in (None, 'dense') else 8
  c.moe.experts_per_token, c.moe.expert_hidden = 2, 128
  c.moe.use_renormalized_gates, c.moe.routed_scaling_factor = True, 2.0
  c.train.init_from_noise = 0.01
  c.data.seq_len, c.train.batch_size, c.train.steps = 64, 16, STEPS
  c.optim.peak_learning_rate = 4e-3
  c.checkpoint.every_steps = STEPS
  if arg == 'scratch':
    c.train.steps = matched_steps(c)
  return c


def matched_steps(moe_cfg) -> int:
  """MoE steps whose FLOPs equal the dense run's plus the upcycled run's (same batch and length)."""
  dense = config_lib.validate(config_lib.apply_overrides(moe_cfg, {'moe.num_experts': 0}))
  per_token_dense = accounting.count(dense)['flops_per_token']
  per_token_moe = accounting.count(config_lib.validate(moe_cfg))['flops_per_token']
  return int(round(STEPS + STEPS * per_token_dense / per_token_moe))

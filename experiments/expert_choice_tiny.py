"""Token choice vs expert choice at matched compute (docs/studies.md, "Expert-choice routing"), tiny, on CPU.

Question: at the same FLOPs per token, data, schedule and learning rate, does expert-choice
routing (each expert takes its C best tokens of a group) reach a different held-out loss than
top-2 token choice on a tiny byte-level LM?

Both: d=64, L=2, 2 heads, sequences of 64 bytes, batch 16, E=8 experts of hidden 128, k=2
(the mean experts per token), 300 steps, AdamW at peak 4e-3 (the tiny grids' rate, experiments/papers.py)
with the base cosine schedule (5% warmup), z-loss 1e-3, held-out scores every 50 steps at
eval.batch_size=16 (the training batch: expert choice then groups as many tokens at eval as in training).
  token_choice   softmax top-2, dropless, renormalized gates x k (every selected gate about 1, the
                 grids' convention, experiments/papers.py `gates`), global-batch balancing at 0.01
                 (the base config's study default).
  expert_choice  moe.routing='expert_choice': softmax scores, C = ceil(k*B/E) = ceil(2*16/8) = 4 tokens
                 per expert per position; k*B/E = 4 is whole, so each token gets exactly k=2 experts on
                 average and FLOPs per token equal token choice's (check with moejax.accounting).
                 Validation requires load_balancing='none', no capacity factors, no renormalization.
                 Gate scale rule: routed_scaling_factor = E. At uniform routing a softmax score is 1/E,
                 so an expert-choice gate is 1/E * E = 1, the value of a token-choice gate
                 (renormalized 1/k, times k); both routings start with gates of the same size.
Caveat: expert-choice groups are the batch's tokens at one position (causal, docs/studies.md),
so a token's routing depends on the other sequences of its batch, and held-out scores on eval.batch_size.

Run (one at a time; each about 1-3 minutes on a shared 2-core CPU), S = 0, 1, ..., 7 (the shipped seeds):
  python -m moejax.accounting --config=experiments/expert_choice_tiny.py:token_choice
  python -m moejax.accounting --config=experiments/expert_choice_tiny.py:expert_choice
  python -m moejax.main --config=experiments/expert_choice_tiny.py:token_choice --config.seed=S --config.data.seed=S \
      --workdir=runs/expert_choice/tc_sS
  python -m moejax.main --config=experiments/expert_choice_tiny.py:expert_choice --config.seed=S --config.data.seed=S \
      --workdir=runs/expert_choice/ec_sS
Then copy each workdir's result.json and metrics.jsonl to docs/results/expert_choice/{tc,ec}_sS/ and
run python docs/results/expert_choice/make_report.py.
"""

from moejax import base_config as base
from moejax.errors import ConfigError

ARGS = ('token_choice', 'expert_choice')
STEPS = 300


def get_config(arg=None):
  """arg: 'token_choice' (default) or 'expert_choice'; everything else is shared."""
  arg = arg or 'token_choice'
  if arg not in ARGS:
    raise ConfigError(f'experiments/expert_choice_tiny.py: arg {arg!r} must be one of {ARGS}')
  c = base.get_config()
  c.name = f'expert-choice-tiny-{arg}'
  c.model.model_dim, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 64, 2, 2, 2
  c.moe.num_experts, c.moe.experts_per_token, c.moe.expert_hidden = 8, 2, 128
  c.data.seq_len, c.train.batch_size, c.train.steps = 64, 16, STEPS
  c.optim.peak_learning_rate = 4e-3
  c.eval.batch_size, c.eval.every_steps = 16, 50
  c.checkpoint.every_steps = STEPS
  if arg == 'token_choice':
    c.moe.use_renormalized_gates, c.moe.routed_scaling_factor = True, float(c.moe.experts_per_token)
  else:
    c.moe.routing, c.moe.load_balancing = 'expert_choice', 'none'
    c.moe.use_renormalized_gates, c.moe.routed_scaling_factor = False, float(c.moe.num_experts)
  return c

"""Quickstart (the main job of `make run`): does adding experts help at equal active parameters?

Four byte-level LMs on the Python stdlib, equal active parameters per token, the same
data order, 2 layers, d=64: a dense SwiGLU baseline and MoE variants with 4, 16 and 64
fine-grained experts, each with top-2 of experts half the dense FFN width
(sparsity s = 2, 8, 32). Expected: held-out loss falls as total experts grow.

Gates are renormalized over the top-2 (Mixtral style). With raw softmax gates (the
Switch/OLMoE default in base.py) the top-2 gates sum to about 2/E at initialization, which
shrinks the MoE FFN output 8-32x relative to the dense FFN; in 300 steps that handicap
dominated (measured on a 2-core CPU: dense 2.172, E16 2.256, E64 2.351 nats/token raw,
versus E16 2.059, E64 2.032 renormalized).

Run:   make run   (= python -m moejax.sweep --config=experiments/quickstart.py --root=runs/quickstart)
Cost:  about 4 minutes of training on a 2-core CPU in all (50-60 s per point; measured 2026-12-06, see README.md).
"""

from moejax import base_config as base


def get_config(arg=None):
  """The shared settings of every quickstart point."""
  del arg
  c = base.get_config()
  c.name = 'quickstart'
  c.model.model_dim = 64
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.num_kv_heads = 2
  c.model.ffn_hidden = 256
  c.moe.num_experts = 0
  c.moe.experts_per_token = 2
  c.moe.expert_hidden = 128
  c.moe.use_renormalized_gates = True
  c.data.seq_len = 128
  c.train.steps = 300
  c.train.batch_size = 32
  c.optim.peak_learning_rate = 4e-3
  c.checkpoint.every_steps = 300
  return c


def get_sweep(arg=None):
  """Dense baseline plus MoE variants that differ only in total experts."""
  del arg
  return [
      {'name': 'dense', 'moe.num_experts': 0},
      {'name': 'moe-e4-k2', 'moe.num_experts': 4},
      {'name': 'moe-e16-k2', 'moe.num_experts': 16},
      {'name': 'moe-e64-k2', 'moe.num_experts': 64},
  ]

"""Decode models big enough that a CPU decode step is bound by memory traffic: the bandwidth model's CPU check.

Question: when a decode step reads hundreds of MB, does `moejax.inference.cost`'s bytes / bandwidth
predict its time? (The quickstart and tiny models read under 2 MB a step, so their steps are
dominated by per-op overhead: docs/inference.md.)

Run (about 3 minutes on 2 cores, 2 GB of memory; random weights, no training):
  python -m moejax.bench decode --config=experiments/bench/decode_cpu.py --batches=1,8,64 --decode_steps=8

4 layers, d = 1024 (16 heads of 64), byte vocabulary, float32 weights. Three points of equal
active parameters: a dense SwiGLU of hidden 2048, 16 experts of hidden 1024 with top-2, and 64
experts of hidden 256 with top-8 (the last two equal in N_total and in sparsity s = 8, so the
model predicts equal bytes per step at every batch size: the touched fraction 1 - (1 - 1/s)^B
depends on s and B only).
"""

from moejax import base_config as base


def get_config(arg=None):
  """The shared settings."""
  del arg
  c = base.get_config()
  c.name = 'decode-cpu'
  c.model.model_dim = 1024
  c.model.num_layers = 4
  c.model.num_heads = 16
  c.model.num_kv_heads = 16
  c.model.ffn_hidden = 2048
  c.moe.num_experts = 16
  c.moe.experts_per_token = 2
  c.moe.expert_hidden = 1024
  c.moe.use_renormalized_gates = True
  c.data.seq_len = 128
  return c


def get_sweep(arg=None):
  """Dense, coarse MoE, fine-grained MoE at equal active parameters."""
  del arg
  return [
      {'name': 'dense-f2048', 'moe.num_experts': 0},
      {'name': 'e16k2f1024'},
      {'name': 'e64k8f256', 'moe.num_experts': 64, 'moe.experts_per_token': 8, 'moe.expert_hidden': 256},
  ]

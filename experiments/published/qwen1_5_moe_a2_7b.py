"""Qwen1.5-MoE-A2.7B (Qwen team 2024), the Qwen2-MoE layout: 24 layers, D=2048, 16 heads with q/k/v biases,
60 experts of 1408 (softmax top-4, not renormalized) plus a shared expert of 5632 behind a sigmoid gate.

Published: 14.3B total, 2.7B active parameters. Not trained here.
"""

from moejax import base_config as base
from experiments.published import shrink

ARGS = ('tiny',)  # ':tiny': the same design shrunk to train in seconds on CPU


def get_config(arg=None):
  c = base.get_config()
  c.name = 'qwen1.5-moe-a2.7b'
  c.model.vocab_size = 151936
  c.model.model_dim = 2048
  c.model.num_layers = 24
  c.model.num_heads = 16
  c.model.num_kv_heads = 16
  c.model.ffn_hidden = 5632
  c.model.rope_base = 1e6
  c.model.use_qkv_bias = True
  c.model.use_tied_embeddings = False
  c.moe.num_experts = 60
  c.moe.experts_per_token = 4
  c.moe.expert_hidden = 1408
  c.moe.num_shared_experts = 1
  c.moe.shared_expert_hidden = 5632
  c.moe.use_shared_expert_gate = True
  c.moe.aux_loss_coef = 0.001
  c.data.seq_len = 8192
  return shrink(c) if arg == 'tiny' else c

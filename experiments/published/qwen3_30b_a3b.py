"""Qwen3-30B-A3B (Qwen team 2025): 48 layers, D=2048, GQA 32/4 with head dim 128, 128 experts of 768, top-8.

Published: 30.5B total (29.9B non-embedding), 3.3B active parameters. Not trained here.
"""

from moejax import base_config as base
from experiments.published import shrink

ARGS = ('tiny',)  # ':tiny': the same design shrunk to train in seconds on CPU


def get_config(arg=None):
  c = base.get_config()
  c.name = 'qwen3-30b-a3b'
  c.model.vocab_size = 151936
  c.model.model_dim = 2048
  c.model.num_layers = 48
  c.model.num_heads = 32
  c.model.num_kv_heads = 4
  c.model.head_dim = 128
  c.model.ffn_hidden = 6144
  c.model.use_qk_norm = True
  c.model.rope_base = 1e6  # rope_theta of the released config.json
  c.model.use_tied_embeddings = False
  c.moe.num_experts = 128
  c.moe.experts_per_token = 8
  c.moe.expert_hidden = 768
  c.moe.use_renormalized_gates = True
  c.moe.load_balancing = 'global_batch'
  c.data.seq_len = 32768
  return shrink(c) if arg == 'tiny' else c

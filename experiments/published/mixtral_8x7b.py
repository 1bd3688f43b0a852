"""Mixtral-8x7B (Jiang et al. 2024): 32 layers, D=4096, GQA 32/8, 8 experts of 14336, top-2.

Published: 46.7B total, 12.9B active parameters. Not trained here.
"""

from moejax import base_config as base
from experiments.published import shrink

ARGS = ('tiny',)  # ':tiny': the same design shrunk to train in seconds on CPU


def get_config(arg=None):
  c = base.get_config()
  c.name = 'mixtral-8x7b'
  c.model.vocab_size = 32000
  c.model.model_dim = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.ffn_hidden = 14336
  c.model.rope_base = 1e6
  c.model.norm_eps = 1e-5  # rms_norm_eps of the released config.json
  c.model.use_tied_embeddings = False
  c.moe.num_experts = 8
  c.moe.experts_per_token = 2
  c.moe.use_renormalized_gates = True
  c.data.seq_len = 32768
  return shrink(c) if arg == 'tiny' else c

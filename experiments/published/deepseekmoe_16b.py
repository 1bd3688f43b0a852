"""DeepSeekMoE-16B (Dai et al. 2024): 28 layers, D=2048, first layer dense (10944), then 2 shared +
64 routed fine-grained experts of 1408, top-6.

Published: 16.4B total, 2.8B active parameters. Not trained here.
"""

from moejax import base_config as base
from experiments.published import shrink

ARGS = ('tiny',)  # ':tiny': the same design shrunk to train in seconds on CPU


def get_config(arg=None):
  c = base.get_config()
  c.name = 'deepseekmoe-16b'
  c.model.vocab_size = 102400
  c.model.model_dim = 2048
  c.model.num_layers = 28
  c.model.num_heads = 16
  c.model.num_kv_heads = 16
  c.model.ffn_hidden = 10944
  c.model.use_tied_embeddings = False
  c.moe.first_dense_layers = 1
  c.moe.num_experts = 64
  c.moe.experts_per_token = 6
  c.moe.expert_hidden = 1408
  c.moe.num_shared_experts = 2
  c.moe.shared_expert_hidden = 1408
  c.moe.aux_loss_coef = 0.001
  c.data.seq_len = 4096
  return shrink(c) if arg == 'tiny' else c

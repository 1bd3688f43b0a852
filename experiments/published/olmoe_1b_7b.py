"""OLMoE-1B-7B (Muennighoff et al. 2024): 16 layers, D=2048, 16 heads, 64 experts of 1024, top-8, QK-norm.

Published: 6.9B total, 1.3B active parameters. Not trained here. OLMoE normalizes the whole
query/key projections (model.qk_norm_scope='projection', 2*2048 scales per layer).
"""

from moejax import base_config as base
from experiments.published import shrink

ARGS = ('tiny',)  # ':tiny': the same design shrunk to train in seconds on CPU


def get_config(arg=None):
  c = base.get_config()
  c.name = 'olmoe-1b-7b'
  c.model.vocab_size = 50304
  c.model.model_dim = 2048
  c.model.num_layers = 16
  c.model.num_heads = 16
  c.model.num_kv_heads = 16
  c.model.ffn_hidden = 1024
  c.model.use_qk_norm = True
  c.model.qk_norm_scope = 'projection'  # OLMoE normalizes the whole H*d_h query and key projections
  c.model.norm_eps = 1e-5  # rms_norm_eps of the released config.json
  c.model.use_tied_embeddings = False
  c.moe.num_experts = 64
  c.moe.experts_per_token = 8
  c.moe.expert_hidden = 1024
  c.moe.aux_loss_coef = 0.01
  c.moe.z_loss_coef = 0.001
  c.data.seq_len = 4096
  return shrink(c) if arg == 'tiny' else c

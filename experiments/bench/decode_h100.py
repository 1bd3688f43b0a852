"""A decode model big enough that an H100 decode step is bound by memory traffic: the bandwidth model's GPU check.

Question: on an H100 (about 3 TB/s), does `moejax.inference.cost`'s bytes / bandwidth predict a
decode step's time within 2x (issue 29's target)? A step of the CPU check's models
(experiments/bench/decode_cpu.py, ~100 MB) takes ~30 us at 3 TB/s, below the per-step
dispatch cost, so this one reads GBs: OLMoE's width and expert shapes (d 2048, 16 heads of 128,
64 experts of hidden 1024, top-8) over 4 layers, float32 weights (6.4 GB of experts): a
batch of 1 reads about 1.1 GB a step (8 of 64 experts per layer), a batch of 64 nearly all.

Run (needs a GPU; about a minute, random weights, no training), as launch/gpu_check.sh does:
  python -m moejax.bench.decode --config=experiments/bench/decode_h100.py --batches=1,64 --decode_steps=16 --rounds=3
`:tiny` is the same at CPU size (the check's dry run).
"""

from experiments import base

ARGS = ('tiny',)


def get_config(arg=None):
  c = base.get_config()
  c.name = 'decode-h100'
  m = c.model
  m.model_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.ffn_hidden = 2048, 4, 16, 16, 1024
  m.use_qk_norm = True
  m.compute_dtype = 'bfloat16'
  e = c.moe
  e.num_experts, e.experts_per_token, e.expert_hidden = 64, 8, 1024
  c.data.seq_len = 256
  if arg == 'tiny':
    m.model_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.ffn_hidden = 64, 2, 4, 4, 64
    e.num_experts, e.experts_per_token, e.expert_hidden = 8, 2, 32
    c.data.seq_len = 32
  return c

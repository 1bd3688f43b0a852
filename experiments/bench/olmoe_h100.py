"""An OLMoE-1B-7B-shaped model cut to fit one H100: the end-to-end MFU target of docs/performance.md.

Question: what MFU does a dropless MoE training step reach on one H100 at OLMoE's width and
expert shapes? (Target: >= 35%, printed by the trainer as `mfu`: 6 x active non-embedding
matmul parameters plus causal attention FLOPs per token, over 989 TFLOP/s.)

Run (needs a GPU; ~5 min):
  python -m moejax.main --config=experiments/bench/olmoe_h100.py --workdir=runs/olmoe-h100
Time 30 steps of it (no data loading, no checkpoint; prints MFU), as launch/gpu_check.sh does:
  python -m moejax.bench.step --config=experiments/bench/olmoe_h100.py --steps=10 --rounds=3
Check memory first, on any machine:
  python -m moejax.main --config=experiments/bench/olmoe_h100.py --mode=compile --device_memory=80GB

OLMoE-1B-7B: d 2048, 16 layers, 16 heads of 128, 64 experts of hidden 1024, top-8, QK-norm,
vocabulary 50304. Here 6 layers (float32 parameters and Adam moments of the full 16 would
not fit in 80 GB), sequence length 4096, 4 sequences per step (16k tokens, the T of the
layer benchmark), bfloat16 matmuls, the Pallas kernels. Byte data uses 257 of the 50304
embedding rows; MFU counts non-embedding matmuls only, so the vocabulary only sets the
output projection's cost.

Status (2026-11-23, no GPU yet): the compile check on CPU (`--config.moe.kernels=xla`) says
this does NOT fit: 173 GB peak per device, 140 GB of it temporaries (331 / 298 GB before
the `xla` grouped matmul gathered its block weights in chunks). A dense model of the same
active size shows 109 GB of temporaries, mostly the materialized [B, H, L, L] attention
scores at L = 4096. Hence `model.attention='auto'`: cuDNN's fused attention on the GPU
(docs/scaling-out.md, "Attention without [H, L, L] scores"). XLA:CPU's temporaries are
only an estimate of the GPU's.
"""

from moejax import base_config as base

# 'tiny': the same settings at CPU size, for the GPU check's dry run (launch/gpu_check.sh --dry-run).
ARGS = ('tiny',)


def get_config(arg=None):
  c = base.get_config()
  c.name = 'olmoe-h100'
  m = c.model
  m.vocab_size = 50304
  m.allow_padded_vocab = True  # (byte data: 257 of the 50304 rows are ever used)
  m.model_dim = 2048
  m.num_layers = 6
  m.num_heads = 16
  m.num_kv_heads = 16
  m.ffn_hidden = 1024
  m.use_qk_norm = True
  m.use_tied_embeddings = False
  m.compute_dtype = 'bfloat16'
  m.attention = 'auto'  # cuDNN's fused attention on GPU (bfloat16), splash on TPU, XLA's elsewhere
  e = c.moe
  e.num_experts = 64
  e.experts_per_token = 8
  e.expert_hidden = 1024
  e.kernels = 'pallas'
  e.block_size = 128
  c.data.seq_len = 4096
  c.data.heldout_bytes = 1_000_000
  c.train.batch_size = 4
  c.train.steps = 60
  c.train.log_every_steps = 10
  c.train.peak_tflops = 989.0
  c.optim.peak_learning_rate = 3e-4
  c.checkpoint.every_steps = 1000
  c.eval.batch_size = 4
  c.eval.max_batches = 4
  if arg == 'tiny':
    m.model_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.ffn_hidden = 64, 2, 4, 4, 64
    e.num_experts, e.experts_per_token, e.expert_hidden, e.block_size = 8, 2, 32, 16
    e.kernels = 'xla'  # (interpreted Pallas on CPU: 24 s a step even at this size)
    c.data.seq_len, c.train.batch_size, c.eval.batch_size = 64, 2, 2
  return c

"""Published MoE architectures as configs: accounting checks, not training recipes.

Each `get_config(arg)` gives the published shape; `:tiny` gives a copy with the same
structure (expert counts, top-k, shared experts, layer pattern, attention grouping,
tied/untied embeddings, QK-norm) at tiny widths, small enough to instantiate in a test.

  python -m moejax.accounting --config=experiments/published/mixtral_8x7b.py
"""


def shrink(c):
  """The same structure at tiny widths: 2 layers after the dense prefix, D=32, head dim 8, byte vocab."""
  kv_ratio = c.model.num_heads // c.model.num_kv_heads
  c.model.vocab_size = 257
  c.model.model_dim = 32
  c.model.num_heads = 4
  c.model.num_kv_heads = max(1, 4 // kv_ratio)
  c.model.head_dim = 8
  c.model.ffn_hidden = 48
  c.model.num_layers = c.moe.first_dense_layers + 2
  c.moe.expert_hidden = 16
  if c.moe.shared_expert_hidden is not None:
    c.moe.shared_expert_hidden = 16
  c.data.seq_len = 32
  return c

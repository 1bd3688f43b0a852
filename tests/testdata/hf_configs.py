"""transformers config classes and arguments of tiny checkpoints, one per HF layout (tests/interop_config_test.py).

The test writes each config.json with the installed transformers (5.x here) and also reads
the committed `hf_configs_v4/<layout>/config.json`, written by transformers 4.x's own
`save_pretrained` (the other major version's format). Regenerate them with a 4.x install:

  python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install 'transformers>=4.45,<5'
  /tmp/tf4/bin/python tests/testdata/hf_configs.py      # rewrites tests/testdata/hf_configs_v4/

The arguments match the moejax designs of `DESIGNS` on tests/testdata/tiny.py's model (D=32,
2 heads, 1 KV head, 4 experts of 32, top-2, vocabulary 257 with the separator 256).
"""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
V4_DIR = os.path.join(HERE, 'hf_configs_v4')

_COMMON = dict(vocab_size=257, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
               max_position_embeddings=16, bos_token_id=256, eos_token_id=256, initializer_range=0.02)

# layout -> (transformers config class, its arguments, the moejax overrides of tiny.get_config() it matches)
LAYOUTS = {
    'mixtral': ('MixtralConfig', dict(_COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=4,
                                      num_experts_per_tok=2, rope_theta=1e6, tie_word_embeddings=False),
                {'moe.use_renormalized_gates': True, 'model.use_tied_embeddings': False, 'model.rope_base': 1e6}),
    'olmoe': ('OlmoeConfig', dict(_COMMON, num_hidden_layers=2, intermediate_size=32, num_experts=4,
                                  num_experts_per_tok=2, rope_theta=1e4, tie_word_embeddings=True,
                                  norm_topk_prob=False, rms_norm_eps=1e-5, pad_token_id=None),
              {'model.use_qk_norm': True, 'model.qk_norm_scope': 'projection', 'model.norm_eps': 1e-5}),
    'qwen2_moe': ('Qwen2MoeConfig', dict(_COMMON, num_hidden_layers=3, intermediate_size=64,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2, rope_theta=2e4, tie_word_embeddings=True,
                                         norm_topk_prob=False, mlp_only_layers=[0], decoder_sparse_step=1),
                  {'model.use_qkv_bias': True, 'moe.num_shared_experts': 1, 'moe.shared_expert_hidden': 16,
                   'moe.use_shared_expert_gate': True, 'model.num_layers': 3, 'moe.first_dense_layers': 1,
                   'model.rope_base': 2e4}),
    'qwen3_moe': ('Qwen3MoeConfig', dict(_COMMON, num_hidden_layers=3, intermediate_size=64,
                                         moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                         rope_theta=1e6, tie_word_embeddings=True, norm_topk_prob=True,
                                         head_dim=8, mlp_only_layers=[1], decoder_sparse_step=1),
                  {'model.use_qk_norm': True, 'moe.use_renormalized_gates': True, 'model.head_dim': 8,
                   'model.rope_base': 1e6, 'model.num_layers': 3, 'moe.every_n_layers': 2}),
    'llama': ('LlamaConfig', dict(_COMMON, num_hidden_layers=2, intermediate_size=64, rope_theta=5e5,
                                  tie_word_embeddings=True, head_dim=16),
              {'moe.num_experts': 0, 'model.rope_base': 5e5}),
}


def write(layout: str, directory: str, **changes) -> str:
  """Writes config.json of `layout` (with `changes` to its arguments) by the installed transformers; returns it."""
  import transformers  # pylint: disable=import-outside-toplevel
  name, kwargs, _ = LAYOUTS[layout]
  getattr(transformers, name)(**{**kwargs, **changes}).save_pretrained(directory)
  return os.path.join(directory, 'config.json')


def main():
  import transformers  # pylint: disable=import-outside-toplevel
  if not transformers.__version__.startswith('4.'):
    raise SystemExit(f'run this with transformers 4.x (this is {transformers.__version__})')
  for layout in LAYOUTS:
    print(write(layout, os.path.join(V4_DIR, layout)))


if __name__ == '__main__':
  main()

"""HuggingFace layouts (Llama for dense runs; Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE): which designs each expresses.

Every layout is a pre-norm SwiGLU decoder with rotate-half rotary embeddings and RMSNorm; the
MoE layouts route by softmax top-k over a float32 router. They differ in (docs/interop.md):
  llama       dense (no MoE layer); no QK-norm, biases or shared experts; a head_dim field
  mixtral     renormalized top-k; every layer MoE; no QK-norm, biases or shared experts
  olmoe       QK-norm over the whole H*d_h projections; raw or renormalized top-k; every layer MoE
  qwen2_moe   one shared expert times sigmoid(x . w); q/k/v biases (always); dense layers by `mlp_only_layers`
  qwen3_moe   per-head QK-norm; dense layers by `mlp_only_layers`; no shared experts or biases
`choose` refuses, in one line naming the feature, a design that the asked layout (or, for
'auto', every layout) cannot express exactly; `hf_config` writes its config.json
(moejax/interop/config_json.py reads one back). `moe.routed_scaling_factor` has no field in
any of them: export folds it into the routed experts' down projections (exact in function).
"""

from __future__ import annotations

from typing import Any

from moejax import config as config_lib
from moejax.errors import ConfigError

MOE_LAYOUTS = ('mixtral', 'olmoe', 'qwen2_moe', 'qwen3_moe')
LAYOUTS = ('llama',) + MOE_LAYOUTS
ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mixtral': 'MixtralForCausalLM', 'olmoe': 'OlmoeForCausalLM', 'qwen2_moe': 'Qwen2MoeForCausalLM',
                 'qwen3_moe': 'Qwen3MoeForCausalLM'}
DTYPES = ('float32', 'bfloat16', 'float16')


def _refusals(cfg) -> list[str]:
  """Features of `cfg` that no layout expresses."""
  m, e = cfg.model, cfg.moe
  if e.num_experts == 0:
    return []  # the MoE settings do nothing in a dense model
  out = []
  if e.expert_size_classes.strip() and len(config_lib.size_classes(m, e)) > 1:
    out.append(f'heterogeneous experts (moe.expert_size_classes={e.expert_size_classes!r})')
  if e.router_score != 'softmax':
    out.append(f'moe.router_score={e.router_score!r} (every layout routes by softmax)')
  if e.num_expert_groups > 1:
    out.append(f'group-limited routing (moe.num_expert_groups={e.num_expert_groups})')
  if e.routing == 'expert_choice':
    out.append("expert-choice routing (moe.routing='expert_choice'): every layout routes each token to its top-k")
  if e.load_balancing == 'aux_free':
    out.append("the aux-free expert bias (moe.load_balancing='aux_free'): no layout has a routing bias")
  return out


def _misfits(cfg, layout: str) -> list[str]:
  """Features of `cfg` that `layout` cannot express (empty: it expresses the design exactly)."""
  m, e = cfg.model, cfg.moe
  out = []
  all_moe = len(config_lib.moe_layers(m, e)) == m.num_layers
  shared = e.num_shared_experts > 0
  default_head = config_lib.head_dim(m) * m.num_heads == m.model_dim
  dense = e.num_experts == 0
  if dense != (layout == 'llama'):
    return [f'a dense model (moe.num_experts=0): {layout} is MoE' if dense else
            f'MoE layers (moe.num_experts={e.num_experts}): llama is dense']
  if layout in ('mixtral', 'olmoe') and not all_moe:
    out.append(f'dense layers (moe.first_dense_layers={e.first_dense_layers}, moe.every_n_layers={e.every_n_layers}):'
               f' {layout} makes every layer MoE')
  if layout != 'qwen2_moe' and shared:
    out.append(f'shared experts (moe.num_shared_experts={e.num_shared_experts}): only qwen2_moe has one')
  if layout == 'qwen2_moe' and not (shared and e.use_shared_expert_gate):
    out.append('no gated shared expert: qwen2_moe always has one shared expert times sigmoid(x . w) '
               '(moe.num_shared_experts >= 1, moe.use_shared_expert_gate=True)')
  if layout != 'qwen2_moe' and m.use_qkv_bias:
    out.append('query/key/value biases (model.use_qkv_bias): only qwen2_moe has them')
  if layout == 'qwen2_moe' and not m.use_qkv_bias:
    out.append('no query/key/value biases (model.use_qkv_bias=False): qwen2_moe always has them')
  if layout == 'mixtral' and not e.use_renormalized_gates:
    out.append('raw softmax top-k gates (moe.use_renormalized_gates=False): mixtral always renormalizes')
  want_norm = {'olmoe': 'projection', 'qwen3_moe': 'head'}.get(layout)
  have_norm = m.qk_norm_scope if m.use_qk_norm else None
  if have_norm != want_norm:
    need = f"QK-norm with model.qk_norm_scope={want_norm!r}" if want_norm else 'no QK-norm'
    have = f"QK-norm over each {'head' if have_norm == 'head' else 'whole projection'}" if have_norm else 'no QK-norm'
    out.append(f'{have}: {layout} has {need}')
  if layout in ('olmoe', 'qwen2_moe') and not default_head:
    out.append(f'model.head_dim={m.head_dim} != model_dim/num_heads: {layout} has no head_dim field')
  return out


def choose(cfg, layout: str = 'auto') -> str:
  """The layout that expresses `cfg` exactly (`auto`: the first that does); ConfigError naming the feature if none."""
  if layout != 'auto' and layout not in LAYOUTS:
    raise ConfigError(f'--layout={layout!r} must be auto or one of {", ".join(LAYOUTS)}')
  refused = _refusals(cfg)
  if refused:
    raise ConfigError(f'cannot export {cfg.name}: {refused[0]}')
  if layout != 'auto':
    misfits = _misfits(cfg, layout)
    if misfits:
      raise ConfigError(f'cannot export {cfg.name} as {layout}: {misfits[0]}')
    return layout
  candidates = ('llama',) if cfg.moe.num_experts == 0 else MOE_LAYOUTS
  for candidate in candidates:
    if not _misfits(cfg, candidate):
      return candidate
  reasons = '; '.join(f'{name}: {_misfits(cfg, name)[0].split(": ", 1)[0]}' for name in candidates)
  raise ConfigError(f'cannot export {cfg.name}: no layout expresses this design ({reasons})')


def hf_config(cfg, layout: str, dtype: str, special_id: int) -> dict[str, Any]:
  """config.json for `layout` (what `transformers.AutoConfig` reads) from a validated moejax config."""
  m, e = cfg.model, cfg.moe
  dense = [i for i in range(m.num_layers) if not config_lib.is_moe_layer(e, i)]
  hf = {'architectures': [ARCHITECTURES[layout]], 'model_type': layout, 'vocab_size': m.vocab_size,
        'hidden_size': m.model_dim, 'num_hidden_layers': m.num_layers, 'num_attention_heads': m.num_heads,
        'num_key_value_heads': m.num_kv_heads, 'hidden_act': 'silu', 'max_position_embeddings': cfg.data.seq_len,
        'rms_norm_eps': m.norm_eps, 'rope_theta': float(m.rope_base), 'rope_scaling': None,
        'tie_word_embeddings': bool(m.use_tied_embeddings), 'initializer_range': m.init_std,
        'attention_dropout': 0.0, 'use_cache': True, 'torch_dtype': dtype, 'bos_token_id': special_id,
        'eos_token_id': special_id, 'num_experts_per_tok': e.experts_per_token,
        'router_aux_loss_coef': e.aux_loss_coef, 'output_router_logits': False}
  if layout == 'llama':
    for key in ('num_experts_per_tok', 'router_aux_loss_coef', 'output_router_logits'):
      del hf[key]
    hf.update(intermediate_size=m.ffn_hidden, head_dim=config_lib.head_dim(m), attention_bias=False,
              mlp_bias=False, pretraining_tp=1)
    return hf
  hidden = config_lib.expert_hidden(m, e)
  if layout == 'mixtral':
    hf.update(intermediate_size=hidden, num_local_experts=e.num_experts, head_dim=config_lib.head_dim(m),
              sliding_window=None, router_jitter_noise=0.0)
  elif layout == 'olmoe':
    hf.update(intermediate_size=hidden, num_experts=e.num_experts, norm_topk_prob=bool(e.use_renormalized_gates),
              attention_bias=False, clip_qkv=None, pad_token_id=None)
  else:
    hf.update(intermediate_size=m.ffn_hidden, moe_intermediate_size=hidden, num_experts=e.num_experts,
              norm_topk_prob=bool(e.use_renormalized_gates), decoder_sparse_step=1, mlp_only_layers=dense,
              use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    if layout == 'qwen2_moe':
      hf.update(shared_expert_intermediate_size=e.num_shared_experts * config_lib.shared_hidden(m, e),
                qkv_bias=True)
    else:
      hf.update(head_dim=config_lib.head_dim(m), attention_bias=False)
  return hf

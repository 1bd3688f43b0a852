"""A HuggingFace config.json as transformers 4.x and 5.x write it -> dotted moejax overrides, or one refusal line.

Where the two majors differ (checked against transformers 4.57 and 5.25 `save_pretrained`):
  rotary base   4.x: top-level `rope_theta` and `rope_scaling` (null); 5.x: `rope_parameters`
                {"rope_type": "default", "rope_theta": ...} (per layer type in some models)
  experts       Mixtral `num_local_experts`; OLMoE, Qwen2-MoE `num_experts`; Qwen3-MoE
                `num_experts` (4.x) or `num_local_experts` (5.x)
  attention     Qwen2-MoE 5.x writes `qkv_bias` and `layer_types`; Mixtral 5.x `head_dim: null`
A setting moejax cannot express (any rotary scaling or type but the plain one, a sliding
window, a non-silu activation, attention or MLP biases it has no place for, QKV clipping,
quantization) is refused naming the key, and so is any key this module does not know whose
value is set: it may change the model, and an import that silently drops it would be wrong.
"""

from __future__ import annotations

import math
from typing import Any

from moejax.errors import DataError
from moejax.interop.layouts import LAYOUTS

# Keys that never change the logits: names, versions, dtypes, token ids, generation and training options.
HARMLESS = frozenset((
    'architectures', 'model_type', 'transformers_version', 'torch_dtype', 'dtype', 'use_bfloat16', 'use_cache',
    'bos_token_id', 'eos_token_id', 'pad_token_id', 'sep_token_id', 'decoder_start_token_id', 'tokenizer_class',
    'initializer_range', 'max_position_embeddings', 'attention_dropout', 'output_router_logits',
    'router_aux_loss_coef', 'router_jitter_noise', 'output_attentions', 'output_hidden_states', 'return_dict',
    'torchscript', 'chunk_size_feed_forward', 'id2label', 'label2id', 'problem_type', 'finetuning_task', 'prefix',
    'task_specific_params', 'is_decoder', 'tf_legacy_loss', 'moejax_tokenizer', 'pretraining_tp',
    'max_window_layers', 'bad_words_ids', 'begin_suppress_tokens', 'suppress_tokens', 'diversity_penalty',
    'do_sample', 'early_stopping', 'encoder_no_repeat_ngram_size', 'exponential_decay_length_penalty',
    'forced_bos_token_id', 'forced_eos_token_id', 'length_penalty', 'max_length', 'min_length',
    'no_repeat_ngram_size', 'num_beam_groups', 'num_beams', 'num_return_sequences', 'output_scores',
    'remove_invalid_values', 'repetition_penalty', 'return_dict_in_generate', 'temperature', 'top_k', 'top_p',
    'typical_p'))
# Keys mapped below (or checked to hold a value moejax expresses).
MAPPED = frozenset((
    'vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim',
    'hidden_act', 'rms_norm_eps', 'tie_word_embeddings', 'rope_theta', 'rope_scaling', 'rope_parameters',
    'intermediate_size', 'moe_intermediate_size', 'shared_expert_intermediate_size', 'num_experts',
    'num_local_experts', 'num_experts_per_tok', 'norm_topk_prob', 'decoder_sparse_step', 'mlp_only_layers',
    'qkv_bias', 'attention_bias', 'mlp_bias', 'clip_qkv', 'sliding_window', 'use_sliding_window', 'layer_types'))
DEFAULT_ROPE_THETA = {'mixtral': 1e6}  # transformers' class defaults where config.json has no rotary base; else 1e4
ROPE_KEYS = frozenset(('rope_type', 'type', 'rope_theta', 'partial_rotary_factor'))


def _get(hf: dict, key: str, path: str, kind=int, default=None):
  value = hf.get(key, default)
  if value is None or isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
    raise DataError(f'{path}: {key} is {value!r}, expected {"an integer" if kind is int else kind.__name__}')
  return value


def _unset(value: Any) -> bool:
  return value is None or value is False or value in (0, '', [], {})


def _check_keys(hf: dict, path: str, layout: str) -> None:
  """Refuses a key this module does not know, when it holds a value (it may change the model)."""
  for key in sorted(hf):
    if key.startswith('_') or key in HARMLESS or key in MAPPED or _unset(hf[key]):
      continue
    raise DataError(f'{path}: {key}={hf[key]!r} is a setting moejax does not know for {layout} and it may change '
                    'the model; refusing rather than importing it wrongly')


def _rope_dict(value: Any, key: str, path: str) -> dict | None:
  """One rotary-parameter dict of `rope_parameters`/`rope_scaling` (one per layer type must agree)."""
  if value is None:
    return None
  if not isinstance(value, dict):
    raise DataError(f'{path}: {key} is {value!r}, expected a JSON object')
  if value and all(isinstance(v, dict) for v in value.values()):  # 5.x: {layer type: parameters}
    distinct = {repr(sorted(v.items())) for v in value.values()}
    if len(distinct) > 1:
      raise DataError(f'{path}: {key} differs between layer types ({", ".join(value)}); moejax has one rotary')
    return next(iter(value.values()))
  return value


def rope_theta(hf: dict, path: str, layout: str) -> float:
  """The rotary base, wherever 4.x or 5.x wrote it; DataError for any rotary variant but the plain one."""
  found = {}
  for key in ('rope_parameters', 'rope_scaling'):
    params = _rope_dict(hf.get(key), key, path)
    if params is None:
      continue
    kind = params.get('rope_type', params.get('type', 'default'))
    if kind != 'default':
      raise DataError(f'{path}: {key} has rope_type {kind!r}; moejax has plain rotary embeddings (rope_type '
                      "'default') only")
    extra = sorted(set(params) - ROPE_KEYS)
    if extra:
      raise DataError(f'{path}: {key}.{extra[0]}={params[extra[0]]!r} is a rotary setting moejax does not express')
    if params.get('partial_rotary_factor', 1.0) != 1.0:
      raise DataError(f'{path}: {key}.partial_rotary_factor={params["partial_rotary_factor"]!r}; moejax rotates '
                      'every head dimension')
    if 'rope_theta' in params:
      found[f'{key}.rope_theta'] = params['rope_theta']
  if hf.get('rope_theta') is not None:
    found['rope_theta'] = hf['rope_theta']
  if hf.get('partial_rotary_factor', 1.0) not in (None, 1.0):
    raise DataError(f'{path}: partial_rotary_factor={hf["partial_rotary_factor"]!r}; moejax rotates every head '
                    'dimension')
  for key, value in found.items():
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
      raise DataError(f'{path}: {key} is {value!r}, expected a positive number')
  values = {float(v) for v in found.values()}
  if len(values) > 1:
    raise DataError(f'{path}: the rotary base is given twice and differs ({found})')
  return values.pop() if values else DEFAULT_ROPE_THETA.get(layout, 1e4)


def num_experts(hf: dict, path: str) -> int:
  """The routed-expert count under whichever key this model type and version uses."""
  found = {k: hf[k] for k in ('num_local_experts', 'num_experts') if hf.get(k) is not None}
  if not found:
    raise DataError(f'{path}: neither num_local_experts nor num_experts gives the expert count')
  if len(set(found.values())) > 1:
    raise DataError(f'{path}: num_local_experts and num_experts disagree ({found})')
  key = next(iter(found))
  return _get(hf, key, path)


def _check_attention(hf: dict, path: str, layout: str, layers: int) -> None:
  """Refuses sliding windows, non-silu activations, biases moejax has no place for, QKV clipping, quantization."""
  if hf.get('hidden_act', 'silu') != 'silu':
    raise DataError(f'{path}: hidden_act {hf.get("hidden_act")!r} (moejax FFNs are SwiGLU with silu)')
  window = hf.get('sliding_window')
  if hf.get('use_sliding_window', layout == 'mixtral') and window:
    raise DataError(f'{path}: sliding_window={window!r} is not expressible in moejax (full causal attention)')
  if hf.get('use_sliding_window'):
    raise DataError(f'{path}: use_sliding_window=True is not expressible in moejax (full causal attention)')
  kinds = hf.get('layer_types')
  if kinds is not None and (not isinstance(kinds, list) or len(kinds) != layers or
                            any(k != 'full_attention' for k in kinds)):
    raise DataError(f'{path}: layer_types {kinds!r}: moejax has full attention in every layer')
  for key in ('clip_qkv', 'attention_bias', 'mlp_bias', 'quantization_config'):
    if hf.get(key):
      raise DataError(f'{path}: {key}={hf[key]!r} is not expressible in moejax')
  if layout != 'qwen2_moe' and hf.get('qkv_bias'):
    raise DataError(f'{path}: qkv_bias=True is not expressible in a {layout} model')


def _layer_pattern(hf: dict, layers: int, path: str) -> tuple[int, int]:
  """(moe.first_dense_layers, moe.every_n_layers) of Qwen's decoder_sparse_step and mlp_only_layers."""
  step = _get(hf, 'decoder_sparse_step', path, default=1)
  dense_only = set(hf.get('mlp_only_layers') or [])
  moe = [i for i in range(layers) if i not in dense_only and step > 0 and (i + 1) % step == 0]
  if not moe:
    raise DataError(f'{path}: decoder_sparse_step={step} and mlp_only_layers leave no MoE layer')
  first, every = moe[0], (moe[1] - moe[0]) if len(moe) > 1 else 1
  expected = [i for i in range(first, layers) if (i - first) % every == 0]
  if moe != expected:
    raise DataError(f'{path}: the MoE layers {moe} (decoder_sparse_step, mlp_only_layers) are not a dense prefix '
                    'then every n-th layer, the only pattern moejax has')
  return first, every


def _moe_overrides(hf: dict, path: str, layout: str, layers: int) -> dict[str, Any]:
  o = {'moe.num_experts': num_experts(hf, path), 'moe.experts_per_token': _get(hf, 'num_experts_per_tok', path),
       'moe.use_renormalized_gates': layout == 'mixtral' or bool(hf.get('norm_topk_prob', False)),
       'moe.router_score': 'softmax', 'moe.routed_scaling_factor': 1.0, 'moe.num_expert_groups': 1,
       'moe.topk_expert_groups': 1, 'moe.expert_size_classes': '',
       'moe.aux_loss_coef': float(hf.get('router_aux_loss_coef', 0.01)),
       'moe.num_shared_experts': 0, 'moe.use_shared_expert_gate': False}
  if layout in ('mixtral', 'olmoe'):
    o.update({'model.ffn_hidden': _get(hf, 'intermediate_size', path), 'moe.expert_hidden': None,
              'moe.first_dense_layers': 0, 'moe.every_n_layers': 1})
  else:
    first, every = _layer_pattern(hf, layers, path)
    o.update({'model.ffn_hidden': _get(hf, 'intermediate_size', path),
              'moe.expert_hidden': _get(hf, 'moe_intermediate_size', path),
              'moe.first_dense_layers': first, 'moe.every_n_layers': every})
  if layout == 'qwen2_moe':
    shared = _get(hf, 'shared_expert_intermediate_size', path)
    o.update({'moe.num_shared_experts': 1 if shared else 0, 'moe.shared_expert_hidden': shared or None,
              'moe.use_shared_expert_gate': bool(shared)})
  return o


def overrides_from_hf(hf: dict, path: str) -> tuple[str, dict[str, Any]]:
  """(layout, dotted moejax overrides) of a HuggingFace config.json dict; DataError naming the key if unsupported."""
  layout = hf.get('model_type')
  if layout not in LAYOUTS:
    raise DataError(f'{path}: model_type {layout!r} is not a supported layout ({", ".join(LAYOUTS)})')
  D, H = _get(hf, 'hidden_size', path), _get(hf, 'num_attention_heads', path)
  layers = _get(hf, 'num_hidden_layers', path)
  _check_keys(hf, path, layout)
  _check_attention(hf, path, layout, layers)
  head_dim = hf.get('head_dim') or D // H
  o = {'model.vocab_size': _get(hf, 'vocab_size', path), 'model.model_dim': D, 'model.num_layers': layers,
       'model.num_heads': H, 'model.num_kv_heads': hf.get('num_key_value_heads') or H,
       'model.head_dim': head_dim, 'model.rope_base': rope_theta(hf, path, layout),
       'model.norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
       'model.use_tied_embeddings': bool(hf.get('tie_word_embeddings', False)),
       'model.init_std': float(hf.get('initializer_range', 0.02)),
       'model.use_qk_norm': layout in ('olmoe', 'qwen3_moe'),
       'model.qk_norm_scope': 'projection' if layout == 'olmoe' else 'head',
       'model.use_qkv_bias': layout == 'qwen2_moe' and bool(hf.get('qkv_bias', True))}
  if layout == 'llama':
    o.update({'model.ffn_hidden': _get(hf, 'intermediate_size', path), 'moe.num_experts': 0})
  else:
    o.update(_moe_overrides(hf, path, layout, layers))
  if layout in ('olmoe', 'qwen2_moe') and head_dim * H != D:
    raise DataError(f'{path}: head_dim={head_dim} with hidden_size={D} and {H} heads: {layout} has no head_dim')
  return layout, o

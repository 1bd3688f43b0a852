"""moejax parameters <-> HuggingFace tensor names and shapes, one table for both directions.

`table(cfg, layout)` lists, for every moejax parameter (a path into `nnx.to_pure_dict` of the
params), the HF tensor names it becomes and the pair of functions between the two. The
functions use only `.T`, `.reshape`, indexing and stacking, so they run on numpy arrays and,
for the shape checks, under `jax.eval_shape`. Rotary embeddings are rotate-half in both, so
q_proj.weight is wq [D, H, K] reshaped to [D, H*K] and transposed, with no permutation.
Also here: the byte-level tokenizer.json that encodes exactly as moejax's `bytes` tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import numpy as np

from moejax import config as config_lib
from moejax.data import tokenizers as tokenizers_lib

BYTES_SPECIAL = '<|endoftext|>'  # one of tokenizers.SEPARATOR_NAMES, so moejax reads the file back with separator 256


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple  # into the params pure dict
  names: tuple[str, ...]  # HF tensor names
  to_hf: Callable[[Any], list]  # moejax array -> one array per name
  from_hf: Callable[[list], Any]  # arrays in `names` order -> moejax array


def _one(path, name, to_hf=lambda x: x, from_hf=lambda y: y) -> Entry:
  return Entry(path, (name,), lambda x: [to_hf(x)], lambda ys: from_hf(ys[0]))


def _linear(path, name) -> Entry:
  """A [in, out] moejax matrix as a torch Linear weight [out, in]."""
  return _one(path, name, lambda x: x.T, lambda y: y.T)


def _heads_in(path, name, shape) -> Entry:
  """wq/wk/wv [D, H, K] <-> [H*K, D]."""
  return _one(path, name, lambda x: x.reshape(shape[0], -1).T, lambda y: y.T.reshape(shape))


def _flat(path, name, shape) -> Entry:
  """[H, K] biases and projection-norm scales <-> [H*K]."""
  return _one(path, name, lambda x: x.reshape(-1), lambda y: y.reshape(shape))


def _stacked(path, names, transpose=True) -> Entry:
  """[E, a, b] expert weights <-> E tensors [b, a] (one per expert)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel  (stacking under eval_shape needs jnp)
  stack = lambda ys: (jnp if not isinstance(ys[0], np.ndarray) else np).stack([y.T if transpose else y for y in ys])
  return Entry(path, tuple(names), lambda x: [x[j].T for j in range(len(names))], stack)


def _attention(cfg, i: int, prefix: str) -> list[Entry]:
  m = cfg.model
  H, Hkv, K, D = m.num_heads, m.num_kv_heads, config_lib.head_dim(m), m.model_dim
  p, a = ('blocks', i, 'attn'), f'{prefix}.self_attn'
  out = [_heads_in(p + ('wq',), f'{a}.q_proj.weight', (D, H, K)),
         _heads_in(p + ('wk',), f'{a}.k_proj.weight', (D, Hkv, K)),
         _heads_in(p + ('wv',), f'{a}.v_proj.weight', (D, Hkv, K)),
         _one(p + ('wo',), f'{a}.o_proj.weight', lambda x: x.reshape(H * K, D).T, lambda y: y.T.reshape(H, K, D))]
  if m.use_qkv_bias:
    out += [_flat(p + (b,), f'{a}.{n}_proj.bias', (h, K)) for b, n, h in (('bq', 'q', H), ('bk', 'k', Hkv),
                                                                         ('bv', 'v', Hkv))]
  if m.use_qk_norm:
    for norm, h in (('q_norm', H), ('k_norm', Hkv)):
      name = f'{a}.{norm}.weight'
      out.append(_one(p + (norm, 'scale'), name) if m.qk_norm_scope == 'head' else
                 _flat(p + (norm, 'scale'), name, (h, K)))
  return out


def _ffn(cfg, i: int, prefix: str, layout: str) -> list[Entry]:
  p = ('blocks', i, 'ffn')
  if not config_lib.is_moe_layer(cfg.moe, i):
    return [_linear(p + (w,), f'{prefix}.mlp.{n}.weight') for w, n in
            (('w_gate', 'gate_proj'), ('w_up', 'up_proj'), ('w_down', 'down_proj'))]
  E = cfg.moe.num_experts
  if layout == 'mixtral':
    moe, names = f'{prefix}.block_sparse_moe', {'w_gate': 'w1', 'w_up': 'w3', 'w_down': 'w2'}
  else:
    moe, names = f'{prefix}.mlp', {'w_gate': 'gate_proj', 'w_up': 'up_proj', 'w_down': 'down_proj'}
  out = [_linear(p + ('w_router',), f'{moe}.gate.weight')]
  out += [_stacked(p + ('experts', 0, w), [f'{moe}.experts.{j}.{n}.weight' for j in range(E)]) for w, n in names.items()]
  if cfg.moe.num_shared_experts:
    out += [_linear(p + ('shared', w), f'{moe}.shared_expert.{n}.weight') for w, n in
            (('w_gate', 'gate_proj'), ('w_up', 'up_proj'), ('w_down', 'down_proj'))]
    out.append(_linear(p + ('w_shared_gate',), f'{moe}.shared_expert_gate.weight'))
  return out


def table(cfg, layout: str) -> list[Entry]:
  """Every moejax parameter of `cfg` with its HF tensor names for `layout` (cfg must be expressible: hf_layouts)."""
  out = [_one(('embed', 'table'), 'model.embed_tokens.weight'), _one(('final_norm', 'scale'), 'model.norm.weight')]
  if not cfg.model.use_tied_embeddings:
    out.append(_linear(('unembed',), 'lm_head.weight'))
  for i in range(cfg.model.num_layers):
    prefix = f'model.layers.{i}'
    out += [_one(('blocks', i, 'attn_norm', 'scale'), f'{prefix}.input_layernorm.weight'),
            _one(('blocks', i, 'ffn_norm', 'scale'), f'{prefix}.post_attention_layernorm.weight')]
    out += _attention(cfg, i, prefix) + _ffn(cfg, i, prefix, layout)
  return out


def get(tree: dict, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def put(tree: dict, path: tuple, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def bytes_tokenizer_json() -> str:
  """A HF tokenizer.json that encodes text exactly as moejax's `bytes` tokenizer: byte b -> id b, 256 = separator."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # pylint: disable=import-outside-toplevel
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  to_char = _byte_chars()
  assert sorted(alphabet) == sorted(to_char.values())
  vocab = {to_char[b]: b for b in range(256)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: every byte stays one token
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([BYTES_SPECIAL])
  sep = tokenizers_lib.BYTES_SEPARATOR
  assert tok.token_to_id(BYTES_SPECIAL) == sep
  # With special tokens (what evaluation harnesses ask for) a text starts with the separator, as moejax documents do.
  tok.post_processor = processors.TemplateProcessing(single=f'{BYTES_SPECIAL} $A', pair=f'{BYTES_SPECIAL} $A $B',
                                                     special_tokens=[(BYTES_SPECIAL, sep)])
  return tok.to_str(pretty=True)


def _byte_chars() -> dict[int, str]:
  """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
  printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), 256))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def tokenizer_config(special: str, seq_len: int) -> str:
  """tokenizer_config.json for a tokenizer.json (loaded by transformers as PreTrainedTokenizerFast)."""
  return json.dumps({'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': special, 'eos_token': special,
                     'model_max_length': seq_len, 'add_bos_token': False, 'add_eos_token': False,
                     'clean_up_tokenization_spaces': False}, indent=2)

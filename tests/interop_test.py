"""HuggingFace interop: safetensors, the layouts' names/shapes/config.json, exact round trips, refusals, bad input."""

import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.model import accounting
from moejax.model import transformer as model_lib
from moejax.interop import config_json, exporter as export, importer as import_hf, layouts as hf_layouts, shards
from moejax.interop import weights as hf_weights
from moejax.config import load_module
from moejax.data import tokenizers
from moejax.errors import ConfigError, DataError, WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One tiny design per layout, each expressed exactly by it (and picked by --layout=auto).
DESIGNS = {
    'mixtral': {'moe.use_renormalized_gates': True, 'model.use_tied_embeddings': False},
    'olmoe': {'model.use_qk_norm': True, 'model.qk_norm_scope': 'projection', 'model.num_kv_heads': 1,
              'model.norm_eps': 1e-5},
    'qwen2_moe': {'model.use_qkv_bias': True, 'moe.num_shared_experts': 2, 'moe.shared_expert_hidden': 8,
                  'moe.use_shared_expert_gate': True, 'model.num_layers': 3, 'moe.first_dense_layers': 1},
    'qwen3_moe': {'model.use_qk_norm': True, 'moe.use_renormalized_gates': True, 'model.head_dim': 8,
                  'model.rope_base': 1e6, 'model.num_layers': 3, 'moe.every_n_layers': 2},
    # a dense run (experiments/quickstart.py's dense point), with an untied head and head_dim != D/H
    'llama': {'moe.num_experts': 0, 'model.use_tied_embeddings': False, 'model.head_dim': 8, 'model.rope_base': 5e5},
}


def _cfg(tiny_cfg, overrides):
  return config_lib.validate(config_lib.apply_overrides(tiny_cfg, overrides))


def _random_params(cfg, seed=0):
  """Every parameter random (norm scales and biases too), so a misplaced tensor cannot go unnoticed."""
  _, params, _ = model_lib.split(model_lib.build(cfg))
  params = nnx.to_pure_dict(params)
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def _workdir(cfg, params, directory):
  """A workdir as a run leaves it: config.json and a checkpoint."""
  os.makedirs(directory)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    f.write(cfg.to_json_best_effort(indent=2))
  import_hf._save_state(cfg, params, directory, 'test')  # pylint: disable=protected-access
  return directory


def test_safetensors_shards_round_trip_and_match_the_reference_reader(tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  tensors = {'a': rng.normal(size=(3, 5)).astype(np.float32), 'b': rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
             'c': np.arange(6, dtype=np.int64).reshape(2, 3), 'd': rng.normal(size=(4, 4)).astype(np.float16)}
  shards.save(tensors, str(tmp_path / 'one.safetensors'), {'format': 'pt'})
  back = shards.load(str(tmp_path / 'one.safetensors'))
  assert all(back[k].dtype == v.dtype and np.array_equal(back[k], v) for k, v in tensors.items())
  ref = load_file(str(tmp_path / 'one.safetensors'))
  assert all(ref[k].dtype == v.dtype and np.array_equal(ref[k], v) for k, v in tensors.items())
  assert shards.shapes(str(tmp_path / 'one.safetensors')) == {k: list(v.shape) for k, v in tensors.items()}
  files = shards.save_sharded(tensors, str(tmp_path), max_shard_bytes=64)
  assert shards.INDEX in files and len(files) > 2
  back = shards.load_dir(str(tmp_path), list(tensors))
  assert all(np.array_equal(back[k], v) for k, v in tensors.items())
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'model.safetensors').write_bytes(b'not a safetensors file')
  with pytest.raises(DataError, match='model.safetensors is not a readable safetensors file'):
    shards.load_dir(str(tmp_path / 'bad'), ['a'])


def test_bytes_tokenizer_json_encodes_as_moejax_bytes():
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  tok = Tokenizer.from_str(hf_weights.bytes_tokenizer_json())
  text = 'def f(x):\n  return "héllo wörld 🎉"\t\x00 ÿ  trailing  '
  ours = tokenizers.ByteTokenizer().encode_documents([text.encode()])[0].tolist()
  assert [256] + tok.encode(text, add_special_tokens=False).ids == ours
  assert tok.encode(text).ids == ours  # with special tokens: the separator starts the text, as in moejax
  assert tok.decode(ours[1:]) == text and tok.get_vocab_size() == tokenizers.BYTES_VOCAB


@pytest.mark.parametrize('layout', list(DESIGNS))
def test_round_trip_is_exact_and_files_match_the_layout(tiny_cfg, layout, tmp_path):
  cfg = _cfg(tiny_cfg, DESIGNS[layout])
  assert hf_layouts.choose(cfg) == layout
  params = _random_params(cfg)
  workdir = _workdir(cfg, params, str(tmp_path / 'run'))
  out = str(tmp_path / 'hf')
  assert export.export(workdir, out) == layout
  assert sorted(os.listdir(out)) == ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json',
                                     'tokenizer_config.json']
  hf = json.load(open(os.path.join(out, 'config.json')))
  m, e = cfg.model, cfg.moe
  assert hf['model_type'] == layout and hf['architectures'] == [hf_layouts.ARCHITECTURES[layout]]
  assert (hf['hidden_size'], hf['num_hidden_layers'], hf['num_attention_heads'], hf['num_key_value_heads'],
          hf['vocab_size'], hf['rms_norm_eps'], hf['rope_theta'], hf.get('num_experts_per_tok')) == (
              m.model_dim, m.num_layers, m.num_heads, m.num_kv_heads, 257, m.norm_eps, m.rope_base,
              e.experts_per_token if e.num_experts else None)
  header = shards.shapes(os.path.join(out, 'model.safetensors'))
  D, K, H, Hkv = m.model_dim, config_lib.head_dim(m), m.num_heads, m.num_kv_heads
  assert header['model.layers.0.self_attn.q_proj.weight'] == [H * K, D]
  assert header['model.layers.0.self_attn.o_proj.weight'] == [D, H * K]
  if layout == 'llama':
    assert not [n for n in header if 'expert' in n or '.gate.' in n]
    assert header['model.layers.1.mlp.up_proj.weight'] == [m.ffn_hidden, D]
    assert (hf['intermediate_size'], hf['head_dim']) == (m.ffn_hidden, K) and 'num_experts_per_tok' not in hf
  else:
    moe_layer = config_lib.moe_layers(m, e)[0]
    prefix = f'model.layers.{moe_layer}.' + ('block_sparse_moe' if layout == 'mixtral' else 'mlp')
    assert header[f'{prefix}.gate.weight'] == [e.num_experts, D]
    up = 'w3' if layout == 'mixtral' else 'up_proj'
    assert header[f'{prefix}.experts.{e.num_experts - 1}.{up}.weight'] == [e.expert_hidden, D]
  assert ('lm_head.weight' in header) == (not m.use_tied_embeddings)
  if layout == 'olmoe':
    assert header['model.layers.0.self_attn.k_norm.weight'] == [Hkv * K]
  if layout == 'qwen3_moe':
    assert header['model.layers.0.self_attn.q_norm.weight'] == [K]
    assert hf['mlp_only_layers'] == [1] and hf['head_dim'] == K
  if layout == 'qwen2_moe':
    assert header['model.layers.0.self_attn.k_proj.bias'] == [Hkv * K]
    assert header[f'{prefix}.shared_expert.up_proj.weight'] == [2 * 8, D]
    assert header[f'{prefix}.shared_expert_gate.weight'] == [1, D]
    assert hf['mlp_only_layers'] == [0] and hf['shared_expert_intermediate_size'] == 16
  assert len(header) == sum(len(en.names) for en in hf_weights.table(cfg, layout))

  back = str(tmp_path / 'back')
  assert import_hf.import_checkpoint(out, back) == layout
  cfg2 = import_hf.config_from_hf(out, str(tmp_path / 'unused'))[1]
  assert cfg2.data.tokenizer == 'bytes'
  counts = lambda c: {k: v for k, v in accounting.count(c).items() if k != 'num_shared_experts'}  # (2 x 8 -> 1 x 16)
  assert counts(cfg2) == counts(cfg)
  from moejax.train import restore as restore_lib  # pylint: disable=import-outside-toplevel
  loaded = restore_lib.load_config(back)
  got = export.restore_params(loaded, back)  # pylint: disable=protected-access
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    if a.shape != b.shape:  # n shared experts of F come back as one of n*F: same weights, concatenated
      continue
    np.testing.assert_array_equal(a, b)
  if e.num_shared_experts <= 1:
    assert jax.tree.structure(got) == jax.tree.structure(params)
  tokens = np.random.default_rng(1).integers(0, 257, (2, 8))
  want = _logits(cfg, params, tokens)
  np.testing.assert_allclose(_logits(loaded, got, tokens), want, rtol=1e-5, atol=1e-5)


def _logits(cfg, params, tokens):
  model = model_lib.build(cfg)
  graphdef, _, buffers = model_lib.split(model)
  return np.asarray(nnx.merge(graphdef, jax.tree.map(np.asarray, params), buffers)(tokens)[0])


def test_routed_scaling_factor_is_folded_into_the_down_projections(tiny_cfg, tmp_path):
  cfg = _cfg(tiny_cfg, {**DESIGNS['mixtral'], 'moe.routed_scaling_factor': 2.0})
  params = _random_params(cfg)
  workdir, out = _workdir(cfg, params, str(tmp_path / 'run')), str(tmp_path / 'hf')
  export.export(workdir, out)
  import_hf.import_checkpoint(out, str(tmp_path / 'back'))
  from moejax.train import restore as restore_lib  # pylint: disable=import-outside-toplevel
  loaded = restore_lib.load_config(str(tmp_path / 'back'))
  assert loaded.moe.routed_scaling_factor == 1.0
  tokens = np.random.default_rng(1).integers(0, 257, (2, 8))
  got = _logits(loaded, export.restore_params(loaded, str(tmp_path / 'back')), tokens)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, _logits(cfg, params, tokens), rtol=1e-5, atol=1e-5)
  export.export(workdir, str(tmp_path / 'bf16'), dtype='bfloat16')  # --dtype: the weights, rounded once
  single = shards.load(str(tmp_path / 'bf16' / 'model.safetensors'))
  assert single['model.embed_tokens.weight'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(single['model.embed_tokens.weight'], params['embed']['table'].astype(ml_dtypes.bfloat16))
  assert json.load(open(tmp_path / 'bf16' / 'config.json'))['torch_dtype'] == 'bfloat16'


@pytest.mark.parametrize('overrides,feature', [
    ({'moe.num_experts': 0, 'model.use_qk_norm': True}, 'llama: QK-norm over each head'),
    ({'moe.expert_size_classes': '2x16,2x48'}, 'heterogeneous experts'),
    ({'moe.router_score': 'sigmoid', 'moe.num_expert_groups': 2}, "router_score='sigmoid'"),
    ({'moe.load_balancing': 'aux_free'}, 'aux-free expert bias'),
    ({'moe.num_shared_experts': 1}, 'no layout expresses this design'),
    ({}, 'no layout expresses this design'),  # raw softmax top-k without QK-norm: no layout has it
])
def test_inexpressible_designs_are_one_line_naming_the_feature(tiny_cfg, overrides, feature):
  with pytest.raises(ConfigError, match=feature) as info:
    hf_layouts.choose(_cfg(tiny_cfg, overrides))
  assert '\n' not in str(info.value)


def test_a_forced_layout_names_what_it_lacks(tiny_cfg):
  with pytest.raises(ConfigError, match='as mixtral: dense layers'):
    hf_layouts.choose(_cfg(tiny_cfg, {**DESIGNS['qwen3_moe'], 'model.use_qk_norm': False}), 'mixtral')
  with pytest.raises(ConfigError, match="olmoe has QK-norm with model.qk_norm_scope='projection'"):
    hf_layouts.choose(_cfg(tiny_cfg, {'model.use_qk_norm': True}), 'olmoe')


def test_export_cli_refusal_is_one_line_and_writes_nothing(tiny_cfg, tmp_path):
  cfg = _cfg(tiny_cfg, {'moe.load_balancing': 'aux_free'})
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(cfg.to_json_best_effort())
  out = tmp_path / 'hf'
  proc = subprocess.run([sys.executable, '-m', 'moejax.export', f'--workdir={workdir}', f'--out={out}'],
                        capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, timeout=300)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines() == ["moejax: error: cannot export tiny: the aux-free expert bias "
                                              "(moe.load_balancing='aux_free'): no layout has a routing bias"]
  assert sorted(os.listdir(tmp_path)) == ['run']


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """A valid tiny OLMoE-layout checkpoint directory."""
  from testdata import tiny  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('exported')
  cfg = config_lib.validate(config_lib.apply_overrides(tiny.get_config(), DESIGNS['olmoe']))
  export.export(_workdir(cfg, _random_params(cfg), str(root / 'run')), str(root / 'hf'))
  return str(root / 'hf')


def _broken(exported, tmp_path, edit):
  import shutil  # pylint: disable=import-outside-toplevel
  directory = str(tmp_path / 'broken')
  shutil.copytree(exported, directory)
  edit(directory)
  return directory


def _edit_config(**changes):
  def edit(directory):
    path = os.path.join(directory, 'config.json')
    hf = json.load(open(path))
    hf.update(changes)
    json.dump(hf, open(path, 'w'))
  return edit


def _edit_weights(fn):
  def edit(directory):
    path = os.path.join(directory, 'model.safetensors')
    tensors = shards.load(path)
    fn(tensors)
    shards.save(tensors, path)
  return edit


@pytest.mark.parametrize('edit,message', [
    (lambda d: os.remove(os.path.join(d, 'model.safetensors')), 'holds no weights: neither model.safetensors'),
    (_edit_config(model_type='gpt2'), "config.json: model_type 'gpt2' is not a supported layout"),
    (lambda d: os.remove(os.path.join(d, 'tokenizer.json')), "tokenizer.json does not exist: the checkpoint's"),
    (_edit_weights(lambda t: t.pop('model.layers.1.mlp.experts.3.down_proj.weight')),
     'has no tensor model.layers.1.mlp.experts.3.down_proj.weight'),
    (_edit_config(intermediate_size=40), r'model.safetensors: tensor model.layers.0.mlp.experts.0.gate_proj.weight '
     r'has shape \[32, 32\], but config.json implies \[40, 32\]'),
    (_edit_weights(lambda t: t.update({'model.layers.0.self_attn.o_proj.bias': np.zeros(32, np.float32)})),
     'tensor model.layers.0.self_attn.o_proj.bias has no place in a olmoe model'),
    (lambda d: os.remove(os.path.join(d, 'config.json')), 'config.json does not exist'),
])
def test_bad_checkpoints_are_one_line_naming_file_and_key(exported, tmp_path, edit, message):
  directory = _broken(exported, tmp_path, edit)
  with pytest.raises((DataError, WorkdirError), match=message) as info:
    import_hf.import_checkpoint(directory, str(tmp_path / 'out'))
  assert '\n' not in str(info.value)
  assert not os.path.exists(tmp_path / 'out') and not [n for n in os.listdir(tmp_path) if 'partial' in n]


PUBLISHED = {'mixtral_8x7b': 'mixtral', 'olmoe_1b_7b': 'olmoe', 'qwen3_30b_a3b': 'qwen3_moe',
             'qwen1_5_moe_a2_7b': 'qwen2_moe'}


@pytest.mark.parametrize('name', list(PUBLISHED))
def test_published_configs_round_trip_through_config_json_with_equal_accounting(name, tmp_path):
  cfg = config_lib.validate(load_module(f'{ROOT}/experiments/published/{name}.py').get_config())
  layout = hf_layouts.choose(cfg)
  assert layout == PUBLISHED[name]
  hf = hf_layouts.hf_config(cfg, layout, 'bfloat16', 0)
  _, overrides = config_json.overrides_from_hf(hf, 'config.json')
  from moejax import base_config as base  # pylint: disable=import-outside-toplevel
  back = config_lib.validate(config_lib.apply_overrides(base.get_config(), {**overrides,
                                                                            'data.seq_len': cfg.data.seq_len}))
  assert accounting.count(back) == accounting.count(cfg)
  for key in ('norm_eps', 'rope_base', 'use_qk_norm', 'qk_norm_scope', 'use_qkv_bias', 'head_dim'):
    assert back.model[key] == cfg.model[key] or key == 'head_dim' and cfg.model.head_dim is None
  del tmp_path


def test_published_values_match_the_released_config_json():
  released = {  # rms_norm_eps and rope_theta of the released checkpoints' config.json
      'mixtral_8x7b': (1e-5, 1e6), 'olmoe_1b_7b': (1e-5, 1e4), 'qwen3_30b_a3b': (1e-6, 1e6),
      'qwen1_5_moe_a2_7b': (1e-6, 1e6)}
  for name, (eps, theta) in released.items():
    cfg = load_module(f'{ROOT}/experiments/published/{name}.py').get_config()
    assert (cfg.model.norm_eps, cfg.model.rope_base) == (eps, theta), name
  assert load_module(f'{ROOT}/experiments/published/olmoe_1b_7b.py').get_config().model.qk_norm_scope == 'projection'


def test_deepseekmoe_has_no_layout():
  cfg = config_lib.validate(load_module(f'{ROOT}/experiments/published/deepseekmoe_16b.py').get_config())
  with pytest.raises(ConfigError, match='no layout expresses'):
    hf_layouts.choose(cfg)


def test_bias_and_projection_qk_norm_are_counted(tiny_cfg):
  cfg = _cfg(tiny_cfg, {'model.use_qkv_bias': True, 'model.use_qk_norm': True, 'model.qk_norm_scope': 'projection'})
  params = nnx.to_pure_dict(nnx.state(model_lib.build(cfg), nnx.Param))
  assert accounting.count(cfg)['n_total'] == accounting.param_count_tree(params)
  assert params['blocks'][0]['attn']['k_norm']['scale'].shape == (1, 16)


CONFIG_CLASSES = {'llama': 'LlamaConfig', 'mixtral': 'MixtralConfig', 'olmoe': 'OlmoeConfig', 'qwen2_moe': 'Qwen2MoeConfig',
                  'qwen3_moe': 'Qwen3MoeConfig'}


@pytest.mark.parametrize('layout', list(DESIGNS))
def test_transformers_reads_the_exported_config_and_tokenizer(tiny_cfg, layout, tmp_path):
  """transformers itself (config and tokenizer need no torch) reads what export writes, with the design's values."""
  transformers = pytest.importorskip('transformers')
  cfg = _cfg(tiny_cfg, DESIGNS[layout])
  out = str(tmp_path / 'hf')
  export.export(_workdir(cfg, _random_params(cfg), str(tmp_path / 'run')), out)
  conf = transformers.AutoConfig.from_pretrained(out)
  m, e = cfg.model, cfg.moe
  assert type(conf).__name__ == CONFIG_CLASSES[layout]
  assert (conf.hidden_size, conf.num_hidden_layers, conf.num_attention_heads, conf.num_key_value_heads,
          conf.vocab_size) == (m.model_dim, m.num_layers, m.num_heads, m.num_kv_heads, 257)
  assert conf.rms_norm_eps == pytest.approx(m.norm_eps)
  rope = getattr(conf, 'rope_parameters', None) or {'rope_theta': getattr(conf, 'rope_theta', None)}
  assert rope['rope_theta'] == pytest.approx(m.rope_base)
  if layout == 'llama':
    assert (conf.intermediate_size, conf.head_dim, conf.tie_word_embeddings) == (m.ffn_hidden, 8, False)
  else:
    assert (getattr(conf, 'num_local_experts', None) or conf.num_experts) == e.num_experts
    assert conf.num_experts_per_tok == e.experts_per_token
  if layout not in ('mixtral', 'llama'):
    assert bool(conf.norm_topk_prob) == bool(e.use_renormalized_gates)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  text = 'def f(x):\n  return "héllo"'
  ours = tokenizers.ByteTokenizer().encode_documents([text.encode()])[0].tolist()
  assert tok(text)['input_ids'] == ours and tok.decode(ours[1:]) == text


@pytest.mark.slow
@pytest.mark.parametrize('layout', list(DESIGNS))
def test_transformers_models_give_moejax_logits(tiny_cfg, layout, tmp_path):
  """The exported checkpoint loaded by transformers' own model class (torch, CPU) gives moejax's logits."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = _cfg(tiny_cfg, {**DESIGNS[layout], 'moe.routed_scaling_factor': 2.0} if layout == 'mixtral' else
             DESIGNS[layout])
  params = _random_params(cfg)
  params = jax.tree.map(lambda x: x * 0.3, params)  # moderate logits, so routing is not decided by rounding
  out = str(tmp_path / 'hf')
  export.export(_workdir(cfg, params, str(tmp_path / 'run')), out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
  model.eval()
  tokens = np.random.default_rng(1).integers(0, 257, (2, 8))
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(theirs, _logits(cfg, params, tokens), rtol=2e-4, atol=2e-4)

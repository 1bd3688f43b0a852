"""import_hf reads config.json as transformers 4.x and 5.x write it, and refuses what it cannot express."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from interop_test import _cfg, _logits, _random_params, _workdir
from moejax.train import restore as restore_lib
from moejax.errors import DataError
from moejax.interop import exporter, importer, shards
from testdata import hf_configs

transformers = pytest.importorskip('transformers')


def _exported(tiny_cfg, layout, tmp_path, scale=1.0):
  """(cfg, params, HF directory) of a random tiny design `layout` expresses, exported by moejax."""
  cfg = _cfg(tiny_cfg, hf_configs.LAYOUTS[layout][2])
  params = jax.tree.map(lambda x: x * scale, _random_params(cfg))
  out = str(tmp_path / 'hf')
  assert exporter.export(_workdir(cfg, params, str(tmp_path / 'run')), out) == layout
  return cfg, params, out


@pytest.mark.parametrize('version', ['installed', 'v4'])
@pytest.mark.parametrize('layout', [l if l in ('mixtral', 'qwen3_moe') else pytest.param(l, marks=pytest.mark.slow)
                                    for l in hf_configs.LAYOUTS])
def test_import_reads_config_json_of_both_transformers_versions(tiny_cfg, layout, version, tmp_path):
  """config.json by transformers' save_pretrained (installed: 5.x; v4: the committed 4.x fixture) -> same logits."""
  cfg, params, out = _exported(tiny_cfg, layout, tmp_path)
  os.remove(os.path.join(out, 'config.json'))  # moejax's own config.json, replaced by transformers' writer
  if version == 'installed':
    hf_configs.write(layout, out)
  else:
    shutil.copyfile(os.path.join(hf_configs.V4_DIR, layout, 'config.json'), os.path.join(out, 'config.json'))
  written = json.load(open(os.path.join(out, 'config.json')))
  major = written['transformers_version'].split('.')[0]
  assert major == ('4' if version == 'v4' else transformers.__version__.split('.')[0])
  assert ('rope_parameters' in written) == (major != '4')  # the two formats this test is about
  back = str(tmp_path / 'back')
  assert importer.import_checkpoint(out, back) == layout
  loaded = restore_lib.load_config(back)
  assert loaded.model.rope_base == cfg.model.rope_base and loaded.moe.num_experts == cfg.moe.num_experts
  tokens = np.random.default_rng(1).integers(0, 257, (2, 8))
  got = _logits(loaded, exporter.restore_params(loaded, back), tokens)
  np.testing.assert_allclose(got, _logits(cfg, params, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('layout,changes,message', [
    ('mixtral', {'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1e6,
                                     'original_max_position_embeddings': 16}},
     "rope_parameters has rope_type 'yarn'; moejax has plain rotary embeddings"),
    ('llama', {'rope_parameters': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 5e5}},
     "rope_parameters has rope_type 'linear'"),
    ('mixtral', {'sliding_window': 8}, 'sliding_window=8 is not expressible'),
    ('qwen2_moe', {'use_sliding_window': True, 'sliding_window': 8}, 'is not expressible in moejax'),
    ('olmoe', {'hidden_act': 'gelu'}, "hidden_act 'gelu'"),
    ('olmoe', {'clip_qkv': 8.0}, 'clip_qkv=8.0 is not expressible'),
    ('llama', {'mlp_bias': True}, 'mlp_bias=True is not expressible'),
    ('qwen3_moe', {'attention_bias': True}, 'attention_bias=True is not expressible'),
    ('qwen3_moe', {'some_future_switch': True}, 'some_future_switch=True is a setting moejax does not know'),
])
def test_import_refuses_settings_it_cannot_express_in_one_line(tiny_cfg, layout, changes, message, tmp_path):
  _, _, out = _exported(tiny_cfg, layout, tmp_path)
  os.remove(os.path.join(out, 'config.json'))
  hf_configs.write(layout, out, **changes)
  with pytest.raises(DataError, match=message) as info:
    importer.import_checkpoint(out, str(tmp_path / 'back'))
  assert '\n' not in str(info.value) and not os.path.exists(tmp_path / 'back')


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_import_refuses_non_finite_weights_in_one_line(tiny_cfg, bad, tmp_path):
  _, _, out = _exported(tiny_cfg, 'mixtral', tmp_path)
  path = os.path.join(out, 'model.safetensors')
  tensors = shards.load(path)
  tensors['model.layers.1.block_sparse_moe.experts.2.w3.weight'][3, 5] = bad
  shards.save(tensors, path)
  with pytest.raises(DataError, match=r'model.safetensors: tensor model.layers.1.block_sparse_moe.experts.2.w3.weight '
                     r'holds 1 non-finite \(NaN or inf\) values of 1024') as info:
    importer.import_checkpoint(out, str(tmp_path / 'back'))
  assert '\n' not in str(info.value) and sorted(os.listdir(tmp_path)) == ['hf', 'run']

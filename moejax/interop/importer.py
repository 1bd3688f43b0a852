"""Import a local HuggingFace checkpoint as a moejax workdir (the library behind `python -m moejax.import_hf`).

Reads config.json (moejax/interop/config_json.py: as transformers 4.x and 5.x write it), the
tokenizer (tokenizer.json) and the safetensors weights (one file or shards with
model.safetensors.index.json, read lazily one tensor at a time) and writes OUT/config.json,
OUT/tokenizer.json, a step-0 Orbax checkpoint with the state a run's checkpoint holds
(params, fresh optimizer state), OUT/experiment.py and OUT/imported.json (where the weights
came from and whether a corpus was given). A missing file, tensor or tokenizer, a shape that
disagrees with config.json, a non-finite weight or an unsupported setting is one error line
naming the file and key; nothing is left under OUT (it is written beside it and renamed at
the end, moejax/interop/staging.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np

from moejax import base_config, config as config_lib, files
from moejax.errors import DataError
from moejax.interop import config_json, shards, staging, weights

log = logging.getLogger('moejax.import_hf')
IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)  # buffers some older checkpoints carry

EXPERIMENT = '''"""The config of a checkpoint imported by moejax.import_hf from {source}.

  python -m moejax.main --config={here}/experiment.py --workdir={here} --mode=eval
"""


def get_config(arg=None):
  del arg
  import os  # pylint: disable=import-outside-toplevel
  from moejax.train import restore  # pylint: disable=import-outside-toplevel
  return restore.load_config(os.path.dirname(os.path.abspath(__file__)))
'''


def _tokenizer(hf: dict, hf_dir: str, workdir: str) -> dict:
  """Data-section overrides for the checkpoint's tokenizer (checked to load, and to fit the vocabulary)."""
  from moejax.data import tokenizers  # pylint: disable=import-outside-toplevel
  path = os.path.join(hf_dir, 'tokenizer.json')
  if not os.path.exists(path):
    raise DataError(f'{path} does not exist: the checkpoint\'s tokenizer is missing (tokenizer.json)')
  if hf.get('moejax_tokenizer') == 'bytes':
    return {'data.tokenizer': 'bytes'}
  special = hf.get('bos_token_id') if hf.get('bos_token_id') is not None else hf.get('eos_token_id')
  name = None
  if isinstance(special, int):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    try:
      name = Tokenizer.from_file(path).id_to_token(special)
    except Exception as e:  # pylint: disable=broad-except  (the library raises a bare Exception)
      raise DataError(f'{path} does not load as a HuggingFace tokenizer.json: {str(e).splitlines()[0]}') from None
    if name is None:
      raise DataError(f'{path} has no token id {special} (bos_token_id/eos_token_id in config.json)')
  tok = tokenizers.HFTokenizer(path, name)
  out = {'data.tokenizer': f'hf:{os.path.join(os.path.abspath(workdir), "tokenizer.json")}',
         'data.separator_token': tok._tok.id_to_token(tok.separator)}  # pylint: disable=protected-access
  if tok.vocab_size > hf['vocab_size']:
    raise DataError(f'{path} has {tok.vocab_size} tokens, more than vocab_size={hf["vocab_size"]} in config.json')
  out['model.allow_padded_vocab'] = tok.vocab_size < hf['vocab_size']
  return out


PLACEHOLDER_SOURCE = 'stdlib'  # data.source of a workdir imported without --data_source (eval refuses to score it)


def config_from_hf(hf_dir: str, workdir: str, data_source: str | None = None, seq_len: int | None = None):
  """(layout, validated moejax config) of a HF checkpoint directory."""
  path = os.path.join(hf_dir, 'config.json')
  hf = files.read_json(path, 'the checkpoint\'s config', DataError)
  layout, overrides = config_json.overrides_from_hf(hf, path)
  overrides.update(_tokenizer(hf, hf_dir, workdir))
  length = seq_len or min(int(hf.get('max_position_embeddings') or 4096), 4096)
  overrides.update({'name': os.path.basename(os.path.abspath(hf_dir)),
                    'data.source': data_source or PLACEHOLDER_SOURCE, 'data.seq_len': length})
  cfg = config_lib.apply_overrides(base_config.get_config(), overrides)
  return layout, config_lib.validate(cfg)


def load_params(cfg, layout: str, hf_dir: str) -> dict:
  """The params pure dict of `cfg` read from the checkpoint's tensors, checked against the layout's names and shapes.

  Every tensor must be finite: a NaN or inf weight is a DataError naming the file and tensor.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.model import transformer as model_lib  # pylint: disable=import-outside-toplevel
  _, abstract, _ = model_lib.split(nnx.eval_shape(lambda: model_lib.build(cfg)))
  abstract = nnx.to_pure_dict(abstract)
  where = shards.weight_files(hf_dir)
  entries = weights.table(cfg, layout)
  expected = {n for e in entries for n in e.names}
  for name in sorted(where):
    if name not in expected and not name.endswith(IGNORED_SUFFIXES):
      raise DataError(f'{where[name]}: tensor {name} has no place in a {layout} model with this config.json '
                      '(a feature moejax does not map)')
  headers: dict[str, dict] = {}
  params: dict = {}
  for entry in entries:
    wanted = jax.eval_shape(entry.to_hf, weights.get(abstract, entry.path))
    for name, want in zip(entry.names, wanted):
      if name not in where:
        raise DataError(f'{hf_dir}: the checkpoint has no tensor {name} (config.json: model_type {layout})')
      if where[name] not in headers:
        headers[where[name]] = shards.shapes(where[name])
      have = headers[where[name]][name]
      if tuple(have) != tuple(want.shape):
        raise DataError(f'{where[name]}: tensor {name} has shape {list(have)}, but config.json implies '
                        f'{list(want.shape)}')
    arrays = [_finite(np.asarray(shards.load(where[n], [n])[n], np.float32), n, where[n]) for n in entry.names]
    weights.put(params, entry.path, np.ascontiguousarray(entry.from_hf(arrays)))
  return params


def _finite(array: np.ndarray, name: str, path: str) -> np.ndarray:
  bad = int(array.size - np.count_nonzero(np.isfinite(array)))
  if bad:
    raise DataError(f'{path}: tensor {name} holds {bad} non-finite (NaN or inf) values of {array.size}; '
                    'moejax refuses non-finite weights')
  return array


def import_checkpoint(hf_dir: str, workdir: str, data_source: str | None = None, seq_len: int | None = None) -> str:
  """Writes the moejax workdir of a HF checkpoint; returns the layout read.

  Without `data_source` the workdir has no corpus: OUT/imported.json says so and
  `--mode=eval` refuses to score it until `--config.data.source=...` names one.
  """
  if not os.path.isdir(hf_dir):
    raise DataError(f'--hf_dir={hf_dir} is not a directory')
  with staging.sigterm_raises(workdir, 'import'):
    return _import(hf_dir, workdir, data_source, seq_len)


def _import(hf_dir: str, workdir: str, data_source: str | None, seq_len: int | None) -> str:
  layout, cfg = config_from_hf(hf_dir, workdir, data_source, seq_len)
  params = load_params(cfg, layout, hf_dir)
  from moejax.train import restore as restore_lib  # pylint: disable=import-outside-toplevel  (jax loads only after the checks)
  with staging.staged(workdir, 'import') as tmp:
    if cfg.data.tokenizer != 'bytes':
      shutil.copyfile(os.path.join(hf_dir, 'tokenizer.json'), os.path.join(tmp, 'tokenizer.json'))
    _save_state(cfg, params, tmp, os.path.abspath(hf_dir))
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))
    with open(os.path.join(tmp, 'experiment.py'), 'w') as f:
      f.write(EXPERIMENT.format(source=os.path.abspath(hf_dir), here=os.path.abspath(workdir)))
    with open(os.path.join(tmp, restore_lib.IMPORT_RECORD), 'w') as f:
      json.dump({'source': os.path.abspath(hf_dir), 'layout': layout, 'corpus': data_source,
                 'placeholder_source': None if data_source else PLACEHOLDER_SOURCE}, f, indent=1)
  return layout


def _save_state(cfg, params: dict, directory: str, source: str) -> None:
  """A step-0 checkpoint holding what a run's checkpoint holds: params, buffers, optimizer state, step."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.train import checkpoint
  from moejax.model import transformer as model_lib
  from moejax.train import optim  # pylint: disable=import-outside-toplevel
  from moejax.model import stack  # pylint: disable=import-outside-toplevel
  _, _, buffers = model_lib.split(nnx.eval_shape(lambda: model_lib.build(stack.unscanned(cfg))))  # (per layer on disk)
  params = jax.tree.map(jnp.asarray, params)
  buffers = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.to_pure_dict(buffers))
  state = {'params': params, 'buffers': buffers, 'opt_state': optim.make(cfg.optim).init(params),
           'step': jnp.zeros((), jnp.int32)}
  ckpt = checkpoint.Checkpointer(os.path.join(directory, 'checkpoints'), use_async=False)
  try:
    ckpt.save(0, state, {'step': 0, 'wall_s': 0.0, 'branches_done': [], 'imported': source,
                         'data_fingerprint': None, 'data_iterator': None, 'config': cfg.to_json_best_effort()})
    ckpt.wait()
  finally:
    ckpt.close()

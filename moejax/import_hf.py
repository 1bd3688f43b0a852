"""Import a local HuggingFace MoE checkpoint (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) as a moejax workdir.

  python -m moejax.import_hf --hf_dir=DIR --workdir=OUT [--data_source=stdlib] [--seq_len=N]

Reads config.json, the tokenizer (tokenizer.json) and the safetensors weights (one file or
shards with model.safetensors.index.json) and writes OUT/config.json, OUT/tokenizer.json, a
step-0 Orbax checkpoint with the state a run's checkpoint holds (params, fresh optimizer
state) and OUT/experiment.py, so that
  python -m moejax.main --config=OUT/experiment.py --workdir=OUT --mode=eval   (held-out loss)
  python -m moejax.generate --workdir=OUT --prompt=...                        (sampling)
  python -m moejax.main --config=OUT/experiment.py --workdir=OUT             (fine-tuning from the weights)
work. A missing file, tensor or tokenizer, a shape that disagrees with config.json or an
unsupported architecture is one error line naming the file and key; nothing is left under
OUT (it is written beside it and renamed at the end).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from absl import app, flags

from moejax import base_config, cli, config as config_lib, hf_layouts
from moejax.errors import DataError, WorkdirError

FLAGS = flags.FLAGS
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


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except FileNotFoundError:
    raise DataError(f'{path} does not exist') from None
  except (OSError, ValueError) as e:
    raise DataError(f'cannot read {path}: {e}') from None
  if not isinstance(value, dict):
    raise DataError(f'{path} is not a JSON object')
  return value


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


def config_from_hf(hf_dir: str, workdir: str, data_source: str = 'stdlib', seq_len: int | None = None):
  """(layout, validated moejax config) of a HF checkpoint directory."""
  path = os.path.join(hf_dir, 'config.json')
  hf = _read_json(path)
  layout, overrides = hf_layouts.overrides_from_hf(hf, path)
  overrides.update(_tokenizer(hf, hf_dir, workdir))
  length = seq_len or min(int(hf.get('max_position_embeddings') or 4096), 4096)
  overrides.update({'name': os.path.basename(os.path.abspath(hf_dir)), 'data.source': data_source,
                    'data.seq_len': length})
  cfg = config_lib.apply_overrides(base_config.get_config(), overrides)
  return layout, config_lib.validate(cfg)


def load_params(cfg, layout: str, hf_dir: str) -> dict:
  """The params pure dict of `cfg` read from the checkpoint's tensors, checked against the layout's names and shapes."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax import hf_weights, safetensors_io
  from moejax.model import transformer as model_lib  # pylint: disable=import-outside-toplevel
  _, abstract, _ = model_lib.split(nnx.eval_shape(lambda: model_lib.build(cfg)))
  abstract = nnx.to_pure_dict(abstract)
  files = safetensors_io.weight_files(hf_dir)
  entries = hf_weights.table(cfg, layout)
  expected = {n for e in entries for n in e.names}
  for name in sorted(files):
    if name not in expected and not name.endswith(IGNORED_SUFFIXES):
      raise DataError(f'{files[name]}: tensor {name} has no place in a {layout} model with this config.json '
                      '(a feature moejax does not map)')
  headers = {}
  params: dict = {}
  for entry in entries:
    shapes = jax.eval_shape(entry.to_hf, hf_weights.get(abstract, entry.path))
    for name, want in zip(entry.names, shapes):
      if name not in files:
        raise DataError(f'{hf_dir}: the checkpoint has no tensor {name} (config.json: model_type {layout})')
      if files[name] not in headers:
        headers[files[name]] = safetensors_io.read_header(files[name])
      have = headers[files[name]][name]['shape']
      if tuple(have) != tuple(want.shape):
        raise DataError(f'{files[name]}: tensor {name} has shape {list(have)}, but config.json implies '
                        f'{list(want.shape)}')
    arrays = safetensors_io.load_dir(hf_dir, entry.names)
    value = entry.from_hf([np.asarray(arrays[n], np.float32) for n in entry.names])
    hf_weights.put(params, entry.path, np.ascontiguousarray(value))
  return params


def import_checkpoint(hf_dir: str, workdir: str, data_source: str = 'stdlib', seq_len: int | None = None) -> str:
  """Writes the moejax workdir of a HF checkpoint; returns the layout read."""
  from moejax import export  # pylint: disable=import-outside-toplevel  (the same temporary-then-rename writing)
  if not os.path.isdir(hf_dir):
    raise DataError(f'--hf_dir={hf_dir} is not a directory')
  layout, cfg = config_from_hf(hf_dir, workdir, data_source, seq_len)
  params = load_params(cfg, layout, hf_dir)
  tmp = export.prepare_out(workdir)
  try:
    if cfg.data.tokenizer != 'bytes':
      shutil.copyfile(os.path.join(hf_dir, 'tokenizer.json'), os.path.join(tmp, 'tokenizer.json'))
    _save_state(cfg, params, tmp, os.path.abspath(hf_dir))
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      f.write(cfg.to_json_best_effort(indent=2))
    with open(os.path.join(tmp, 'experiment.py'), 'w') as f:
      f.write(EXPERIMENT.format(source=os.path.abspath(hf_dir), here=os.path.abspath(workdir)))
    export.finish_out(tmp, workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return layout


def _save_state(cfg, params: dict, directory: str, source: str) -> None:
  """A step-0 checkpoint holding what a run's checkpoint holds: params, buffers, optimizer state, step."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.train import checkpoint
  from moejax.model import transformer as model_lib
  from moejax.train import optim  # pylint: disable=import-outside-toplevel
  _, _, buffers = model_lib.split(nnx.eval_shape(lambda: model_lib.build(cfg)))
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


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.seq_len is not None and FLAGS.seq_len < 2:
    raise WorkdirError(f'--seq_len={FLAGS.seq_len} must be >= 2')
  layout = import_checkpoint(FLAGS.hf_dir, FLAGS.workdir, FLAGS.data_source, FLAGS.seq_len)
  print(f'{FLAGS.hf_dir} ({layout}) -> {FLAGS.workdir}; evaluate with: python -m moejax.main '
        f'--config={FLAGS.workdir}/experiment.py --workdir={FLAGS.workdir} --mode=eval')


if __name__ == '__main__':
  flags.DEFINE_string('hf_dir', None, 'A local HuggingFace checkpoint directory.', required=True)
  flags.DEFINE_string('workdir', None, 'The moejax workdir to create (must not exist, or be empty).', required=True)
  flags.DEFINE_string('data_source', 'stdlib', 'data.source of the imported config (held-out data for --mode=eval).')
  flags.DEFINE_integer('seq_len', None, 'data.seq_len; default min(max_position_embeddings, 4096).')
  cli.cli(_main)

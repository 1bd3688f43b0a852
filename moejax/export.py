"""Export a run's latest checkpoint as a HuggingFace checkpoint (Mixtral, OLMoE, Qwen2-MoE or Qwen3-MoE layout).

  python -m moejax.export --workdir=DIR --out=HF_DIR [--layout=auto|mixtral|olmoe|qwen2_moe|qwen3_moe]
      [--dtype=float32|bfloat16|float16] [--max_shard_size=5GB]

Writes model.safetensors (numbered shards and model.safetensors.index.json above
--max_shard_size), config.json (read by `transformers` as the layout's architecture),
generation_config.json and the tokenizer (tokenizer.json + tokenizer_config.json; for the
`bytes` tokenizer a byte-level tokenizer.json with the same ids). `auto` picks the layout
that expresses the design exactly; a design no layout expresses is one error line naming the
feature (moejax.hf_layouts). moe.routed_scaling_factor is folded into the routed experts'
down projections. Everything is written into a temporary sibling of --out and renamed at the
end, so a failure leaves nothing under --out. See docs/interop.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

from absl import app, flags

from moejax import cli, hf_layouts
from moejax.errors import ConfigError, WorkdirError

FLAGS = flags.FLAGS
log = logging.getLogger('moejax.export')


def prepare_out(out: str) -> str:
  """A fresh temporary directory beside `out` (which must not exist, or be empty)."""
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise WorkdirError(f'{out} already exists and is not an empty directory; remove it or choose another path')
  parent = os.path.dirname(out)
  try:
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out)}.partial-')
  except OSError as e:
    raise WorkdirError(f'cannot write beside {out}: {e.strerror or e}') from None


def finish_out(tmp: str, out: str) -> None:
  """Renames the finished temporary directory to `out` (replacing an empty directory)."""
  out = os.path.abspath(out)
  if os.path.isdir(out):
    os.rmdir(out)
  os.replace(tmp, out)


def _tokenizer_files(cfg, directory: str) -> tuple[int, str]:
  """Writes the run's tokenizer into `directory`; returns (separator id, separator token)."""
  from moejax.data import tokenizers  # pylint: disable=import-outside-toplevel
  from moejax import hf_weights  # pylint: disable=import-outside-toplevel
  spec = tokenizers.parse_spec(cfg.data.tokenizer)
  if spec.kind == 'bytes':
    with open(os.path.join(directory, 'tokenizer.json'), 'w') as f:
      f.write(hf_weights.bytes_tokenizer_json())
    sep_id, sep = tokenizers.BYTES_SEPARATOR, hf_weights.BYTES_SPECIAL
  else:
    if spec.kind == 'train':
      from moejax import data  # pylint: disable=import-outside-toplevel  (the trained file lives in the data cache)
      tok = data.corpus_from_config(cfg.data).tokenizer
    else:
      tok = tokenizers.load(spec, separator_token=cfg.data.separator_token)
    if tok.kind != 'hf':
      raise ConfigError(f'data.tokenizer={cfg.data.tokenizer!r}: only tokenizer.json (HuggingFace) and bytes '
                        'tokenizers are exported; convert the sentencepiece model to a tokenizer.json first')
    shutil.copyfile(tok.path, os.path.join(directory, 'tokenizer.json'))
    sep_id, sep = tok.separator, tok._tok.id_to_token(tok.separator)  # pylint: disable=protected-access
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    f.write(hf_weights.tokenizer_config(sep, cfg.data.seq_len))
  return sep_id, sep


def hf_tensors(cfg, params: dict, layout: str, dtype: str) -> dict:
  """{HF name: numpy array in `dtype`} of a moejax params pure dict (routed_scaling_factor folded in)."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from moejax import hf_weights  # pylint: disable=import-outside-toplevel
  np_dtype = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}[dtype]
  factor = float(cfg.moe.routed_scaling_factor)
  tensors = {}
  for entry in hf_weights.table(cfg, layout):
    value = np.asarray(hf_weights.get(params, entry.path), np.float32)
    if factor != 1.0 and entry.path[-3:-1] == ('experts', 0) and entry.path[-1] == 'w_down':
      value = value * np.float32(factor)  # gates * factor on the routed sum == the down projections times factor
    for name, array in zip(entry.names, entry.to_hf(value)):
      tensors[name] = np.ascontiguousarray(array).astype(np_dtype)
  return tensors


def export(workdir: str, out: str, layout: str = 'auto', dtype: str = 'float32', max_shard_bytes: int = 5 * 10**9
           ) -> str:
  """Writes the latest checkpoint of `workdir` as a HF checkpoint in `out`; returns the layout used."""
  if dtype not in hf_layouts.DTYPES:
    raise ConfigError(f'--dtype={dtype!r} must be one of {", ".join(hf_layouts.DTYPES)}')
  from moejax.train import restore as restore_lib  # pylint: disable=import-outside-toplevel
  cfg = restore_lib.load_config(workdir)
  layout = hf_layouts.choose(cfg, layout)
  if cfg.moe.routed_scaling_factor != 1.0:
    log.info('folding moe.routed_scaling_factor=%g into the routed experts\' down projections',
             cfg.moe.routed_scaling_factor)
  if cfg.moe.eval_capacity_factor is not None:
    log.warning('moe.eval_capacity_factor=%g drops tokens in moejax; the %s layout never drops',
                cfg.moe.eval_capacity_factor, layout)
  tmp = prepare_out(out)
  try:
    special_id, _ = _tokenizer_files(cfg, tmp)
    params = _restore_params(cfg, workdir)
    _write(cfg, layout, dtype, special_id, hf_tensors(cfg, params, layout, dtype), tmp, max_shard_bytes)
    finish_out(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return layout


def _restore_params(cfg, workdir: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from moejax.train import checkpoint
  from moejax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from moejax.errors import CheckpointError  # pylint: disable=import-outside-toplevel
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.data = cfg.mesh.fsdp = cfg.mesh.expert = cfg.mesh.tensor = 1  # exported on one device
  _, abstract = state_lib.abstract_state(cfg)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), use_async=False)
  try:
    restored = ckpt.restore_latest(abstract, move_aside=False)
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f'no checkpoint in {workdir}/checkpoints to export')
  log.info('exporting checkpoint step %d of %s', restored[0], workdir)
  return jax.device_get(restored[1]['params'])


def _write(cfg, layout, dtype, special_id, tensors, directory, max_shard_bytes) -> None:
  from moejax import safetensors_io  # pylint: disable=import-outside-toplevel
  safetensors_io.save_sharded(tensors, directory, max_shard_bytes, metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    hf = hf_layouts.hf_config(cfg, layout, dtype, special_id)
    if cfg.data.tokenizer == 'bytes':
      hf['moejax_tokenizer'] = 'bytes'  # moejax.import_hf restores the bytes tokenizer rather than the json twin
    json.dump(hf, f, indent=2)
  with open(os.path.join(directory, 'generation_config.json'), 'w') as f:
    json.dump({'bos_token_id': special_id, 'eos_token_id': special_id, 'do_sample': False}, f, indent=2)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  size, is_bytes = cli.parse_amount(FLAGS.max_shard_size)
  if not is_bytes:
    raise ConfigError(f'--max_shard_size={FLAGS.max_shard_size} needs a unit, e.g. 5GB')
  layout = export(FLAGS.workdir, FLAGS.out, FLAGS.layout, FLAGS.dtype, int(size))
  print(f'{FLAGS.workdir} -> {FLAGS.out} ({layout}, {FLAGS.dtype})')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'A trained run\'s workdir (config.json and checkpoints/).', required=True)
  flags.DEFINE_string('out', None, 'The HuggingFace checkpoint directory to write (must not exist, or be empty).',
                      required=True)
  flags.DEFINE_string('layout', 'auto', 'auto, mixtral, olmoe, qwen2_moe or qwen3_moe.')
  flags.DEFINE_string('dtype', 'float32', 'Weights dtype: float32 (exact), bfloat16 or float16.')
  flags.DEFINE_string('max_shard_size', '5GB', 'Above this size the weights are split into numbered shards.')
  cli.cli(_main)

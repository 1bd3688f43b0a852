"""Export a run's latest checkpoint as a HuggingFace checkpoint (the library behind `python -m moejax.export`).

Writes model.safetensors (numbered shards and model.safetensors.index.json above the shard
size), config.json (read by `transformers` as the layout's architecture),
generation_config.json and the tokenizer (tokenizer.json + tokenizer_config.json; for the
`bytes` tokenizer a byte-level tokenizer.json with the same ids). `auto` picks the layout
that expresses the design exactly (moejax/interop/layouts.py); moe.routed_scaling_factor is
folded into the routed experts' down projections. Everything is written into a temporary
sibling of the output and renamed at the end (moejax/interop/staging.py). See docs/interop.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from moejax.errors import ConfigError
from moejax.interop import layouts, shards, staging, weights

log = logging.getLogger('moejax.export')


def _tokenizer_files(cfg, directory: str, workdir: str) -> tuple[int, str]:
  """Writes the run's tokenizer into `directory`; returns (separator id, separator token).

  The tokenizer is the run's own copy (WORKDIR/tokenizer/, `data.tokenizers.snapshot`) when it
  keeps one, so a run exports after its corpus or tokenizer file has moved."""
  from moejax.data import tokenizers  # pylint: disable=import-outside-toplevel
  spec = tokenizers.parse_spec(cfg.data.tokenizer)
  if spec.kind == 'bytes':
    with open(os.path.join(directory, 'tokenizer.json'), 'w') as f:
      f.write(weights.bytes_tokenizer_json())
    sep_id, sep = tokenizers.BYTES_SEPARATOR, weights.BYTES_SPECIAL
  else:
    tok = tokenizers.load_snapshot(workdir)
    if tok is None and spec.kind == 'train':
      from moejax import data  # pylint: disable=import-outside-toplevel  (the trained file lives in the data cache)
      tok = data.corpus_from_config(cfg.data).tokenizer
    elif tok is None:
      tok = tokenizers.load(spec, separator_token=cfg.data.separator_token)
    if tok.kind != 'hf':
      raise ConfigError(f'data.tokenizer={cfg.data.tokenizer!r}: only tokenizer.json (HuggingFace) and bytes '
                        'tokenizers are exported; convert the sentencepiece model to a tokenizer.json first')
    shutil.copyfile(tok.path, os.path.join(directory, 'tokenizer.json'))
    sep_id, sep = tok.separator, tok._tok.id_to_token(tok.separator)  # pylint: disable=protected-access
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    f.write(weights.tokenizer_config(sep, cfg.data.seq_len))
  return sep_id, sep


def hf_tensors(cfg, params: dict, layout: str, dtype: str) -> dict:
  """{HF name: numpy array in `dtype`} of a moejax params pure dict (routed_scaling_factor folded in)."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  np_dtype = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}[dtype]
  factor = float(cfg.moe.routed_scaling_factor)
  tensors = {}
  for entry in weights.table(cfg, layout):
    value = np.asarray(weights.get(params, entry.path), np.float32)
    if factor != 1.0 and entry.path[-3:-1] == ('experts', 0) and entry.path[-1] == 'w_down':
      value = value * np.float32(factor)  # gates * factor on the routed sum == the down projections times factor
    for name, array in zip(entry.names, entry.to_hf(value)):
      tensors[name] = np.ascontiguousarray(array).astype(np_dtype)
  return tensors


def export(workdir: str, out: str, layout: str = 'auto', dtype: str = 'float32', max_shard_bytes: int = 5 * 10**9
           ) -> str:
  """Writes the latest checkpoint of `workdir` as a HF checkpoint in `out`; returns the layout used."""
  if dtype not in layouts.DTYPES:
    raise ConfigError(f'--dtype={dtype!r} must be one of {", ".join(layouts.DTYPES)}')
  with staging.sigterm_raises(out, 'export'):
    return _export(workdir, out, layout, dtype, max_shard_bytes)


def _export(workdir: str, out: str, layout: str, dtype: str, max_shard_bytes: int) -> str:
  from moejax.train import restore  # pylint: disable=import-outside-toplevel
  cfg = restore.load_config(workdir)
  layout = layouts.choose(cfg, layout)
  if cfg.moe.routed_scaling_factor != 1.0:
    log.info('folding moe.routed_scaling_factor=%g into the routed experts\' down projections',
             cfg.moe.routed_scaling_factor)
  if cfg.moe.eval_capacity_factor is not None:
    log.warning('moe.eval_capacity_factor=%g drops tokens in moejax; the %s layout never drops',
                cfg.moe.eval_capacity_factor, layout)
  with staging.staged(out, 'export') as tmp:
    special_id, _ = _tokenizer_files(cfg, tmp, workdir)
    params = restore_params(cfg, workdir)
    _write(cfg, layout, dtype, special_id, hf_tensors(cfg, params, layout, dtype), tmp, max_shard_bytes)
  return layout


def restore_params(cfg, workdir: str) -> dict:
  """The params pure dict (numpy) of the latest checkpoint in `workdir`, restored on one device."""
  import jax  # pylint: disable=import-outside-toplevel
  from moejax.train import checkpoint, state as state_lib  # pylint: disable=import-outside-toplevel
  from moejax.errors import CheckpointError  # pylint: disable=import-outside-toplevel
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.data = cfg.mesh.fsdp = cfg.mesh.expert = cfg.mesh.tensor = 1  # exported on one device
  cfg.model.scan_layers = False  # (checkpoints hold the layers one by one)
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
  shards.save_sharded(tensors, directory, max_shard_bytes, metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    hf = layouts.hf_config(cfg, layout, dtype, special_id)
    if cfg.data.tokenizer == 'bytes':
      hf['moejax_tokenizer'] = 'bytes'  # moejax.import_hf restores the bytes tokenizer rather than the json twin
    json.dump(hf, f, indent=2)
  with open(os.path.join(directory, 'generation_config.json'), 'w') as f:
    json.dump({'bos_token_id': special_id, 'eos_token_id': special_id, 'do_sample': False}, f, indent=2)

"""A run's workdir read back: its resolved config, its latest train state, its model.

`load_config` imports no jax, so a CLI can reject a bad workdir or flag in a fraction of a
second; the jax-side modules load inside `load_model` and `restore_state`.
"""

from __future__ import annotations

import os

from moejax import base_config, config as config_lib, files
from moejax.errors import CheckpointError, DataError, WorkdirError

IMPORT_RECORD = 'imported.json'  # written by moejax.import_hf: where the weights came from, and the corpus given


def load_config(workdir: str):
  """The run's resolved config (WORKDIR/config.json), rebuilt on `moejax.base_config` and validated."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise WorkdirError(f'{path} does not exist: {workdir} holds no trained run')
  stored = files.read_json(path, 'run config', WorkdirError)
  return config_lib.validate(config_lib.apply_overrides(base_config.get_config(), config_lib.flatten(stored)))


def load_model(workdir: str, cfg=None):
  """(config, corpus, model) of the latest checkpoint in a trained run's workdir (the corpus carries its tokenizer)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax import data  # pylint: disable=import-outside-toplevel
  from moejax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from moejax.model import stack  # pylint: disable=import-outside-toplevel
  cfg = stack.unscanned(load_config(workdir) if cfg is None else cfg)  # (decodable: the layers one by one)
  corpus = data.corpus_from_config(cfg.data, workdir)  # (the workdir's tokenizer copy if the corpus moved)
  s = state_lib.setup(cfg, corpus)
  _, state = restore_state(s, workdir)
  return cfg, corpus, nnx.merge(s.graphdef, state['params'], state['buffers'])


def restore_state(s, workdir: str) -> tuple[int, dict]:
  """(step, state) of the latest checkpoint in `workdir`, onto the layout of `s` (a `train.state.Setup`)."""
  from moejax.model import stack  # pylint: disable=import-outside-toplevel
  from moejax.train import checkpoint  # pylint: disable=import-outside-toplevel
  spans = stack.storage_spans(s.cfg) if getattr(s, 'cfg', None) is not None else None  # (a scanned --mode=eval)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), use_async=False, spans=spans)
  # s.state becomes its abstract shapes while the checkpoint loads (one state on the device, not two), then the
  # restored state.
  s.state = checkpoint.abstract(s.state)
  try:
    restored = ckpt.restore_latest(s.state, move_aside=False)
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f'no checkpoint in {workdir}/checkpoints to evaluate')
  s.state = restored[1]
  _check_finite_params(restored[1]['params'], restored[0], workdir)
  return restored[0], restored[1]


def _check_finite_params(params, step: int, workdir: str) -> None:
  """A CheckpointError naming the first parameter that holds NaN or inf (scores and samples of it are garbage)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  finite = jax.device_get(jax.jit(lambda t: jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), t))(params))
  bad = [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_leaves_with_path(finite) if not ok]
  if bad:
    raise CheckpointError(f'checkpoint step {step} in {workdir} holds non-finite (NaN or inf) parameters '
                          f'({len(bad)} tensors, first {bad[0]}); refusing to use it')


def check_corpus_given(cfg, workdir: str) -> None:
  """Refuses a workdir imported without a corpus while data.source is still the import's placeholder."""
  path = os.path.join(workdir, IMPORT_RECORD)
  if not os.path.exists(path):
    return
  record = files.read_json(path, 'import record', CheckpointError)
  if record.get('corpus') is None and cfg.data.source == record.get('placeholder_source'):
    raise DataError(f'{workdir} was imported from {record.get("source")} without a corpus: give one with '
                    '--config.data.source=SOURCE --allow_config_change (or import with --data_source=SOURCE)')

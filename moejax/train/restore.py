"""A run's workdir read back: its resolved config, its latest train state, its model.

`load_config` imports no jax, so a CLI can reject a bad workdir or flag in a fraction of a
second; the jax-side modules load inside `load_model` and `restore_state`.
"""

from __future__ import annotations

import os

from moejax import base_config, config as config_lib, files
from moejax.errors import CheckpointError, WorkdirError


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
  cfg = load_config(workdir) if cfg is None else cfg
  corpus = data.corpus_from_config(cfg.data)
  s = state_lib.setup(cfg, corpus)
  _, state = restore_state(s, workdir)
  return cfg, corpus, nnx.merge(s.graphdef, state['params'], state['buffers'])


def restore_state(s, workdir: str) -> tuple[int, dict]:
  """(step, state) of the latest checkpoint in `workdir`, onto the layout of `s` (a `train.state.Setup`)."""
  from moejax.train import checkpoint  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), use_async=False)
  try:
    restored = ckpt.restore_latest(checkpoint.abstract(s.state), move_aside=False)
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f'no checkpoint in {workdir}/checkpoints to evaluate')
  return restored[0], restored[1]

"""The one config hash and its documented key lists."""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

from moejax.config.loading import flatten

# The one config hash (`config_hash`) and its documented key lists (prefixes end with '.').
# Keys that never change what a run computes: how it is launched and tracked, how often it logs, scores
# and saves, how its data is read, and how the devices are arranged (checkpoints restore onto any mesh;
# results agree to float32 rounding, see docs/scaling-out.md). A workdir is bound to its config
# up to these keys (moejax/train/workdir.py).
RUN_NEUTRAL_KEYS = ('distributed.', 'wandb.', 'checkpoint.', 'mesh.', 'train.log_every_steps', 'train.peak_tflops',
                    'eval.every_steps', 'data.cache_dir', 'data.verify_store', 'data.read_threads',
                    'data.prefetch_batches', 'data.tfds_data_dir',
                    'model.scan_layers', 'model.remat')  # (same math, another program: float32 rounding too)
# Keys that pick one draw (or one label) of a configuration: results differing only here are seeds
# of one configuration (`moejax.results` groups them; hash with ignore=SEED_KEYS + LAUNCH_KEYS).
SEED_KEYS = ('name', 'seed', 'data.seed')
# How a run is launched and watched (joining a multi-process runtime, experiment tracking): never what
# it computes, so never in a results hash; keys under these prefixes can be added to base_config without
# changing any recorded hash (tests/config_test.py pins the README's).
LAUNCH_KEYS = ('distributed.', 'wandb.')
# Keys that do not change the compiled train or eval step: runs differing only here share one
# executable (a sweep over seeds, learning rates, run lengths or corpora compiles once).
STEP_NEUTRAL_KEYS = ('name', 'seed', 'data.seed', 'train.steps', 'optim.peak_learning_rate', 'optim.warmup_fraction',
                     'optim.schedule', 'optim.decay_fraction', 'optim.final_lr_fraction', 'optim.decay_branches',
                     'data.source', 'data.heldout_bytes', 'data.heldout_max_fraction', 'data.binary_documents',
                     'data.tfds_split', 'data.tfds_text_key', 'data.tfds_data_dir', 'data.tokenizer',
                     'data.separator_token', 'data.tokenizer_train_bytes', 'data.text_field', 'data.cache_dir',
                     'data.verify_store', 'data.read_threads', 'data.prefetch_batches', 'checkpoint.', 'eval.',
                     'distributed.', 'wandb.', 'train.log_every_steps', 'train.peak_tflops', 'train.init_from',
                     'train.init_from_router_std', 'train.init_from_noise')


def key_in(key: str, keys: Sequence[str]) -> bool:
  """Whether dotted `key` is one of `keys` or under one of its prefixes (entries ending with '.')."""
  return any(key == k or (k.endswith('.') and key.startswith(k)) for k in keys)


def config_hash(cfg_or_flat, ignore: Sequence[str] = RUN_NEUTRAL_KEYS, digits: int | None = 12) -> str:
  """sha256 hex digest (first `digits`; all with None) of a config's canonical JSON without the `ignore` keys.

  Takes a ConfigDict or its flattened dict. The defaults identify a run (a workdir's binding);
  `moejax.results` uses ignore=SEED_KEYS + LAUNCH_KEYS, digits=8; the step cache all digits of
  STEP_NEUTRAL_KEYS.
  """
  flat = cfg_or_flat if isinstance(cfg_or_flat, dict) else flatten(json.loads(cfg_or_flat.to_json_best_effort()))
  kept = {k: v for k, v in flat.items() if not key_in(k, ignore)}
  digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
  return digest if digits is None else digest[:digits]

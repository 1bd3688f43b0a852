"""A tiny MoE config for tests: `--config=tests/testdata/tiny.py:'<glob>'` trains on that glob."""

import os

from moejax import base_config as base
from moejax import config as config_lib, data


def write_corpus(directory: str, num_files: int = 40) -> str:
  """Copies `num_files` stdlib files of 2-12 KB into `directory`; returns a text: glob for them."""
  root, rels = data.stdlib_files()
  written = 0
  for rel in rels:
    path = os.path.join(root, rel)
    if 2000 <= os.path.getsize(path) <= 12000:
      with open(path, 'rb') as src, open(os.path.join(directory, f'doc{written:03d}.py'), 'wb') as dst:
        dst.write(src.read())
      written += 1
      if written == num_files:
        break
  return 'text:' + os.path.join(directory, '*.py')


def get_config(arg=None):
  """Tiny model and schedule; `arg` is the data source (default: the stdlib)."""
  c = base.get_config()
  c.name = 'tiny'
  c.model.model_dim = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.ffn_hidden = 64
  c.moe.num_experts = 4
  c.moe.experts_per_token = 2
  c.moe.expert_hidden = 32
  c.data.source = arg or 'stdlib'
  c.data.seq_len = 16
  c.data.heldout_bytes = 4000
  c.train.steps = 6
  c.train.batch_size = 4
  c.train.log_every_steps = 1
  c.checkpoint.every_steps = 3
  c.eval.batch_size = 4
  c.eval.max_batches = 3
  return config_lib.validate(c)


def get_sweep(arg=None):
  """Dense vs 4 experts, two seeds each, 2 steps: 4 points for sweep and results tests."""
  del arg
  return config_lib.product(config_lib.sweep('moe.num_experts', [0, 4]), config_lib.sweep('seed', [0, 1]),
                            [{'train.steps': 2}])


def check_arg(arg):
  """Any argument: it is the data source."""
  del arg

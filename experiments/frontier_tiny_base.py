"""The base of the shipped tiny frontier (experiments/frontier_tiny.py): the quickstart at half its batch and run length.

Question, command and cost are in experiments/frontier_tiny.py. The quickstart's model, data and optimizer
(d=64, L=2, byte tokens, renormalized gates), trained 150 steps of 16 x 128 tokens (307,200 tokens per run), so that
16 runs fit on a 2-core CPU shared with other jobs (about 1,100 tokens/s there on 2026-12-06).
"""

from moejax import config as config_lib


def get_config(arg=None):
  """The quickstart with train.steps=150, train.batch_size=16 (checkpoint at the end)."""
  del arg
  import os  # pylint: disable=import-outside-toplevel
  c = config_lib.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'quickstart.py')).get_config()
  c.name = 'frontier_tiny'
  c.train.steps = 150
  c.train.batch_size = 16
  c.checkpoint.every_steps = 150
  return c

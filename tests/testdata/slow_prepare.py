"""`python -m moejax.prepare`, slowed down so that a test can stop it in the middle of a chunk or of its plan.

SLOW_CHUNK_S: seconds the byte tokenizer sleeps per batch of documents (every chunk);
SLOW_PLAN_S: seconds the plan sleeps before choosing the held-out split (before plan.json exists).
Run it as a script (PYTHONPATH=the checkout): spawned workers re-import it as their main
module, so they are slowed too.
"""

import os
import time

from moejax.data import preparation, tokenizers

_encode = tokenizers.ByteTokenizer.encode_documents
_split_keys = preparation.split_keys


def _slow_encode(self, docs):
  time.sleep(float(os.environ.get('SLOW_CHUNK_S', '0')))
  return _encode(self, docs)


def _slow_split_keys(*args):
  time.sleep(float(os.environ.get('SLOW_PLAN_S', '0')))
  return _split_keys(*args)


tokenizers.ByteTokenizer.encode_documents = _slow_encode
preparation.split_keys = _slow_split_keys

if __name__ == '__main__':
  from moejax import cli, prepare  # pylint: disable=ungrouped-imports
  prepare.define_flags()
  cli.cli(prepare._main)  # pylint: disable=protected-access

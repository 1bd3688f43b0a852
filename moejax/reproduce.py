"""Re-run exactly the configuration behind a result.json and compare held-out losses.

  python -m moejax.reproduce RUNS/point/result.json --workdir=DIR

The resolved config stored in the record is applied key by key onto `experiments/base.py`
(so a key that no longer exists fails with its name); the corpus is re-read and must have
the recorded sha256 fingerprint, else the command refuses. It then trains and scores in
DIR and prints the original loss, the new loss and their difference. On CPU runs are
deterministic, so the difference is exactly zero.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags

from moejax import base_config, cli, config as config_lib, data, files

from moejax.train import run as run_lib
from moejax.errors import ConfigError, DataError

FLAGS = flags.FLAGS


def load_record(path: str) -> dict:
  """Reads a result.json; raises ConfigError with one line when it is missing or incomplete."""
  record = files.read_json(path, 'result record', ConfigError)
  missing = [k for k in ('config', 'data', 'eval') if k not in record]
  if missing:
    raise ConfigError(f'{path} is not a complete result record (missing {missing})')
  return record


def config_of(record: dict):
  """The record's resolved config, rebuilt on the current base config and validated."""
  return config_lib.validate(config_lib.apply_overrides(base_config.get_config(), config_lib.flatten(record['config'])))


def reproduce(path: str, workdir: str) -> tuple[float, float]:
  """Re-runs the record at `path` in `workdir`; returns (original loss, new loss)."""
  record = load_record(path)
  cfg = config_of(record)
  corpus = data.corpus_from_config(cfg.data)
  if corpus.fingerprint != record['data']['fingerprint']:
    raise DataError(f'corpus {cfg.data.source!r} now has fingerprint {corpus.fingerprint[:12]}, but the result was '
                    f'trained on {record["data"]["fingerprint"][:12]}; refusing to compare')
  if os.path.exists(os.path.join(workdir, 'result.json')):
    raise ConfigError(f'{workdir}/result.json exists; reproduce into a new --workdir')
  new = run_lib.execute(cfg, workdir)
  return record['eval']['loss'], new['eval']['loss']


def _main(argv):
  if len(argv) != 2 or not FLAGS.workdir:
    raise app.UsageError('usage: python -m moejax.reproduce RESULT_JSON --workdir=DIR')
  original, new = reproduce(argv[1], FLAGS.workdir)
  diff = new - original
  print(f'original held-out loss {original:.6f}\nreproduced             {new:.6f}\ndifference             {diff:+.3e}')
  if diff == 0:
    print('identical: the re-run reproduced the loss exactly')
  elif jax.default_backend() == 'cpu':
    print('NOT identical on CPU, where runs are deterministic: the code or environment changed')
    sys.exit(1)
  else:
    print(f'{jax.default_backend()} kernels are not bitwise deterministic; compare against seed noise')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'New directory for the re-run.')
  cli.cli(_main)

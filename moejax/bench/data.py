"""The data path against what an H100 consumes: store pipeline rate, preparation rate, memory.

  python -m moejax.bench.data [--store_gb=2.2] [--workdir=/tmp/moejax-bench-data]
  (or `python -m moejax.bench data ...`)

(1) tokens/s the token-store pipeline delivers to the host at the OLMoE-shaped config's batch
(experiments/bench/olmoe_h100.py: 4 x 4096) in this one process, against the tokens/s an H100
would consume at 40% MFU for that config (from the accounting's training FLOPs per token);
(2) `moejax.prepare` tokens/s per worker for bytes and a 32k BPE (one tokenizer thread per
worker), with 1 and 2 workers; (3) the peak resident memory of a short training run reading a
synthetic store of `--store_gb` GB, beside the same run on the in-memory stdlib corpus.
Scratch files go under --workdir (about 3x store_gb of disk).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import flags

from moejax import cli, config as config_lib, data
from moejax.model import accounting
from moejax.bench import common, tables
from moejax.errors import ConfigError


def _pipeline_rate(store_dir: str, seq_len: int, batch: int, batches: int) -> float:
  corpus = data.open_store(store_dir)
  it = iter(data.train_dataset(corpus, seq_len, batch, seed=0))
  next(it)  # (thread start-up)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch * seq_len / (time.perf_counter() - t0)


def _prepare_rate(source: str, tokenizer: str, out: str, workers: int) -> tuple[float, int]:
  """(tokens/s of the chunk phase, tokens) of a fresh `moejax.prepare` run with one tokenizer thread per worker."""
  import re  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  shutil.rmtree(out, ignore_errors=True)
  env = dict(os.environ, RAYON_NUM_THREADS='1')
  done = subprocess.run([sys.executable, '-m', 'moejax.prepare', f'--source={source}', f'--out={out}',
                         f'--tokenizer={tokenizer}', f'--workers={workers}', '--chunk_bytes=2MiB', '--quiet'],
                        capture_output=True, text=True, env=env, check=True)
  m = re.search(r'prepared \d+ chunk\(s\): (\d+) tokens in ([0-9.]+) s', done.stderr)
  return int(m.group(1)) / float(m.group(2)), int(m.group(1))


def _synthetic_store(directory: str, gigabytes: float) -> str:
  """A bytes-tokenizer store of about `gigabytes` GB of uint16 tokens, prepared from generated text files."""
  text_dir = os.path.join(directory, 'text')
  store_dir = os.path.join(directory, 'store')
  if os.path.exists(os.path.join(store_dir, 'manifest.json')):
    return store_dir
  os.makedirs(text_dir, exist_ok=True)
  rng = np.random.default_rng(0)
  words = np.array([''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), n)) for n in rng.integers(2, 9, 5000)])
  per_file, files = 8 << 20, int(gigabytes * 1e9 / 2 / (8 << 20)) + 1
  for i in range(files):
    path = os.path.join(text_dir, f'{i:05d}.txt')
    if not os.path.exists(path):
      chunk = ' '.join(words[rng.integers(0, len(words), per_file // 5)]).encode()[:per_file]
      with open(path, 'wb') as f:
        f.write(chunk)
  from moejax.data import preparation  # pylint: disable=import-outside-toplevel
  preparation.prepare(store_dir, data.SourceOptions(f'text:{text_dir}/*.txt'), 'bytes', heldout_bytes=24 << 20,
                      chunk_bytes=64 << 20, workers=2, progress=False)
  return store_dir


def _peak_rss_mb(source: str, workdir: str) -> float:
  """Peak RSS (MB) of a 40-step quickstart-sized training run (a subprocess) reading `source`."""
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  shutil.rmtree(workdir, ignore_errors=True)
  script = ('import resource, runpy, sys; sys.argv = sys.argv[1:]\n'
            'try:\n  runpy.run_module("moejax.main", run_name="__main__")\n'
            'finally:\n  print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)')
  done = subprocess.run([sys.executable, '-c', script, 'moejax.main', '--config=experiments/quickstart.py',
                         f'--workdir={workdir}', f'--config.data.source={source}', '--config.train.steps=40',
                         '--config.eval.max_batches=4', '--config.checkpoint.every_steps=20'],
                        capture_output=True, text=True)
  line = [l for l in done.stderr.splitlines() if l.startswith('PEAK_RSS_KB')]
  if done.returncode != 0 or not line:
    raise RuntimeError(f'training run on {source} failed: {done.stderr[-2000:]}')
  return int(line[-1].split()[1]) / 1024


def run(workdir: str, store_gb: float) -> dict:
  """{'pipeline': [row], 'prepare': rows, 'memory': rows, 'verify_s', 'store_gb'}: the three measurements."""
  from experiments.bench import olmoe_h100  # pylint: disable=import-outside-toplevel
  from moejax.data import preparation  # pylint: disable=import-outside-toplevel
  if not store_gb > 0:
    raise ConfigError(f'--store_gb={store_gb} must be > 0')
  os.makedirs(workdir, exist_ok=True)
  stdlib_store = os.path.join(workdir, 'stdlib-bytes')
  preparation.prepare(stdlib_store, data.SourceOptions('stdlib'), 'bytes', progress=False)
  cfg = config_lib.validate(config_lib.apply_overrides(olmoe_h100.get_config(), {}))
  consumed = 0.40 * 989e12 / accounting.count(cfg)['flops_per_token']
  L, B = cfg.data.seq_len, cfg.train.batch_size
  delivered = _pipeline_rate(stdlib_store, L, B, 400)
  out = {'pipeline': [{'batch': B, 'seq_len': L, 'delivered': delivered, 'consumed': consumed}], 'prepare': []}
  bpe = os.path.join(workdir, 'bpe32k')
  if not os.path.exists(os.path.join(bpe, 'tokenizer.json')):
    preparation.prepare(bpe, data.SourceOptions('stdlib'), 'train:bpe:32000', progress=False)
  for name, spec in (('bytes', 'bytes'), ('32k BPE', f'hf:{bpe}/tokenizer.json')):
    base_rate = None
    for workers in (1, 2):
      rate, tokens = _prepare_rate('stdlib', spec, os.path.join(workdir, f'prep-{workers}'), workers)
      base_rate = base_rate or rate
      out['prepare'].append({'tokenizer': name, 'workers': workers, 'tokens': tokens, 'rate': rate,
                             'speedup': rate / base_rate})
  big = _synthetic_store(os.path.join(workdir, 'synthetic'), store_gb)
  with open(os.path.join(big, 'manifest.json')) as f:
    splits = json.load(f)['splits']
  size = sum(os.path.getsize(os.path.join(big, s['file'])) for sp in splits.values() for s in sp['shards'])
  in_memory = data.load_corpus('stdlib', 131072, 0.1).train_tokens.nbytes
  t0 = time.perf_counter()
  data.open_store(big, 'bytes', 'full')
  out['verify_s'], out['store_gb'] = time.perf_counter() - t0, size / 1e9
  out['memory'] = [
      {'corpus': 'stdlib, in memory (bytes)', 'gb': in_memory / 1e9,
       'peak_mb': _peak_rss_mb('stdlib', os.path.join(workdir, 'rss-memory'))},
      {'corpus': 'synthetic token store', 'gb': size / 1e9,
       'peak_mb': _peak_rss_mb('store:' + big, os.path.join(workdir, 'rss-store'))}]
  return out


def render(result: dict) -> list[str]:
  """The Markdown of `run`'s result."""
  return (['## Store pipeline vs an H100 at 40% MFU (OLMoE-shaped config)', '']
          + tables.data_pipeline_table(result['pipeline'])
          + ['', '## moejax.prepare on the stdlib (one tokenizer thread per worker)', '']
          + tables.prepare_table(result['prepare'])
          + ['', '## Peak resident memory of a 40-step quickstart training run', '']
          + tables.memory_table(result['memory'])
          + ['', f'Opening the {result["store_gb"]:.2f} GB store with data.verify_store=full (sha256 and token range '
              f'of every shard, page cache warm): {result["verify_s"]:.1f} s.'])


def _main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  print(f'data benchmark: {os.cpu_count()} CPUs, {sys.platform}, python {sys.version.split()[0]}')
  print('\n'.join(render(run(FLAGS.workdir, FLAGS.store_gb))), flush=True)


def define_flags() -> None:
  """This benchmark's flags (defined only when it runs as a command)."""
  flags.DEFINE_float('store_gb', 2.2, 'Size of the synthetic token store for the memory measurement.')
  flags.DEFINE_string('workdir', '/tmp/moejax-bench-data', 'Scratch directory (stores, runs).')


def main() -> None:
  define_flags()
  cli.cli(common.command(_main))


if __name__ == '__main__':
  main()

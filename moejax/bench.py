"""Benchmarks that print ratios measured side by side in one process (never asserted in tests).

  python -m moejax.bench step [--config=experiments/quickstart.py] [--steps=10] [--rounds=5] [--cpu_devices=N]
  python -m moejax.bench moe [--small] [--rounds=5] [--dtype=bfloat16]
  python -m moejax.bench data [--store_gb=2.2] [--workdir=/tmp/moejax-bench-data]
  python -m moejax.bench decode [--config=experiments/quickstart.py] [--points=a,b] [--run=DIR ...]
      [--batches=1,8,64] [--context=N] [--decode_steps=32] [--rounds=5] [--copy_mb=512]
  python -m moejax.bench attention [--seq_lens=1024,4096] [--heads=16] [--kv_heads=16] [--head_dim=128]
      [--impls=xla,blockwise] [--dtype=float32] [--target=tpu]

`step`: the train-step time of every point of an experiment's sweep, on one fixed random
batch (data loading excluded), after compilation and warm-up. Points are timed in
interleaved rounds (A B C, A B C, ...) so machine noise hits all alike; the table gives
the median step time, tokens/s and the ratio to the first point (the dense baseline in
the quickstart). Each point runs on its own mesh (`mesh.*`), so
`--config=experiments/bench/expert_parallel.py --cpu_devices=8` compares expert-parallel
steps with the one-device step.

`moe`: per shape (E, D, F, routed rows M), forward and forward+backward TFLOP/s of a dense
matmul with the same FLOPs, the balanced batched einsum (capacity dispatch at CF 1),
`jax.lax.ragged_dot`, and moejax's block grouped matmul (`kernels` xla and pallas), with
ratios to the einsum; then the whole MoE layer (router, permutation, experts, combine;
forward+backward) with the routing share of its time, against a dense SwiGLU MLP of equal
active FLOPs, for balanced and skewed (max/mean load 2.3) grouped matmuls. The layer's "router +
top-k share" is 1 - (the layer with a fixed balanced assignment) / (the layer); the permutation
is in both. `--small` uses CPU-sized
shapes; on CPU the Pallas kernels run interpreted, so their times there measure the
interpreter, not the kernel, and the layer table leaves them out.

`data`: (1) tokens/s the token-store pipeline delivers to the host at the OLMoE-shaped
config's batch (experiments/bench/olmoe_h100.py: 4 x 4096) in this one process, against
the tokens/s an H100 would consume at 40% MFU for that config (from the accounting's
training FLOPs per token); (2) `moejax.prepare` tokens/s per worker for bytes and a 32k BPE
(one tokenizer thread per worker), with 1 and 2 workers; (3) the peak resident memory of a
short training run reading a synthetic store of `--store_gb` GB, beside the same run on
the in-memory stdlib corpus. Scratch files go under --workdir (about 3x store_gb of disk).

`decode`: KV-cache decoding against the bandwidth model; see `moejax.decode_bench`.

`attention`: compiled temporaries of one attention layer's forward+backward per `model.attention`
core (the compiler's memory analysis; nothing runs); see `moejax.model.attention_bench`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moejax import cli, config as config_lib, data
from moejax.model import accounting
from moejax.parallel import mesh as mesh_lib
from moejax.train import optim
from moejax.train import state as state_lib
from moejax.train import step as step_lib
from moejax.errors import ConfigError

FLAGS = flags.FLAGS


def step_benchmark(cfgs: list, steps: int, rounds: int) -> list[dict]:
  """Median seconds per train step of each config, timed in interleaved rounds."""
  runners = []
  corpus = data.corpus_from_config(cfgs[0].data)
  for cfg in cfgs:
    s = state_lib.setup(cfg, corpus)
    fn = step_lib.make_train_step(s.graphdef, optim.make(cfg.optim), cfg, state_lib.shardings(s.state), s.mesh)
    lr = np.float32(cfg.optim.peak_learning_rate)
    rng = np.random.default_rng(0)
    tokens = jax.device_put(rng.integers(0, 256, (cfg.train.batch_size, cfg.data.seq_len + 1), dtype=np.int32),
                            mesh_lib.batch_sharding(s.mesh, 2))
    state, seed = s.state, jnp.int32(cfg.seed)
    t0 = time.perf_counter()
    for _ in range(2):  # compile + warm-up
      state, out = fn(state, tokens, seed, lr)
    jax.block_until_ready(out)
    drop = out.get('ep_drop_fraction')
    runners.append({'cfg': cfg, 'fn': fn, 'seed': seed, 'lr': lr, 'state': state, 'tokens': tokens, 'times': [],
                    'compile_s': time.perf_counter() - t0,
                    'ep_dropped': None if drop is None else float(jnp.mean(drop))})
  for _ in range(rounds):
    for r in runners:
      state = r['state']
      t0 = time.perf_counter()
      for _ in range(steps):
        state, out = r['fn'](state, r['tokens'], r['seed'], r['lr'])
      jax.block_until_ready(out)
      r['times'].append((time.perf_counter() - t0) / steps)
      r['state'] = state
  base = statistics.median(runners[0]['times'])
  rows = []
  for r in runners:
    cfg, med = r['cfg'], statistics.median(r['times'])
    acc = accounting.count(cfg)
    rows.append({'name': cfg.name, 'n_total': acc['n_total'], 'n_active': acc['n_active'], 'step_ms': 1e3 * med,
                 'tokens_per_s': cfg.train.batch_size * cfg.data.seq_len / med, 'ratio': med / base,
                 'compile_s': r['compile_s'], 'ep_dropped': r['ep_dropped']})
  return rows


MOE_SHAPES = [(8, 4096, 14336, 16384), (64, 2048, 1024, 32768), (64, 2048, 1408, 65536), (128, 2048, 512, 32768),
              (64, 1024, 512, 32768)]
MOE_SHAPES_SMALL = [(8, 128, 256, 2048), (32, 64, 64, 2048)]


def _time(fns: dict, rounds: int, reps: int = 3) -> dict:
  """Median seconds per call of each jitted fn(), interleaved rounds after one warm-up call each."""
  for f in fns.values():
    jax.block_until_ready(f())
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      for _ in range(reps):
        out = f()
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t0) / reps)
  return {k: statistics.median(v) for k, v in times.items()}


def _group_sizes(M, E, skewed, block):
  """Rows per expert, multiples of `block`, summing to M; skewed: max/mean about 2.3."""
  if not skewed:
    return np.full(E, M // E)
  w = np.linspace(2.3, 0.3, E)
  sizes = np.maximum((w / w.sum() * M) // block * block, 0).astype(int)
  sizes[-1] += M - sizes.sum()
  return sizes


def moe_benchmark(shapes, rounds: int, dtype) -> list[str]:
  """Markdown lines: grouped-matmul throughput per shape and the MoE layer against a dense MLP."""
  from moejax import routing  # pylint: disable=import-outside-toplevel
  from moejax.kernels import gmm, permute, router  # pylint: disable=import-outside-toplevel
  lines = []
  for E, D, F, M in shapes:
    k_rng = jax.random.key(0)
    x = jax.random.normal(k_rng, (M, D), dtype)
    w = (jax.random.normal(jax.random.key(1), (E, D, F)) / np.sqrt(D)).astype(dtype)
    w_dense = w[0]
    flops = 2 * M * D * F
    block = 128 if M // E >= 128 else max(8, M // E)
    lines += [f'\n### E={E} D={D} F={F} rows={M} ({jnp.dtype(dtype).name}, block {block})', '',
              '| op | routing | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd vs einsum | fwd+bwd vs einsum |',
              '|---|---|---:|---:|---:|---:|']
    for skewed in (False, True):
      sizes = _group_sizes(M, E, skewed, block)
      be = jnp.asarray(np.repeat(np.arange(E), sizes // block), jnp.int32)
      sizes_j = jnp.asarray(sizes, jnp.int32)
      ops = {
          'dense x@W': lambda x, w: x @ w_dense,
          'batched einsum (balanced)': lambda x, w: jnp.einsum('emd,edf->emf', x.reshape(E, M // E, D), w),
          'jax.lax.ragged_dot': lambda x, w: jax.lax.ragged_dot(x, w, sizes_j),
          'block gmm (xla)': lambda x, w: gmm.block_gmm(x, w, be, block, 'xla'),
          'block gmm (pallas)': lambda x, w: gmm.block_gmm(x, w, be, block, 'pallas'),
      }
      fns = {}
      for name, op in ops.items():
        fwd = jax.jit(op)
        both = jax.jit(jax.grad(lambda x, w, op=op: jnp.sum(op(x, w).astype(jnp.float32) ** 2), (0, 1)))
        fns[(name, 'fwd')] = lambda f=fwd: f(x, w)
        fns[(name, 'both')] = lambda f=both: f(x, w)
      t = _time(fns, rounds)
      base_f, base_b = t[('batched einsum (balanced)', 'fwd')], t[('batched einsum (balanced)', 'both')]
      for name in ops:
        tf, tb = t[(name, 'fwd')], t[(name, 'both')]
        lines.append(f'| {name} | {"skewed 2.3" if skewed else "balanced"} | {flops / tf / 1e12:.2f} | '
                     f'{3 * flops / tb / 1e12:.2f} | {base_f / tf:.2f}x | {base_b / tb:.2f}x |')
    # The whole layer: T tokens, top-k with k*F = 4 * D/4 ... chosen so that T*k = M.
    K = 8 if E >= 64 else 2
    T = M // K
    lines += ['', f'MoE layer, T={T} tokens, top-{K}, forward+backward:', '',
              '| layer | kernels | ms | vs dense MLP of equal active FLOPs | router + top-k share |', '|---|---|---:|---:|---:|']
    xt = jax.random.normal(jax.random.key(2), (T, D), dtype)
    w_r = jax.random.normal(jax.random.key(3), (D, E), jnp.float32) / np.sqrt(D)
    wg, wu = w, (jax.random.normal(jax.random.key(4), (E, D, F)) / np.sqrt(D)).astype(dtype)
    wd = (jax.random.normal(jax.random.key(5), (E, F, D)) / np.sqrt(F)).astype(dtype)
    dense_w = [(jax.random.normal(jax.random.key(6 + i), shape) / np.sqrt(shape[0])).astype(dtype)
               for i, shape in enumerate(((D, K * F), (D, K * F), (K * F, D)))]

    def dense_mlp(x, ws):
      return (jax.nn.silu(x @ ws[0]) * (x @ ws[1])) @ ws[2]

    def layer(x, ws, impl, route=True):
      logits = x.astype(jnp.float32) @ w_r
      if route:
        _, experts, gates, _ = router.route(logits, K, impl=impl)
      else:  # routing replaced by a fixed balanced assignment: the experts-only cost
        experts = (jnp.arange(T)[:, None] * K + jnp.arange(K)[None]) % E
        gates = jnp.full((T, K), 1.0 / K) + 0 * logits[:, :K]
      plan = routing.block_plan(experts, E, block)
      rows = permute.dispatch_rows(x, plan, impl)
      h = jax.nn.silu(gmm.block_gmm(rows, ws[0], plan.block_expert_N, block, impl)) * gmm.block_gmm(
          rows, ws[1], plan.block_expert_N, block, impl)
      return permute.combine_rows(gmm.block_gmm(h, ws[2], plan.block_expert_N, block, impl), gates, plan, impl)

    grad = lambda f: jax.jit(jax.grad(lambda x, ws: jnp.sum(f(x, ws).astype(jnp.float32) ** 2), (0, 1)))
    fns = {'dense': lambda g=grad(dense_mlp): g(xt, dense_w)}
    # Interpreted Pallas (CPU) takes seconds per layer call and times the interpreter: left out there.
    impls = ('reference', 'xla') if jax.default_backend() == 'cpu' else ('reference', 'xla', 'pallas')
    for impl in impls:
      fns[impl] = lambda g=grad(lambda x, ws, i=impl: layer(x, ws, i)): g(xt, (wg, wu, wd))
      fns[impl + '-experts'] = lambda g=grad(lambda x, ws, i=impl: layer(x, ws, i, False)): g(xt, (wg, wu, wd))
    t = _time(fns, rounds)
    for impl in impls:
      share = max(0.0, 1 - t[impl + '-experts'] / t[impl])
      lines.append(f'| MoE | {impl} | {1e3 * t[impl]:.2f} | {t["dense"] / t[impl]:.2f}x | {share:.0%} |')
    lines.append(f'| dense SwiGLU (hidden {K * F}) | - | {1e3 * t["dense"]:.2f} | 1.00x | - |')
  return lines


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


def data_benchmark(workdir: str, store_gb: float) -> list[str]:
  """The three tables of `bench data`."""
  from experiments.bench import olmoe_h100  # pylint: disable=import-outside-toplevel
  from moejax.data import preparation  # pylint: disable=import-outside-toplevel
  os.makedirs(workdir, exist_ok=True)
  lines = []
  stdlib_store = os.path.join(workdir, 'stdlib-bytes')
  preparation.prepare(stdlib_store, data.SourceOptions('stdlib'), 'bytes', progress=False)
  cfg = config_lib.validate(config_lib.apply_overrides(olmoe_h100.get_config(), {}))
  acc = accounting.count(cfg)
  consumed = 0.40 * 989e12 / acc['flops_per_token']
  L, B = cfg.data.seq_len, cfg.train.batch_size
  delivered = _pipeline_rate(stdlib_store, L, B, 400)
  lines += ['## Store pipeline vs an H100 at 40% MFU (OLMoE-shaped config)', '',
            '| batch | delivered tokens/s (1 process) | H100 @ 40% MFU tokens/s | ratio |', '|---|---:|---:|---:|',
            f'| {B} x {L} | {delivered:,.0f} | {consumed:,.0f} | {delivered / consumed:.0f}x |', '']
  bpe = os.path.join(workdir, 'bpe32k')
  if not os.path.exists(os.path.join(bpe, 'tokenizer.json')):
    preparation.prepare(bpe, data.SourceOptions('stdlib'), 'train:bpe:32000', progress=False)
  lines += ['## moejax.prepare on the stdlib (one tokenizer thread per worker)', '',
            '| tokenizer | workers | tokens | tokens/s | tokens/s per worker | speed-up |', '|---|---:|---:|---:|---:|---:|']
  for name, spec in (('bytes', 'bytes'), ('32k BPE', f'hf:{bpe}/tokenizer.json')):
    base_rate = None
    for workers in (1, 2):
      rate, tokens = _prepare_rate('stdlib', spec, os.path.join(workdir, f'prep-{workers}'), workers)
      base_rate = base_rate or rate
      lines.append(f'| {name} | {workers} | {tokens:,} | {rate:,.0f} | {rate / workers:,.0f} | {rate / base_rate:.2f}x |')
  big = _synthetic_store(os.path.join(workdir, 'synthetic'), store_gb)
  with open(os.path.join(big, 'manifest.json')) as f:
    splits = json.load(f)['splits']
  size = sum(os.path.getsize(os.path.join(big, s['file'])) for sp in splits.values() for s in sp['shards'])
  in_memory = data.load_corpus('stdlib', 131072, 0.1).train_tokens.nbytes
  t0 = time.perf_counter()
  data.open_store(big, 'bytes', 'full')
  verify_s = time.perf_counter() - t0
  lines += ['', '## Peak resident memory of a 40-step quickstart training run', '',
            '| corpus | corpus size | peak RSS |', '|---|---:|---:|',
            f'| stdlib, in memory (bytes) | {in_memory / 1e9:.2f} GB | '
            f'{_peak_rss_mb("stdlib", os.path.join(workdir, "rss-memory")):,.0f} MB |',
            f'| synthetic token store | {size / 1e9:.2f} GB | {_peak_rss_mb("store:" + big, os.path.join(workdir, "rss-store")):,.0f} MB |',
            '', f'Opening the {size / 1e9:.2f} GB store with data.verify_store=full (sha256 and token range of every '
            f'shard, page cache warm): {verify_s:.1f} s.']
  return lines


def _main(argv):
  if len(argv) == 2 and argv[1] == 'data':
    print(f'data benchmark: {os.cpu_count()} CPUs, {sys.platform}, python {sys.version.split()[0]}')
    print('\n'.join(data_benchmark(FLAGS.workdir, FLAGS.store_gb)))
    return
  if FLAGS.cpu_devices:  # must happen before the first device query starts the CPU backend
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + f' --xla_force_host_platform_device_count={FLAGS.cpu_devices}')
  if len(argv) == 2 and argv[1] == 'decode':
    from moejax import decode_bench  # pylint: disable=import-outside-toplevel
    config = FLAGS.config if (FLAGS['config'].present or not FLAGS.run) else None
    points = [p for p in (FLAGS.points or '').split(',') if p]
    batches = [int(b) for b in FLAGS.batches.split(',') if b]
    try:
      models = decode_bench.load_models(config, points, FLAGS.run or [])
    except ValueError as e:
      raise ConfigError(str(e)) from None
    print(f'decode benchmark: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, '
          f'{os.cpu_count()} CPUs; {FLAGS.rounds} interleaved rounds of {FLAGS.decode_steps} greedy steps, median')
    print('\n'.join(decode_bench.run(models, batches, FLAGS.context, FLAGS.decode_steps, FLAGS.rounds, FLAGS.copy_mb)))
    return
  if len(argv) == 2 and argv[1] == 'attention':
    from moejax.model import attention_bench  # pylint: disable=import-outside-toplevel
    target = FLAGS.target or None
    print(f'attention temporaries: {target or jax.default_backend()} compiler, jax {jax.__version__}; one sequence, '
          f'H={FLAGS.heads}, G={FLAGS.kv_heads}, K={FLAGS.head_dim}, {FLAGS.dtype}, blocks {FLAGS.attention_blocks}, '
          'causal + document segment ids, forward+backward')
    blocks = tuple(int(b) for b in FLAGS.attention_blocks.split(','))
    print('\n'.join(attention_bench.run([int(x) for x in FLAGS.seq_lens.split(',')], FLAGS.impls.split(','),
                                        FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim, jnp.dtype(FLAGS.dtype), blocks,
                                        target)))
    return
  if len(argv) == 2 and argv[1] == 'moe':
    shapes = MOE_SHAPES_SMALL if FLAGS.small else MOE_SHAPES
    dtype = jnp.dtype(FLAGS.dtype)
    print(f'MoE kernel benchmark: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, '
          f'median of {FLAGS.rounds} interleaved rounds; TFLOP/s = 2*M*D*F per matmul (x3 for fwd+bwd)')
    if jax.default_backend() == 'cpu':
      print('(CPU: the Pallas rows run in interpret mode and time the interpreter, not a kernel; '
            'the MoE-layer table leaves Pallas out)')
    print('\n'.join(moe_benchmark(shapes, FLAGS.rounds, dtype)))
    return
  if len(argv) != 2 or argv[1] != 'step':
    raise app.UsageError('usage: python -m moejax.bench step|moe|data|decode|attention [--config=...] [--steps=N] [--rounds=N] [--small]')
  module = config_lib.load_module(FLAGS.config)
  points = module.get_sweep() if hasattr(module, 'get_sweep') else [{}]
  cfgs = [config_lib.validate(config_lib.apply_overrides(module.get_config(), p)) for p in points]
  rows = step_benchmark(cfgs, FLAGS.steps, FLAGS.rounds)
  print(f'train-step benchmark: {FLAGS.config}, {jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'{FLAGS.rounds} interleaved rounds of {FLAGS.steps} steps, median')
  print('| name | mesh | N_total | N_active | step ms | tok/s | ratio to first | EP dropped | compile+warmup s |')
  print('|---|---|---:|---:|---:|---:|---:|---:|---:|')
  for r, cfg in zip(rows, cfgs):
    mesh = 'x'.join(f'{a}{cfg.mesh[a]}' for a in ('data', 'fsdp', 'expert', 'tensor') if cfg.mesh[a] != 1) or '1'
    dropped = '-' if r['ep_dropped'] is None else f'{r["ep_dropped"]:.1%}'
    print(f'| {r["name"]} | {mesh} | {accounting.human(r["n_total"])} | {accounting.human(r["n_active"])} | '
          f'{r["step_ms"]:.1f} | {r["tokens_per_s"]:,.0f} | {r["ratio"]:.2f}x | {dropped} | {r["compile_s"]:.1f} |')
  sys.stdout.flush()


if __name__ == '__main__':
  flags.DEFINE_string('config', 'experiments/quickstart.py', 'Experiment file whose sweep points are timed.')
  flags.DEFINE_integer('steps', 10, 'Steps per timed round.')
  flags.DEFINE_integer('rounds', 5, 'Interleaved rounds (median taken).')
  flags.DEFINE_bool('small', False, 'moe: CPU-sized shapes.')
  flags.DEFINE_string('dtype', 'bfloat16', 'moe: input and weight dtype.')
  flags.DEFINE_float('store_gb', 2.2, 'data: size of the synthetic token store for the memory measurement.')
  flags.DEFINE_string('workdir', '/tmp/moejax-bench-data', 'data: scratch directory (stores, runs).')
  flags.DEFINE_string('points', None, 'decode: comma-separated sweep point names of --config (default: all).')
  flags.DEFINE_multi_string('run', None, 'decode: a trained run (workdir with checkpoints); repeat for several.')
  flags.DEFINE_string('batches', '1,8,64', 'decode: batch sizes.')
  flags.DEFINE_integer('context', None, 'decode: prompt length (default: data.seq_len - decode_steps).')
  flags.DEFINE_integer('decode_steps', 32, 'decode: greedy steps per timed round.')
  flags.DEFINE_integer('copy_mb', 512, 'decode: size of the array of the memory-bandwidth measurement.')
  flags.DEFINE_string('seq_lens', '1024,4096', 'attention: sequence lengths.')
  flags.DEFINE_integer('heads', 16, 'attention: query heads.')
  flags.DEFINE_integer('kv_heads', 16, 'attention: key/value heads.')
  flags.DEFINE_integer('head_dim', 128, 'attention: head width.')
  flags.DEFINE_string('impls', 'xla,blockwise', 'attention: model.attention cores, xla first.')
  flags.DEFINE_string('attention_blocks', '512,512', 'attention: q_block,kv_block.')
  flags.DEFINE_string('target', '', "attention: '' (this backend) or 'tpu' (deviceless v5p compile; needs libtpu).")
  flags.DEFINE_integer('cpu_devices', 0, 'Fake this many CPU devices (for meshes on a CPU machine); 0 = as is.')
  cli.cli(_main)

"""Benchmarks that print ratios measured side by side in one process (never asserted in tests).

  python -m moejax.bench step [--config=experiments/quickstart.py] [--steps=10] [--rounds=5] [--cpu_devices=N]
  python -m moejax.bench moe [--small] [--rounds=5] [--dtype=bfloat16]

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
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moejax import accounting, cli, config as config_lib, data, mesh as mesh_lib, optim, train

FLAGS = flags.FLAGS


def step_benchmark(cfgs: list, steps: int, rounds: int) -> list[dict]:
  """Median seconds per train step of each config, timed in interleaved rounds."""
  runners = []
  corpus = data.corpus_from_config(cfgs[0].data)
  for cfg in cfgs:
    s = train.setup(cfg, corpus)
    fn = train.make_train_step(s.graphdef, optim.make(cfg.optim, cfg.train.steps), cfg,
                               optim.schedule(cfg.optim, cfg.train.steps), train.shardings(s.state), s.mesh)
    rng = np.random.default_rng(0)
    tokens = jax.device_put(rng.integers(0, 256, (cfg.train.batch_size, cfg.data.seq_len + 1), dtype=np.int32),
                            mesh_lib.batch_sharding(s.mesh, 2))
    state, seed = s.state, jnp.int32(cfg.seed)
    t0 = time.perf_counter()
    for _ in range(2):  # compile + warm-up
      state, out = fn(state, tokens, seed)
    jax.block_until_ready(out)
    drop = out.get('ep_drop_fraction')
    runners.append({'cfg': cfg, 'fn': fn, 'seed': seed, 'state': state, 'tokens': tokens, 'times': [],
                    'compile_s': time.perf_counter() - t0,
                    'ep_dropped': None if drop is None else float(jnp.mean(drop))})
  for _ in range(rounds):
    for r in runners:
      state = r['state']
      t0 = time.perf_counter()
      for _ in range(steps):
        state, out = r['fn'](state, r['tokens'], r['seed'])
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


def _main(argv):
  if FLAGS.cpu_devices:  # must happen before the first device query starts the CPU backend
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + f' --xla_force_host_platform_device_count={FLAGS.cpu_devices}')
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
    raise app.UsageError('usage: python -m moejax.bench step|moe [--config=...] [--steps=N] [--rounds=N] [--small]')
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
  flags.DEFINE_integer('cpu_devices', 0, 'Fake this many CPU devices (for meshes on a CPU machine); 0 = as is.')
  cli.cli(_main)

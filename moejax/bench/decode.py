"""KV-cache decode measured against the bandwidth model (`moejax.inference.cost`).

  python -m moejax.bench.decode [--config=experiments/quickstart.py[:arg]] [--points=a,b] [--run=RUN ...]
      [--batches=1,8,64] [--context=N] [--decode_steps=32] [--rounds=5] [--copy_mb=512]
  (or `python -m moejax.bench decode ...`)

Models: every point of --config's sweep (random initialization), or the latest checkpoint of each
--run (a trained run, whose routing is what a trained model does). Prompts are windows of the
run's held-out tokens, `--context` long (default: data.seq_len - decode_steps); the cache holds
context + steps positions, which must fit the model's data.seq_len (as in `moejax.generate`).

Per model and batch size B, timed in interleaved rounds (median) after one untimed warm-up round:
the prefill, and `--decode_steps` greedy decode steps of the compiled, donated step
(`decode.Generator`, dispatch 'auto'). Beside each: the distinct experts the step's B tokens
touched per MoE layer (measured from the step's own routing), the uniform expectation
E(1 - (1 - k/E)^B) and the expectation from the measured expert loads; the bytes a step reads
(`decode_cost.step_bytes` with the measured touched experts); the achieved bytes/s; and the
model's time, bytes / the memory bandwidth this process measures with a large read (a float32
sum over --copy_mb MB; a copy's read+write rate is printed too), with measured/model.

A breakdown (the profile behind the ratio) times two ablations of the same step: `floor`, a
compiled function taking the same arguments (state and donated cache) that does almost nothing
(dispatch and argument handling), and `no FFN`, the step with every FFN skipped (attention,
norms, output projection, sampling). The step's top-level compiled ops are counted as well, and
the compute side of a roofline is printed beside the bytes: `decode_cost.step_flops` at the
rate of a float32 1024^3 matmul measured in the same process (where it exceeds the bytes' time,
the step is compute-bound and the bandwidth model is only a lower bound).

`run` returns rows (dicts); `moejax.bench.tables` renders them.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from moejax import cli, config as config_lib
from moejax.model import accounting, stack
from moejax.inference import decode
from moejax.inference import cost as decode_cost
from moejax.bench import common, tables
from moejax.errors import ConfigError


def _median_seconds(fn, x, rounds: int) -> float:
  """Median wall time of fn(x) over `rounds` calls, after one untimed call (compilation)."""
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def memory_bandwidth(megabytes: int, rounds: int = 5) -> dict[str, float]:
  """Bytes/s of a float32 sum (read) and of x + 1 (read + write) over `megabytes` MB, median of `rounds`."""
  x = jnp.ones((megabytes * (1 << 20) // 4,), jnp.float32)
  out = {'read': x.nbytes / _median_seconds(jax.jit(jnp.sum), x, rounds),
         'copy': 2 * x.nbytes / _median_seconds(jax.jit(lambda x: x + 1.0), x, rounds)}
  del x
  return out


def matmul_rate(size: int = 1024, rounds: int = 5) -> float:
  """FLOP/s of a float32 [size, size] x [size, size] matmul, median of `rounds` (the roofline's compute rate)."""
  return 2.0 * size ** 3 / _median_seconds(jax.jit(lambda a: a @ a), jnp.ones((size, size), jnp.float32), rounds)


def _prompts(corpus, batch: int, context: int, seed: int = 0) -> np.ndarray:
  held = np.asarray(corpus.heldout_tokens)
  if held.size < context + 1:
    raise ConfigError(f'the held-out split has {held.size} tokens, fewer than a context of {context}')
  starts = np.random.default_rng(seed).integers(0, held.size - context, batch)
  return np.stack([held[s:s + context] for s in starts]).astype(np.int32)


def _entry_ops(compiled) -> int:
  """Top-level instructions of the compiled entry computation (each a kernel, copy or call the runtime issues)."""
  text = compiled.as_text()
  entry = text[text.index('ENTRY'):]
  body = entry[entry.index('{') + 1:entry.index('\n}')]
  return sum(1 for line in body.splitlines() if '=' in line and not line.strip().startswith(('ROOT %tuple', '//'))
             and ' parameter(' not in line)


class _Case:
  """One model at one batch size: the generator, its ablations and the timings."""

  def __init__(self, name, cfg, model, batch: int, context: int, steps: int, corpus):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    self.name, self.cfg, self.batch, self.context, self.steps = name, cfg, batch, context, steps
    self.max_len = context + steps
    self.gen = decode.Generator(model, batch, self.max_len)
    self.tokens = jnp.asarray(_prompts(corpus, batch, context))
    self.lengths = jnp.full((batch,), context, jnp.int32)
    self.key, self.zero, self.one = jax.random.key(0), jnp.float32(0.0), jnp.float32(1.0)
    self.prefill = self.gen.prefill_for(self.tokens, self.lengths, self.key, self.zero, self.one)
    graphdef = self.gen.graphdef

    def no_ffn(state, cache, tokens_B, positions_B):
      logits, cache, _ = decode.forward(nnx.merge(graphdef, state), tokens_B[:, None], positions_B[:, None], cache,
                                        ffn=False)
      return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

    def floor(state, cache, tokens_B, positions_B):
      # The same arguments, nothing computed and the cache neither donated nor returned: XLA:CPU rewrote even a
      # one-element in-place update of a donated cache array as a whole-array select (13 ms at B = 64).
      del state, cache
      return tokens_B + positions_B[0]

    self.ablations = {'no FFN': jax.jit(no_ffn, donate_argnums=1), 'floor': jax.jit(floor)}
    self.ops = _entry_ops(self.gen.step)
    self.times = {'prefill': [], 'step': [], 'no FFN': [], 'floor': []}
    self.routes = []

  def round(self, warmup: bool = False) -> None:
    """One round: prefill, the decode steps and both ablations; a warm-up round records the routes, not the times."""
    g = self.gen
    times = {name: [] for name in self.times} if warmup else self.times
    cache = g.model.init_cache(self.batch, self.max_len)
    t0 = time.perf_counter()
    token, cache, _ = self.prefill(g.state, cache, self.tokens, self.lengths, self.key, self.zero, self.one)
    jax.block_until_ready(token)
    times['prefill'].append(time.perf_counter() - t0)
    positions = self.lengths
    routes = []
    t0 = time.perf_counter()
    for _ in range(self.steps):
      token, cache, step_routes = g.step(g.state, cache, token, positions, self.key, self.zero, self.one)
      routes.append(step_routes)
      positions = positions + 1
    jax.block_until_ready(token)
    times['step'].append((time.perf_counter() - t0) / self.steps)
    if warmup:
      self.routes = [tuple(np.asarray(r) for r in rs) for rs in routes]
    for name, fn in self.ablations.items():
      cache = g.model.init_cache(self.batch, self.max_len)
      positions, tok = self.lengths, token

      def call(tok, cache, positions, fn=fn):  # (the floor returns the token only; the cache stays as it is)
        out = fn(g.state, cache, tok, positions)
        return out if isinstance(out, tuple) else (out, cache)

      tok, cache = call(tok, cache, positions)  # (compile + warm-up outside the timing)
      jax.block_until_ready(tok)
      t0 = time.perf_counter()
      for _ in range(self.steps):
        tok, cache = call(tok, cache, positions)
        positions = positions + 1
      jax.block_until_ready(tok)
      times[name].append((time.perf_counter() - t0) / self.steps)
      del cache

  def row(self, bandwidth: float, flop_rate: float) -> dict:
    cfg = self.cfg
    acc = accounting.count(cfg)
    E, k = acc['num_experts'], acc['experts_per_token']
    sizes = np.asarray(accounting.routed_expert_sizes(cfg) if E else [], np.float64)
    med = {name: statistics.median(v) for name, v in self.times.items()}
    distinct, touched, from_loads = [], [], []
    if E and self.routes:
      layers = len(self.routes[0])
      for layer in range(layers):
        per_step = [np.unique(rs[layer]) for rs in self.routes]
        distinct.append(np.mean([u.size for u in per_step]))
        touched.append(np.mean([sizes[u].sum() for u in per_step]))
        counts = np.bincount(np.concatenate([rs[layer].reshape(-1) for rs in self.routes]), minlength=E)
        from_loads.append(decode_cost.expected_distinct_from_loads(counts / (len(self.routes) * self.batch),
                                                                    self.batch))
    param_bytes = jax.tree.leaves(self.gen.state)[0].dtype.itemsize
    kv_item = jnp.dtype(cfg.model.compute_dtype).itemsize
    cost = decode_cost.step_bytes(cfg, self.batch, self.max_len, param_bytes, kv_item, touched if E else None)
    uniform = cost['distinct_experts_uniform']
    model_s = cost['total'] / bandwidth
    return {
        'name': self.name, 'batch': self.batch, 'context': self.context, 'cache': self.max_len,
        'dispatch': decode.pick_dispatch('auto', self.batch, k or 1, E or 1) if E else '-',
        'prefill_ms': 1e3 * med['prefill'], 'step_ms': 1e3 * med['step'], 'tokens_per_s': self.batch / med['step'],
        'distinct': float(np.mean(distinct)) if distinct else None, 'distinct_uniform': uniform if E else None,
        'distinct_from_loads': float(np.mean(from_loads)) if from_loads else None,
        'weight_bytes': cost['weights_nonexpert'] + cost['weights_experts'], 'kv_bytes': cost['kv'],
        'total_bytes': cost['total'], 'achieved_bytes_per_s': cost['total'] / med['step'], 'model_ms': 1e3 * model_s,
        'ratio': med['step'] / model_s, 'floor_ms': 1e3 * med['floor'], 'no_ffn_ms': 1e3 * med['no FFN'],
        'ffn_ms': ffn_ms(1e3 * med['step'], 1e3 * med['no FFN']), 'rounds': len(self.times['step']),
        'ops': self.ops, 'step_memory_bytes': self.gen.memory.get('step'),
        'flops': decode_cost.step_flops(cfg, self.batch, self.max_len),
        'compute_ms': 1e3 * decode_cost.step_flops(cfg, self.batch, self.max_len) / flop_rate,
    }


def load_models(config: str | None, points: list[str], workdirs: list[str], context: int | None = None,
                steps: int | None = None):
  """[(name, cfg, model, corpus)]: the sweep points of `config` (random init) and the trained `workdirs`.

  With `steps`, each config is checked to fit `context` + `steps` positions before its model is built.
  """
  from moejax import data
  from moejax.train import restore
  from moejax.model import transformer as model_lib  # pylint: disable=import-outside-toplevel
  named = []
  if config:
    module = config_lib.load_module(config.split(':', 1)[0])
    arg = config.split(':', 1)[1] if ':' in config else None
    sweep = module.get_sweep(arg) if hasattr(module, 'get_sweep') else [{'name': module.get_config(arg).name}]
    chosen = [p for p in sweep if not points or p.get('name') in points]
    missing = set(points) - {p.get('name') for p in sweep}
    if missing:
      raise ConfigError(f'--points {sorted(missing)} are not points of {config}')
    for p in chosen:
      cfg = config_lib.validate(config_lib.apply_overrides(module.get_config(arg), p))
      named.append((p.get('name', cfg.name), cfg, None))
  named += [(w.rstrip('/').split('/')[-1], restore.load_config(w), w) for w in workdirs]
  for name, cfg, _ in named:
    decode.check_decodable(cfg)
    if steps is not None:
      check_context(name, cfg, context, steps)
  out, corpus = [], None
  for name, cfg, workdir in named:
    if workdir is None:
      corpus = corpus or data.corpus_from_config(cfg.data)
      cfg = stack.unscanned(cfg)  # (decoding runs the layers one by one)
      out.append((name, cfg, model_lib.build(cfg), corpus))
    else:
      cfg, run_corpus, model = restore.load_model(workdir, cfg)
      out.append((name, cfg, model, run_corpus))
  return out


def check_context(name: str, cfg, context: int | None, steps: int) -> None:
  """One ConfigError line when the prompt and the decoded steps do not fit the model's data.seq_len."""
  ctx = context or max(1, cfg.data.seq_len - steps)
  if ctx + steps > cfg.data.seq_len:
    raise ConfigError(f'--context={ctx} + --decode_steps={steps} exceeds the context of {name}, '
                      f'{cfg.data.seq_len} tokens (data.seq_len)')


def ffn_ms(step_ms: float, no_ffn_ms: float) -> float | None:
  """The FFN's share of a step (full - no-FFN medians), or None where it is below the timing noise (negative)."""
  diff = step_ms - no_ffn_ms
  return diff if diff >= 0 else None


def parse_batches(text: str) -> list[int]:
  """'1,8,64' -> [1, 8, 64]; anything else is one ConfigError line."""
  try:
    batches = [int(b) for b in text.split(',') if b.strip()]
  except ValueError:
    batches = []
  if not batches or min(batches) < 1:
    raise ConfigError(f'--batches={text!r} must be comma-separated positive integers, e.g. 1,8,64')
  return batches


def check(models, context: int | None, steps: int, rounds: int, copy_mb: int) -> None:
  """One ConfigError line for settings no model can be measured at (before anything is compiled)."""
  common.check_positive(decode_steps=steps, rounds=rounds, copy_mb=copy_mb, context=context)
  for name, cfg, _, _ in models:
    check_context(name, cfg, context, steps)


def run(models, batches: list[int], context: int | None, steps: int, rounds: int, copy_mb: int) -> dict:
  """{'bandwidth': {read, copy} bytes/s, 'matmul_flops': FLOP/s, 'copy_mb', 'rows': one dict per model and batch}.

  Each case runs one untimed warm-up round (first executions, the routes), then `rounds`
  timed rounds interleaved across batch sizes so machine noise hits all alike.
  """
  check(models, context, steps, rounds, copy_mb)
  bw = memory_bandwidth(copy_mb)
  rate = matmul_rate()
  rows = []
  for name, cfg, model, corpus in models:
    ctx = context or max(1, cfg.data.seq_len - steps)
    cases = [_Case(name, cfg, model, b, ctx, steps, corpus) for b in batches]
    for case in cases:
      case.round(warmup=True)
    for _ in range(rounds):
      for case in cases:
        case.round()
    rows += [case.row(bw['read'], rate) for case in cases]
    del cases
  return {'bandwidth': bw, 'matmul_flops': rate, 'copy_mb': copy_mb, 'rows': rows}


def render(result: dict) -> list[str]:
  """The Markdown of `run`'s result."""
  bw, rows = result['bandwidth'], result['rows']
  return ([f'memory bandwidth ({result["copy_mb"]} MB, median of 5): read {bw["read"] / 1e9:.1f} GB/s, copy '
           f'(read + write) {bw["copy"] / 1e9:.1f} GB/s; the model uses the read rate. float32 matmul (1024^3): '
           f'{result["matmul_flops"] / 1e9:.1f} GFLOP/s', '']
          + tables.decode_table(rows)
          + ['', 'Where the step time goes (the same step, ablated; medians; "-" where the FFN time is below the '
              'timing noise):', '']
          + tables.decode_breakdown_table(rows))


def _main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  batches = parse_batches(FLAGS.batches)
  check([], FLAGS.context, FLAGS.decode_steps, FLAGS.rounds, FLAGS.copy_mb)  # (the flags alone, before loading)
  config = FLAGS.config if (FLAGS['config'].present or not FLAGS.run) else None
  points = [p for p in (FLAGS.points or '').split(',') if p]
  models = load_models(config, points, FLAGS.run or [], FLAGS.context, FLAGS.decode_steps)
  print(f'decode benchmark: {common.device_line()}; {FLAGS.rounds} interleaved rounds of {FLAGS.decode_steps} '
        f'greedy steps after one warm-up round, median')
  print('\n'.join(render(run(models, batches, FLAGS.context, FLAGS.decode_steps, FLAGS.rounds, FLAGS.copy_mb))))


def define_flags() -> None:
  """This benchmark's flags (defined only when it runs as a command)."""
  flags.DEFINE_string('config', 'experiments/quickstart.py', 'Experiment file[:arg] whose sweep points are decoded.')
  flags.DEFINE_string('points', None, 'Comma-separated sweep point names of --config (default: all).')
  flags.DEFINE_multi_string('run', None, 'A trained run (workdir with checkpoints); repeat for several.')
  flags.DEFINE_string('batches', '1,8,64', 'Batch sizes.')
  flags.DEFINE_integer('context', None, 'Prompt length (default: data.seq_len - decode_steps).')
  flags.DEFINE_integer('decode_steps', 32, 'Greedy steps per timed round.')
  flags.DEFINE_integer('rounds', 5, 'Timed interleaved rounds (median taken), after one warm-up round.')
  flags.DEFINE_integer('copy_mb', 512, 'Size of the array of the memory-bandwidth measurement.')
  flags.DEFINE_integer('cpu_devices', 0, 'Fake this many CPU devices; 0 = as is.')


def main() -> None:
  define_flags()
  cli.cli(common.command(_main))


if __name__ == '__main__':
  main()

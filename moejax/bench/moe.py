"""Grouped-matmul and MoE-layer throughput per shape, side by side in one process.

  python -m moejax.bench.moe [--small] [--shapes=E:D:F:M,...] [--rounds=5] [--dtype=bfloat16]
      [--triton=BLOCK:TILE:WARPS:STAGES,...] [--layer_kernels=reference,xla,pallas]
  (or `python -m moejax.bench moe ...`)

Per shape (E experts, D model width, F expert hidden, M routed rows): forward and
forward+backward TFLOP/s of a dense matmul with the same FLOPs, the balanced batched einsum
(capacity dispatch at CF 1), `jax.lax.ragged_dot`, and moejax's block grouped matmul
(`kernels` xla and pallas), with ratios to the einsum, for balanced and skewed (max/mean load
2.3) groups. `--triton` adds a sweep of the Pallas grouped matmul over row blocks, output tiles
(`block_gmm`'s `tile`), Triton warps and pipeline stages (`kernels.gmm.TRITON`), balanced
groups, each against the einsum and `ragged_dot` of the same round. Then the whole MoE layer
(router, permutation, experts, combine; forward+backward) per `--layer_kernels`, with the
routing share of its time, against a dense SwiGLU MLP of equal active FLOPs. The layer's
"router + top-k share" is 1 - (the layer with a fixed balanced assignment) / (the layer); the
permutation is in both.

`--small` uses CPU-sized shapes. On CPU the Pallas kernels run interpreted (the TPU-family
kernels: warps and stages do not apply there), so their times measure the interpreter, not a
kernel, and the layer table leaves Pallas out unless `--layer_kernels` names it.
"""

from __future__ import annotations

import contextlib

from absl import flags

from moejax import cli
from moejax.bench import common, tables
from moejax.errors import ConfigError

SHAPES = [(8, 4096, 14336, 16384), (64, 2048, 1024, 32768), (64, 2048, 1408, 65536), (128, 2048, 512, 32768),
          (64, 1024, 512, 32768)]
SHAPES_SMALL = [(8, 128, 256, 2048), (32, 64, 64, 2048)]
EINSUM, RAGGED = 'batched einsum (balanced)', 'jax.lax.ragged_dot'


def parse_tuples(text: str, flag: str, width: int, example: str) -> list[tuple[int, ...]]:
  """'a:b:c,d:e:f' -> [(a, b, c), (d, e, f)] of positive integers; anything else is one ConfigError line."""
  out = []
  for item in (t for t in text.split(',') if t.strip()):
    try:
      values = tuple(int(v) for v in item.split(':'))
    except ValueError:
      values = ()
    if len(values) != width or min(values) < 1:
      raise ConfigError(f'--{flag}: {item!r} is not {width} positive integers joined by ":" (e.g. {example})')
    out.append(values)
  if not out:
    raise ConfigError(f'--{flag}={text!r} names nothing (e.g. {example})')
  return out


@contextlib.contextmanager
def triton_settings(num_warps: int, num_stages: int):
  """The GPU grouped matmul's Triton compiler parameters inside this block (read when a function is traced)."""
  from moejax.kernels import gmm  # pylint: disable=import-outside-toplevel
  saved = dict(gmm.TRITON)
  gmm.TRITON.update(num_warps=num_warps, num_stages=num_stages)
  try:
    yield
  finally:
    gmm.TRITON.clear()
    gmm.TRITON.update(saved)


def _group_sizes(M, E, skewed, block):
  """Rows per expert, multiples of `block`, summing to M; skewed: max/mean about 2.3."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if not skewed:
    return np.full(E, M // E)
  w = np.linspace(2.3, 0.3, E)
  sizes = np.maximum((w / w.sum() * M) // block * block, 0).astype(int)
  sizes[-1] += M - sizes.sum()
  return sizes


def _kernel(block: int, D: int, F: int, tile: int) -> str:
  """What the Pallas grouped matmul runs at these settings: 'triton', 'xla fallback' (tiles), or 'interpret'."""
  from moejax import kernels  # pylint: disable=import-outside-toplevel
  from moejax.kernels import gmm  # pylint: disable=import-outside-toplevel
  if kernels.platform() != 'gpu':
    return 'interpret'
  return 'triton' if gmm.triton_tiles(block, D, F, tile) and gmm.triton_tiles(block, F, D, tile) else 'xla fallback'


def _block(M, E):
  return 128 if M // E >= 128 else max(8, M // E)


def _fwd_and_both(op, x, w):
  """(forward, forward+backward) thunks of op(x, w), both jitted; loss = sum(y^2) keeps the forward."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  fwd = jax.jit(op)
  both = jax.jit(jax.grad(lambda x, w: jnp.sum(op(x, w).astype(jnp.float32) ** 2), (0, 1)))
  return (lambda: fwd(x, w)), (lambda: both(x, w))


def _compiled(op, x, w):
  """Like `_fwd_and_both`, compiled now (so settings read at trace time, such as Triton's, apply)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  fwd = jax.jit(op).lower(x, w).compile()
  both = jax.jit(jax.grad(lambda x, w: jnp.sum(op(x, w).astype(jnp.float32) ** 2), (0, 1))).lower(x, w).compile()
  return (lambda: fwd(x, w)), (lambda: both(x, w))


def gmm_rows(shape, rounds: int, dtype, sweep=()) -> tuple[list[dict], list[dict]]:
  """(grouped-matmul rows per op and routing, Triton-sweep rows) for one shape."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from moejax.kernels import gmm  # pylint: disable=import-outside-toplevel
  E, D, F, M = shape
  x = jax.random.normal(jax.random.key(0), (M, D), dtype)
  w = (jax.random.normal(jax.random.key(1), (E, D, F)) / np.sqrt(D)).astype(dtype)
  flops, block = 2 * M * D * F, _block(M, E)
  rows, sweep_rows = [], []
  for skewed in (False, True):
    sizes = _group_sizes(M, E, skewed, block)
    be = jnp.asarray(np.repeat(np.arange(E), sizes // block), jnp.int32)
    sizes_j = jnp.asarray(sizes, jnp.int32)
    ops = {
        'dense x@W': lambda x, w: x @ w[0],
        EINSUM: lambda x, w: jnp.einsum('emd,edf->emf', x.reshape(E, M // E, D), w),
        RAGGED: lambda x, w: jax.lax.ragged_dot(x, w, sizes_j),
        'block gmm (xla)': lambda x, w: gmm.block_gmm(x, w, be, block, 'xla'),
        'block gmm (pallas)': lambda x, w: gmm.block_gmm(x, w, be, block, 'pallas'),
    }
    fns = {}
    for name, op in ops.items():
      fns[(name, 'fwd')], fns[(name, 'both')] = _fwd_and_both(op, x, w)
    if not skewed:
      for b, tile, warps, stages in sweep:
        be_b = jnp.asarray(np.repeat(np.arange(E), sizes // b), jnp.int32) if M // E % b == 0 else None
        if be_b is None:
          continue  # (rows per expert not a multiple of this block)
        with triton_settings(warps, stages):
          op = lambda x, w, be_b=be_b, b=b, tile=tile: gmm.block_gmm(x, w, be_b, b, 'pallas', tile)
          fns[((b, tile, warps, stages), 'fwd')], fns[((b, tile, warps, stages), 'both')] = _compiled(op, x, w)
    t = common.time_medians(fns, rounds)
    base_f, base_b = t[(EINSUM, 'fwd')], t[(EINSUM, 'both')]
    rate = lambda n, s: common.ratio(n * flops / 1e12, s)
    for name in ops:
      tf, tb = t[(name, 'fwd')], t[(name, 'both')]
      rows.append({'shape': shape, 'block': block, 'op': name, 'routing': 'skewed 2.3' if skewed else 'balanced',
                   'fwd_tflops': rate(1, tf), 'both_tflops': rate(3, tb),
                   'fwd_vs_einsum': common.ratio(base_f, tf), 'both_vs_einsum': common.ratio(base_b, tb)})
    for key in (k for k, p in fns if isinstance(k, tuple) and p == 'fwd'):
      tf, tb = t[(key, 'fwd')], t[(key, 'both')]
      sweep_rows.append({'shape': shape, 'block': key[0], 'tile': key[1], 'num_warps': key[2], 'num_stages': key[3],
                         'kernel': _kernel(key[0], D, F, key[1]),
                         'fwd_tflops': rate(1, tf), 'both_tflops': rate(3, tb),
                         'fwd_vs_einsum': common.ratio(base_f, tf), 'both_vs_einsum': common.ratio(base_b, tb),
                         'both_vs_ragged': common.ratio(t[(RAGGED, 'both')], tb)})
  return rows, sweep_rows


def layer_rows(shape, rounds: int, dtype, kernels: tuple[str, ...]) -> list[dict]:
  """The MoE layer (T = M / K tokens, top-K) forward+backward per kernel family, and the dense SwiGLU baseline."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from moejax import routing  # pylint: disable=import-outside-toplevel
  from moejax.kernels import gmm, permute, router  # pylint: disable=import-outside-toplevel
  E, D, F, M = shape
  K = 8 if E >= 64 else 2
  T, block = M // K, _block(M, E)
  xt = jax.random.normal(jax.random.key(2), (T, D), dtype)
  w_r = jax.random.normal(jax.random.key(3), (D, E), jnp.float32) / np.sqrt(D)
  ws = tuple((jax.random.normal(jax.random.key(1 + i), s) / np.sqrt(s[1])).astype(dtype)
             for i, s in enumerate(((E, D, F), (E, D, F), (E, F, D))))
  dense_w = [(jax.random.normal(jax.random.key(6 + i), s) / np.sqrt(s[0])).astype(dtype)
             for i, s in enumerate(((D, K * F), (D, K * F), (K * F, D)))]

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
    mm = lambda a, w: gmm.block_gmm(a, w, plan.block_expert_N, block, impl)
    h = jax.nn.silu(mm(rows, ws[0])) * mm(rows, ws[1])
    return permute.combine_rows(mm(h, ws[2]), gates, plan, impl)

  grad = lambda f: jax.jit(jax.grad(lambda x, ws: jnp.sum(f(x, ws).astype(jnp.float32) ** 2), (0, 1)))
  fns = {'dense': lambda g=grad(dense_mlp): g(xt, dense_w)}
  for impl in kernels:
    fns[impl] = lambda g=grad(lambda x, ws, i=impl: layer(x, ws, i)): g(xt, ws)
    fns[impl + '-experts'] = lambda g=grad(lambda x, ws, i=impl: layer(x, ws, i, False)): g(xt, ws)
  t = common.time_medians(fns, rounds)
  base = {'shape': shape, 'tokens': T, 'top_k': K}
  share = lambda impl: None if common.ratio(t[impl + '-experts'], t[impl]) is None else max(
      0.0, 1 - t[impl + '-experts'] / t[impl])
  rows = [{**base, 'layer': 'MoE', 'kernels': impl, 'ms': 1e3 * t[impl] if t[impl] else None,
           'vs_dense': common.ratio(t['dense'], t[impl]), 'router_share': share(impl)} for impl in kernels]
  return rows + [{**base, 'layer': f'dense SwiGLU (hidden {K * F})', 'kernels': '-',
                  'ms': 1e3 * t['dense'] if t['dense'] else None, 'vs_dense': 1.0 if t['dense'] else None,
                  'router_share': None}]


def run(shapes, rounds: int, dtype, sweep=(), kernels=None) -> dict:
  """{'gmm': rows, 'sweep': rows, 'layer': rows} over `shapes` ((E, D, F, M) each)."""
  import jax  # pylint: disable=import-outside-toplevel
  common.check_positive(rounds=rounds)
  if kernels is None:  # interpreted Pallas (CPU) takes seconds per layer call and times the interpreter
    kernels = ('reference', 'xla') if jax.default_backend() == 'cpu' else ('reference', 'xla', 'pallas')
  out = {'gmm': [], 'sweep': [], 'layer': []}
  for part in parts(shapes, rounds, dtype, sweep, kernels):
    for key, rows in part.items():
      out[key] += rows
  return out


def parts(shapes, rounds: int, dtype, sweep=(), kernels=('xla',)):
  """Yields {'gmm', 'sweep'} then {'layer'} rows shape by shape (so a caller can print each as it comes)."""
  for shape in shapes:
    check_shape(shape)
  for shape in shapes:
    rows, sweep_rows = gmm_rows(shape, rounds, dtype, sweep)
    yield {'gmm': rows, 'sweep': sweep_rows}
    yield {'layer': layer_rows(shape, rounds, dtype, tuple(kernels))}


def check_shape(shape) -> None:
  """One ConfigError line for a shape the benchmark cannot lay out (rows per expert, tokens per top-k)."""
  E, _, _, M = shape
  if M % E or M % (8 if E >= 64 else 2):
    raise ConfigError(f'--shapes: rows M={M} must be a multiple of E={E} and of top-k ({8 if E >= 64 else 2})')


def render(result: dict) -> list[str]:
  """The Markdown of `run`'s result (or of one part of it)."""
  lines = []
  if result.get('gmm'):
    lines += ['## Grouped matmul', ''] + tables.gmm_table(result['gmm']) + ['']
  if result.get('sweep'):
    lines += ['## Pallas grouped matmul: Triton settings (balanced groups)', ''] + tables.sweep_table(result['sweep'])
    lines += ['']
  if result.get('layer'):
    lines += ['## MoE layer, forward+backward', ''] + tables.layer_table(result['layer']) + ['']
  return lines


def _main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  common.check_positive(rounds=FLAGS.rounds)
  shapes = (parse_tuples(FLAGS.shapes, 'shapes', 4, '64:2048:1024:32768') if FLAGS.shapes
            else SHAPES_SMALL if FLAGS.small else SHAPES)
  for shape in shapes:
    check_shape(shape)
  sweep = parse_tuples(FLAGS.triton, 'triton', 4, '128:128:4:3') if FLAGS.triton else ()
  kernels = None
  if FLAGS.layer_kernels:
    kernels = [k for k in FLAGS.layer_kernels.split(',') if k]
    bad = [k for k in kernels if k not in ('reference', 'xla', 'pallas')]
    if bad or not kernels:
      raise ConfigError(f'--layer_kernels={FLAGS.layer_kernels!r}: each must be reference, xla or pallas')
  try:
    dtype = jnp.dtype(FLAGS.dtype)
  except TypeError:
    raise ConfigError(f'--dtype={FLAGS.dtype!r} is not a dtype (e.g. bfloat16, float32)') from None
  print(f'MoE kernel benchmark: {common.device_line()}; median of {FLAGS.rounds} interleaved rounds; '
        f'TFLOP/s = 2*M*D*F per matmul (x3 for fwd+bwd)')
  if jax.default_backend() == 'cpu':
    print('(CPU: the Pallas rows run in interpret mode and time the interpreter, not a kernel)')
  if kernels is None:
    kernels = ('reference', 'xla') if jax.default_backend() == 'cpu' else ('reference', 'xla', 'pallas')
  for part in parts(shapes, FLAGS.rounds, dtype, sweep, kernels):  # each table as soon as it is measured
    print('\n'.join(render(part)), flush=True)


def define_flags() -> None:
  """This benchmark's flags (defined only when it runs as a command)."""
  flags.DEFINE_bool('small', False, 'CPU-sized shapes.')
  flags.DEFINE_string('shapes', None, 'E:D:F:M,... (experts, width, expert hidden, routed rows); default: '
                      'the GPU shapes (or --small).')
  flags.DEFINE_integer('rounds', 5, 'Interleaved rounds (median taken).')
  flags.DEFINE_string('dtype', 'bfloat16', 'Input and weight dtype.')
  flags.DEFINE_string('triton', None, 'BLOCK:TILE:WARPS:STAGES,...: a sweep of the Pallas grouped matmul settings.')
  flags.DEFINE_string('layer_kernels', None, 'Kernel families of the layer table (default: reference,xla[,pallas '
                      'off CPU]).')


def main() -> None:
  define_flags()
  cli.cli(common.command(_main))


if __name__ == '__main__':
  main()

"""The design search: the best MoE for a memory and an inference budget (SCIENCE.md §5, paper A's principle).

  python -m moejax.design --memory=2GB --active=2e8 [--flops_per_token=1e9] [--dtype=bfloat16]
      [--memory_for=weights|inference|training] [--decode_bytes=300MB | --decode_ms=0.1 --bandwidth=3.35TB]
      [--decode_batch=8] [--decode_context=N] [--tiebreak=n_exp_asc|granularity] [--top=20]
      [--config=experiments/base.py] [--emit=experiments/my_design.py]

Enumerates depth L, width d (heads = d / head_dim), granularity G = d / d_exp, routed
experts E (E = 1 is a dense FFN of width d_exp), top-k (k divides E) and 0 or 1 shared
expert of width d_exp; every layer is MoE. It keeps the configurations whose memory,
active parameters, forward FLOPs per token and decode bytes per step fit the budgets, and ranks them:

  1. N_total, in buckets of 3% of the largest feasible N_total (bucket 0 = within 3%),
  2. sparsity s = E / k ascending (spend the active budget on k),
  3. the tie-break: `n_exp_asc` (fewer experts, paper A) or `granularity` (G closest to
     --target_granularity, fine-grained experts as in Krajewski et al. and paper B),
  4. core size L * d^2 descending,
  5. aspect d / L closest to --aspect.

Memory is parameters (a plain number) or bytes (a number with B, KB, MB, GB, TB or KiB, MiB,
GiB, TiB), converted with --dtype (so is --active given in bytes: --active=400MB at bfloat16 is
2e8 active parameters, as --memory=400MB is 2e8 parameters): `weights` counts N_total (embeddings included);
`inference` adds the KV cache of --kv_batch sequences of --seq_len tokens; `training` is
16 bytes per parameter whatever --dtype says (TRAINING_BYTES_PER_PARAM: moejax keeps float32
master parameters, float32 gradients and two float32 Adam moments; activations not included). Forward FLOPs per
token follow moejax.model.accounting (matmuls of the active parameters plus attention at
--seq_len). Counts follow moejax.model.accounting exactly; the vocabulary, tied embeddings,
QK-norm and shared-expert gate come from --config.

The decode budget prices inference by memory traffic, the bound at decode: the bytes one decode
step of --decode_batch sequences reads (non-expert weights, the expected distinct experts
E(1 - (1 - k/E)^B) per layer, the KV cache of --decode_context positions), the bandwidth model
of `moejax.inference.cost` that `python -m moejax.bench decode` checks against measurements.
--decode_ms=X --bandwidth=Y is the same budget as --decode_bytes=X/1000*Y.

--emit=FILE writes an experiment file whose get_sweep() trains the top --top designs
on --config's settings (`python -m moejax.sweep --config=FILE --root=DIR`).
"""

from __future__ import annotations

import dataclasses
import datetime
import math

import numpy as np

from moejax import cli, config as config_lib
from moejax.inference import cost as decode_cost
from moejax.studies import emitted
from moejax.errors import ConfigError

BYTES_PER_PARAM = {'float32': 4, 'bfloat16': 2, 'float16': 2, 'int8': 1, 'fp8': 1}
BUCKET = 0.03
TIEBREAKS = ('n_exp_asc', 'granularity')


def bytes_budget(text: str | None, bytes_per_param: float) -> float | None:
  """A memory budget in bytes: bytes as given ('2GB'), parameters ('1.5e9') times `bytes_per_param`."""
  if not text:
    return None
  amount, is_bytes = cli.parse_amount(text)
  return amount if is_bytes else amount * bytes_per_param


def params_budget(text: str | None, bytes_per_param: float) -> float | None:
  """A parameter budget: parameters as given ('2e8'), bytes ('400MB') divided by `bytes_per_param`, the same
  conversion as the memory budget (so --active=400MB and --memory=400MB mean the same 2e8 bfloat16 parameters)."""
  if not text:
    return None
  amount, is_bytes = cli.parse_amount(text)
  return amount / bytes_per_param if is_bytes else amount


def parse_grid(text: str, cast=int, minimum: float = 1, name: str = 'grid', strict: bool = False) -> list:
  """'2,4,8' -> [2, 4, 8]; 'a:b:step' -> range(a, b + 1, step). Every value finite and >= `minimum` (> with
  `strict`; 0 where a count may be none, e.g. shared experts), and the grid not empty, or one ConfigError line
  naming `name`."""
  text = str(text).strip()
  try:
    if ':' in text:
      a, b, step = (int(x) for x in text.split(':'))
      values = list(range(a, b + 1, step)) if step > 0 else []
    else:
      values = sorted({cast(x) for x in text.split(',') if x.strip()})
  except ValueError:
    raise ConfigError(f'cannot parse the {name} {text!r}; use 2,4,8 or start:stop:step') from None
  bad = [v for v in values if not math.isfinite(v) or v < minimum or (strict and v == minimum)]
  if bad or not values:
    raise ConfigError(f'the {name} {text!r} ' + (f'has {bad[0]!r}: every value must be a finite number '
                                                  f'{">" if strict else ">="} {minimum:g}' if bad else 'is empty'))
  return values


@dataclasses.dataclass
class Space:
  """The grid to enumerate and the fixed architecture settings (from the base config)."""
  layers: list[int]
  widths: list[int]
  granularities: list[float]
  experts: list[int]
  max_topk: int
  shared: list[int]
  head_dim: int
  kv_group: int
  vocab_size: int
  tied_embeddings: bool
  qk_norm: bool
  shared_gate: bool
  seq_len: int
  aspect_range: tuple[float, float]
  min_expert_hidden: int = 8
  min_topk: int = 1  # 2 excludes top-1 MoE designs (whose renormalized gate is a constant 1)


@dataclasses.dataclass
class Budget:
  """Budgets in parameters, FLOPs and bytes; None = unconstrained."""
  memory_bytes: float | None
  active: float | None
  flops_per_token: float | None
  bytes_per_param: float
  memory_for: str = 'weights'
  kv_batch: int = 1
  decode_bytes: float | None = None  # bytes one decode step may read (moejax.inference.cost)
  decode_batch: int = 1  # sequences per decode step
  decode_context: int | None = None  # positions in each sequence's KV cache (default: the space's seq_len)


def space_from_config(cfg, **overrides) -> Space:
  """The default search space on `cfg`'s fixed settings (vocab, tying, QK-norm, context)."""
  m = cfg.model
  fields = dict(layers=[2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64],
                widths=list(range(128, 1024, 64)) + list(range(1024, 4096, 128)) + list(range(4096, 8193, 256)),
                granularities=[0.25, 0.5, 1, 2, 4, 8], experts=[1] + [2**i for i in range(1, 10)], max_topk=16,
                shared=[0, 1], head_dim=64, kv_group=1, vocab_size=config_lib.vocab_size(cfg),
                tied_embeddings=bool(m.use_tied_embeddings), qk_norm=bool(m.use_qk_norm),
                shared_gate=bool(cfg.moe.use_shared_expert_gate), seq_len=cfg.data.seq_len, aspect_range=(16, 512))
  fields.update(overrides)
  return Space(**fields)


def enumerate_designs(space: Space) -> dict[str, np.ndarray]:
  """Every grid point that passes the shape guards, as columns, with exact counts (float64, exact below 2^53)."""
  rows = []
  routed = sorted({(1, 1)} | {(e, k) for e in space.experts if e > 1
                              for k in range(space.min_topk, min(e, space.max_topk) + 1) if e % k == 0})
  for L in space.layers:
    for d in space.widths:
      if d % space.head_dim or not space.aspect_range[0] <= d / L <= space.aspect_range[1]:
        continue
      heads = d // space.head_dim
      if heads % space.kv_group:
        continue
      for g in space.granularities:
        f = d / g
        if f != int(f) or f < space.min_expert_hidden:
          continue
        for e, k in routed:
          for sh in (space.shared if e > 1 else [0]):
            rows.append((L, d, heads, heads // space.kv_group, int(f), g, e, k, sh))
  if not rows:
    raise ConfigError('the search grid is empty after the shape guards (widths divisible by head_dim, '
                      f'd/L in {space.aspect_range}); widen --layers/--widths/--aspect_range')
  a = np.array(rows, dtype=np.float64)
  L, d, h, hkv, f, g, e, k, sh = a.T
  dh, V = space.head_dim, space.vocab_size
  attn = d * h * dh * 2 + 2 * d * hkv * dh
  norms = 2 * d + (2 * dh if space.qk_norm else 0)
  moe = e > 1
  expert = 3 * d * f
  always = np.where(moe, d * e + sh * expert + (d * (sh > 0) if space.shared_gate else 0), 0)
  ffn_total = np.where(moe, always + e * expert, expert)
  ffn_active = np.where(moe, always + k * expert, expert)
  embed = V * d * (1 if space.tied_embeddings else 2)
  total_nonembed = L * (attn + norms + ffn_total) + d
  active_nonembed = L * (attn + norms + ffn_active) + d
  active_matmul = active_nonembed - d - L * norms + V * d
  flops = 2 * active_matmul + 4 * L * h * dh * space.seq_len  # (as moejax.model.accounting: no causal halving)
  return {'layers': L, 'width': d, 'heads': h, 'kv_heads': hkv, 'expert_hidden': f, 'granularity': g,
          'experts': e, 'topk': k, 'shared': sh, 'n_total': total_nonembed + embed, 'n_total_nonembed': total_nonembed,
          'n_active': active_nonembed + embed, 'flops': flops}


TRAINING_BYTES_PER_PARAM = 16  # float32 parameters (4) + float32 gradients (4) + two float32 Adam moments (8)


def memory_bytes(designs: dict[str, np.ndarray], space: Space, budget: Budget) -> np.ndarray:
  """Bytes each design needs under `budget.memory_for`."""
  weights = designs['n_total'] * budget.bytes_per_param
  if budget.memory_for == 'weights':
    return weights
  if budget.memory_for == 'inference':
    kv = 2 * designs['layers'] * designs['kv_heads'] * space.head_dim * space.seq_len * budget.kv_batch
    return weights + kv * budget.bytes_per_param
  if budget.memory_for == 'training':
    return designs['n_total'] * TRAINING_BYTES_PER_PARAM
  raise ConfigError(f'memory_for={budget.memory_for!r} must be weights, inference or training')


def decode_bytes(designs: dict[str, np.ndarray], space: Space, budget: Budget) -> np.ndarray:
  """Bytes a decode step of `budget.decode_batch` tokens reads (`moejax.inference.cost.step_bytes`'s bandwidth
  model, uniform routing): non-expert weights, the expected touched experts, the KV cache, at --dtype."""
  B, bpp = budget.decode_batch, budget.bytes_per_param
  context = budget.decode_context or space.seq_len
  L, d, e, k = designs['layers'], designs['width'], designs['experts'], designs['topk']
  routed = np.where(e > 1, L * e * 3 * d * designs['expert_hidden'], 0.0)
  nonexpert = designs['n_total'] - routed
  if not space.tied_embeddings:  # only the looked-up rows of the input table are read
    nonexpert = nonexpert - (space.vocab_size - min(B, space.vocab_size)) * d
  touched = routed * (1.0 - (1.0 - k / e) ** B)
  kv = decode_cost.kv_bytes(L, designs['kv_heads'], space.head_dim, B, context + 1, bpp)  # (+1: the write)
  return (nonexpert + touched) * bpp + kv


def _ratios(designs, mem, budget: Budget) -> dict[str, np.ndarray]:
  out = {}
  if budget.memory_bytes is not None:
    out['memory'] = mem / budget.memory_bytes
  if budget.active is not None:
    out['active'] = designs['n_active'] / budget.active
  if budget.flops_per_token is not None:
    out['flops'] = designs['flops'] / budget.flops_per_token
  if budget.decode_bytes is not None:
    out['decode'] = designs['decode_bytes'] / budget.decode_bytes
  return out


def rank(designs: dict[str, np.ndarray], order_by: str = 'n_exp_asc', target_granularity: float = 2.0,
         aspect: float = 64.0) -> np.ndarray:
  """Indices of `designs` in ranked order (best first), per the module docstring."""
  if order_by not in TIEBREAKS:
    raise ConfigError(f'--tiebreak={order_by!r} must be one of {TIEBREAKS}')
  n = designs['n_total']
  bucket = np.floor((n.max() - n) / (BUCKET * n.max()))
  s = designs['experts'] / designs['topk']
  third = (designs['experts'] if order_by == 'n_exp_asc'
           else np.abs(np.log(designs['granularity'] / target_granularity)))
  core = designs['layers'] * designs['width'] ** 2
  shape = np.abs(np.log(designs['width'] / designs['layers'] / aspect))
  # np.lexsort sorts by the last key first.
  return np.lexsort((-n, shape, -core, third, s, bucket))


@dataclasses.dataclass
class Result:
  """Ranked feasible designs (columns, best first) and what binds."""
  designs: dict[str, np.ndarray]
  binding: list[str]
  considered: int


def search(space: Space, budget: Budget, tiebreak: str = 'n_exp_asc', target_granularity: float = 2.0,
           aspect: float = 64.0) -> Result:
  """The ranked feasible designs; raises ConfigError naming the smallest feasible budget if none fit."""
  if all(b is None for b in (budget.memory_bytes, budget.active, budget.flops_per_token, budget.decode_bytes)):
    raise ConfigError('give at least one budget: --memory, --active, --flops_per_token or --decode_bytes/--decode_ms')
  if budget.decode_batch < 1:
    raise ConfigError(f'--decode_batch={budget.decode_batch} must be >= 1')
  designs = enumerate_designs(space)
  mem = memory_bytes(designs, space, budget)
  designs['memory_bytes'] = mem
  designs['decode_bytes'] = decode_bytes(designs, space, budget)
  ratios = _ratios(designs, mem, budget)
  fits = {name: r <= 1 + 1e-12 for name, r in ratios.items()}
  ok = np.logical_and.reduce(list(fits.values()))
  if not ok.any():
    raise ConfigError(_infeasible_message(designs, mem, fits, budget))
  chosen = {key: col[ok] for key, col in designs.items()}
  order = rank(chosen, tiebreak, target_granularity, aspect)
  ranked = {key: col[order] for key, col in chosen.items()}
  names = list(ratios)
  stacked = np.stack([ratios[name][ok][order] for name in names])
  binding = [names[i] for i in np.argmax(stacked, axis=0)]
  return Result(ranked, binding, len(mem))


def _infeasible_message(designs, mem, fits, budget: Budget) -> str:
  """Per budget: the smallest value at which some design fits, with the other budgets as given."""
  parts, alone = [], []
  for name, column, unit in (('memory', mem, 'bytes'), ('active', designs['n_active'], 'parameters'),
                             ('flops', designs['flops'], 'FLOPs/token'), ('decode', designs['decode_bytes'],
                                                                          'bytes/step')):
    if name not in fits:
      continue
    others = np.logical_and.reduce([v for k, v in fits.items() if k != name] or [np.ones_like(mem, bool)])
    pool = column[others] if others.any() else column
    flag = {'memory': '--memory', 'active': '--active', 'flops': '--flops_per_token',
            'decode': '--decode_bytes'}[name]
    value = pool.min()
    shown = (f'{value / budget.bytes_per_param:.4g} parameters = {value:.4g} bytes' if name == 'memory'
             else f'{value:.4g} {unit}')
    (parts if others.any() else alone).append(f'{flag} >= {shown}')
  if parts:
    return 'no configuration in the grid satisfies the budgets; the smallest feasible: ' + '; or '.join(parts)
  return ('no configuration in the grid satisfies the budgets, and no single budget is the only obstacle; '
          'the grid needs at least: ' + ' and '.join(alone))


def overrides(designs: dict[str, np.ndarray], i: int, head_dim: int = 64) -> dict:
  """The dotted config overrides of design i (every layer MoE; E = 1 becomes a dense FFN)."""
  e, f = int(designs['experts'][i]), int(designs['expert_hidden'][i])
  out = {'model.num_layers': int(designs['layers'][i]), 'model.model_dim': int(designs['width'][i]),
         'model.num_heads': int(designs['heads'][i]), 'model.num_kv_heads': int(designs['kv_heads'][i]),
         'model.head_dim': head_dim, 'moe.first_dense_layers': 0, 'moe.every_n_layers': 1}
  if e == 1:
    out.update({'moe.num_experts': 0, 'model.ffn_hidden': f})
  else:
    out.update({'moe.num_experts': e, 'moe.experts_per_token': int(designs['topk'][i]), 'moe.expert_hidden': f,
                'moe.num_shared_experts': int(designs['shared'][i]), 'moe.shared_expert_hidden': f})
  return out


def design_name(o: dict) -> str:
  if o['moe.num_experts'] == 0:
    return f'L{o["model.num_layers"]}-d{o["model.model_dim"]}-dense{o["model.ffn_hidden"]}'
  return (f'L{o["model.num_layers"]}-d{o["model.model_dim"]}-e{o["moe.num_experts"]}k{o["moe.experts_per_token"]}'
          f'-f{o["moe.expert_hidden"]}' + ('-sh' if o['moe.num_shared_experts'] else ''))


def emit(path: str, result: Result, top: int, source_config: str, command: str, head_dim: int) -> list[dict]:
  """Writes an experiment file whose get_sweep() trains the top designs; returns its points."""
  points = []
  for i in range(min(top, len(result.designs['n_total']))):
    o = overrides(result.designs, i, head_dim=head_dim)
    points.append({'name': f'r{i + 1:02d}-{design_name(o)}', **o})
  doc = f'''Designs from `moejax.design`, ranked best first ({datetime.date.today().isoformat()}).

Generated by:
  {command}

Each point is one design on top of {source_config}'s settings (data, schedule, optimizer).
Train them with:  python -m moejax.sweep --config={path} --root=runs/<name>
'''
  emitted.write(path, doc, source_config, points, f'The top {len(points)} designs.')
  return points

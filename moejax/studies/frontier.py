"""Compute-matched frontiers: MoE designs that hold one cost fixed, at several budgets (docs/studies.md §11).

  python -m moejax.frontier --match=flops --budgets=x1,x2,x4 --experts=1,4,16 --topk=2,4 --shared=0,1
      --classes=1,1:3 [--solve=expert_hidden|model_dim] [--tolerance=0.02] [--seeds=2] --emit=FILE

One of three costs is held fixed (`MATCHES`): training FLOPs per token (`accounting.count`'s
`flops_per_token`, 3x the forward), total memory (N_total x bytes per parameter at --dtype), or the
bytes one decode step reads (`moejax.inference.cost.step_bytes`, uniform routing). The designs are
the product of the chosen axes: routed experts E (1 = a dense FFN), top-k (k <= E), shared experts
(each as wide as the solved expert size) and heterogeneous size classes (ratios `1:3` split the E
experts evenly into classes of hidden r_i * a). For every design and budget the free dimension is
solved: `expert_hidden` (a, the expert or dense FFN hidden size, in multiples of --step) or
`model_dim` (the width, in multiples of head_dim x query heads per KV head; heads grow with it). Every
cost grows with the free dimension, so a bisection finds the value nearest the budget; a design whose
nearest value misses the budget by more than the tolerance, at any budget, is dropped everywhere with
the reason (so every budget compares the same designs). MoE points use renormalized gates times k
(`--gates=scaled`, SCIENCE.md §4: changing k changes nothing but k), where a top-1 gate is the
constant 1: such designs are dropped too.

A budget is absolute (`2e7`; memory and decode budgets also in bytes, `4MB`, a plain memory number
being parameters) or relative to the base config's own cost (`x2`).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import pprint

from moejax import cli, config as config_lib
from moejax.inference import cost as decode_cost
from moejax.studies import emitted
from moejax.model import accounting
from moejax.errors import ConfigError

MATCHES = {'flops': 'training FLOPs per token', 'memory': 'parameter bytes', 'decode': 'bytes read per decode step'}
SOLVES = ('expert_hidden', 'model_dim')
MAX_UNITS = 1 << 22  # the bisection's ceiling, in --step units


@dataclasses.dataclass(frozen=True)
class Spec:
  """What is held fixed, at which budgets (absolute, in the match's unit), and how designs are matched."""
  match: str
  budgets: tuple[float, ...]
  tolerance: float = 0.02
  solve: str = 'expert_hidden'
  step: int = 1
  min_hidden: int = 8
  bytes_per_param: float = 2.0
  decode_batch: int = 1
  decode_context: int | None = None
  gates: str = 'scaled'


@dataclasses.dataclass(frozen=True)
class Design:
  """One point of the axes: E routed experts (1 = dense), top-k, shared experts, size-class ratios, and the
  fixed expert hidden size when the width is solved."""
  experts: int
  topk: int = 1
  shared: int = 0
  ratios: tuple[int, ...] = (1,)
  expert_hidden: int | None = None

  @property
  def dense(self) -> bool:
    return self.experts <= 1

  @property
  def label(self) -> str:
    tail = f'-x{self.expert_hidden}' if self.expert_hidden else ''
    if self.dense:
      return 'dense' + tail
    return (f'e{self.experts}k{self.topk}' + (f'-sh{self.shared}' if self.shared else '') +
            ('-h' + '-'.join(map(str, self.ratios)) if len(self.ratios) > 1 else '') + tail)

  def axes(self) -> dict:
    return {'experts': 0 if self.dense else self.experts, 'topk': 0 if self.dense else self.topk,
            'shared': self.shared, 'ratios': list(self.ratios), 'expert_hidden': self.expert_hidden}


def designs_from_axes(experts: list[int], topk: list[int], shared: list[int], ratios: list[tuple[int, ...]],
                      expert_hidden: list[int | None]) -> list[Design]:
  """The product of the axes, without impossible or repeated points (dense takes no k, shared or classes)."""
  out = []
  for f in expert_hidden:
    for e in experts:
      if e <= 1:
        out.append(Design(1, expert_hidden=f))
        continue
      out += [Design(e, k, sh, r, f) for k in topk if k <= e for sh in shared for r in ratios if e % len(r) == 0]
  unique = list(dict.fromkeys(out))
  if not unique:
    raise ConfigError('the axes give no design (top-k must be <= E; E must split evenly into the size classes)')
  return unique


def parse_ratios(text: str) -> list[tuple[int, ...]]:
  """'1,1:3' -> [(1,), (1, 3)]: each item one size-class pattern (1 = uniform experts)."""
  out = []
  for item in str(text).split(','):
    parts = item.strip().split(':')
    if not all(p.isdigit() and int(p) > 0 for p in parts):
      raise ConfigError(f'--classes item {item!r} must be positive integers joined by ":", e.g. 1:3')
    out.append(tuple(int(p) for p in parts))
  return list(dict.fromkeys(out))


def quantity(cfg, spec: Spec) -> float:
  """The cost `spec.match` holds fixed, of a config (the counts of moejax.model.accounting and inference.cost)."""
  if spec.match == 'flops':
    return float(accounting.count(cfg)['flops_per_token'])
  if spec.match == 'memory':
    return float(accounting.count(cfg)['n_total']) * spec.bytes_per_param
  if spec.match == 'decode':
    context = spec.decode_context or cfg.data.seq_len
    return decode_cost.step_bytes(cfg, spec.decode_batch, context, spec.bytes_per_param, spec.bytes_per_param)['total']
  raise ConfigError(f'--match={spec.match!r} must be one of {", ".join(MATCHES)}')


def parse_budgets(text: str, spec_match: str, reference: float, bytes_per_param: float) -> tuple[float, ...]:
  """'x1,x2,x4' (multiples of `reference`, the base config's own cost) or absolute amounts, ascending."""
  out = []
  for item in [t.strip() for t in str(text).split(',') if t.strip()]:
    if item[0] in 'xX':
      try:
        factor = float(item[1:])
      except ValueError:
        raise ConfigError(f'--budgets item {item!r}: a multiple is x followed by a number, e.g. x2') from None
      value = factor * reference
    else:
      amount, is_bytes = cli.parse_amount(item)
      if is_bytes and spec_match == 'flops':
        raise ConfigError(f'--budgets item {item!r} is bytes, but --match=flops counts FLOPs; give e.g. 2e7 or x2')
      value = amount * bytes_per_param if spec_match == 'memory' and not is_bytes else amount
    if not (math.isfinite(value) and value > 0):
      raise ConfigError(f'--budgets item {item!r} must be a positive finite amount')
    out.append(value)
  if not out:
    raise ConfigError('--budgets is empty; give e.g. x1,x2,x4')
  return tuple(sorted(set(out)))


def _heads(base_cfg) -> tuple[int, int]:
  """(head_dim, query heads per KV head) of the base config: kept when the width is solved."""
  m = base_cfg.model
  return config_lib.head_dim(m), max(m.num_heads // max(m.num_kv_heads, 1), 1)


def unit(base_cfg, spec: Spec) -> int:
  """The solved dimension's step: --step for expert_hidden; head_dim x query heads per KV head for the width."""
  if spec.solve == 'model_dim':
    head_dim, group = _heads(base_cfg)
    return head_dim * group * spec.step
  return spec.step


def overrides(base_cfg, design: Design, value: int, spec: Spec) -> dict:
  """The dotted overrides of `design` with its free dimension at `value` (every layer MoE for E > 1)."""
  out: dict = {}
  hidden = value
  if spec.solve == 'model_dim':
    head_dim, group = _heads(base_cfg)
    heads = value // head_dim
    out.update({'model.model_dim': value, 'model.num_heads': heads, 'model.num_kv_heads': heads // group,
                'model.head_dim': head_dim})
    hidden = design.expert_hidden or config_lib.expert_hidden(base_cfg.model, base_cfg.moe)
  if design.dense:
    out.update({'moe.num_experts': 0, 'model.ffn_hidden': hidden})
    return out
  classes = ','.join(f'{design.experts // len(design.ratios)}x{r * hidden}'
                     for r in design.ratios) if len(design.ratios) > 1 else ''
  out.update({'moe.num_experts': design.experts, 'moe.experts_per_token': design.topk, 'moe.expert_hidden': hidden,
              'moe.expert_size_classes': classes, 'moe.num_shared_experts': design.shared,
              'moe.shared_expert_hidden': hidden, 'moe.first_dense_layers': 0, 'moe.every_n_layers': 1})
  if spec.gates == 'scaled':
    out.update({'moe.use_renormalized_gates': True, 'moe.routed_scaling_factor': float(design.topk)})
  return out


@dataclasses.dataclass(frozen=True)
class Match:
  """A design solved at one budget: the free dimension's value and the cost it gives."""
  design: Design
  budget_index: int
  budget: float
  value: int
  quantity: float
  overrides: dict
  flops_per_token: float

  @property
  def error(self) -> float:
    return self.quantity / self.budget - 1


@dataclasses.dataclass
class Frontier:
  """The matched points (every kept design at every budget) and the dropped designs with their reasons."""
  spec: Spec
  matches: list[Match]
  dropped: list[tuple[str, str]]

  @property
  def designs(self) -> list[Design]:
    return list(dict.fromkeys(m.design for m in self.matches))


def solve(base_cfg, design: Design, spec: Spec, budget: float) -> tuple[Match | None, str]:
  """The value of the free dimension whose cost is nearest `budget` (bisection: every cost grows with it), or
  (None, why) when even the nearest value misses the budget by more than the tolerance."""
  step = unit(base_cfg, spec)

  def cfg_at(u):
    return config_lib.apply_overrides(base_cfg, overrides(base_cfg, design, u * step, spec))

  def cost(u):
    return quantity(cfg_at(u), spec)

  lo = max(1, math.ceil(spec.min_hidden / step)) if spec.solve == 'expert_hidden' else 1
  if cost(lo) > budget:
    u = lo
  else:
    hi = lo
    while cost(hi) <= budget:
      if hi > MAX_UNITS:
        return None, f'{spec.solve} above {hi * step} still gives less than the budget'
      lo, hi = hi, hi * 2
    while hi - lo > 1:  # cost(lo) <= budget < cost(hi)
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    u = lo if abs(cost(lo) / budget - 1) <= abs(cost(hi) / budget - 1) else hi
  q = cost(u)
  if abs(q / budget - 1) > spec.tolerance:
    near = [v for v in (u - 1, u, u + 1) if v * step >= (spec.min_hidden if spec.solve == 'expert_hidden' else 1)]
    tried = ', '.join(f'{v * step} gives {cost(v) / budget - 1:+.1%}' for v in near)
    return None, f'no {spec.solve} within ±{spec.tolerance:.1%} of {budget:.4g} ({tried})'
  cfg = cfg_at(u)
  try:
    config_lib.validate(cfg)
  except ConfigError as e:
    return None, f'{spec.solve}={u * step} is not a valid config: {e}'
  return Match(design, -1, budget, u * step, q, overrides(base_cfg, design, u * step, spec),
               float(accounting.count(cfg)['flops_per_token'])), ''


def build(base_cfg, designs: list[Design], spec: Spec) -> Frontier:
  """Solves every design at every budget; a design that misses any budget is dropped everywhere, with why."""
  if not 0 < spec.tolerance < 0.5:
    raise ConfigError(f'--tolerance={spec.tolerance} must be in (0, 0.5), e.g. 0.02')
  if spec.solve not in SOLVES:
    raise ConfigError(f'--solve={spec.solve!r} must be one of {", ".join(SOLVES)}')
  if spec.step < 1:
    raise ConfigError(f'--step={spec.step} must be >= 1')
  matches, dropped = [], []
  for design in designs:
    if spec.gates == 'scaled' and not design.dense and design.topk == 1:
      dropped.append((design.label, 'a renormalized top-1 gate is the constant 1, so the router gets no gradient '
                      'from the loss (SCIENCE.md §4); use k >= 2 or --gates=config'))
      continue
    found = []
    for j, budget in enumerate(spec.budgets):
      try:
        match, why = solve(base_cfg, design, spec, budget)
      except ConfigError as e:
        match, why = None, str(e)
      if match is None:
        dropped.append((design.label, f'budget {j + 1} ({budget:.4g}): {why}'))
        break
      found.append(dataclasses.replace(match, budget_index=j))
    else:
      matches += found
  frontier = Frontier(spec, matches, dropped)
  if len(frontier.designs) < 2:
    reasons = '; '.join(f'{label}: {why}' for label, why in dropped[:3])
    raise ConfigError(f'only {len(frontier.designs)} design(s) match every budget within ±{spec.tolerance:.1%}, a '
                      f'frontier needs 2 or more ({reasons})')
  return frontier


def _short(solve_name: str) -> str:
  return 'f' if solve_name == 'expert_hidden' else 'd'


def base_name(match: Match, spec: Spec) -> str:
  """The point's name at seed 0: budget, design and the solved value, e.g. 'b2-e16k2-sh1-f37'."""
  return f'b{match.budget_index + 1}-{match.design.label}-{_short(spec.solve)}{match.value}'


def points(frontier: Frontier, seeds: int) -> list[dict]:
  """The sweep points: every match at seeds 0..seeds-1 (seed i sets initialization and data order: paired runs)."""
  if seeds < 1:
    raise ConfigError(f'--seeds={seeds} must be >= 1')
  return [dict(m.overrides, name=base_name(m, frontier.spec) + (f'-seed{i}' if i else ''), seed=i, **{'data.seed': i})
          for i in range(seeds) for m in frontier.matches]  # seed-major: a cut-short sweep has whole seeds


def metadata(frontier: Frontier, seeds: int) -> dict:
  """What the analysis needs, as plain data (the emitted file's FRONTIER): the spec, designs, points, drops."""
  spec = frontier.spec
  return {'match': spec.match, 'what': MATCHES[spec.match], 'tolerance': spec.tolerance, 'solve': spec.solve,
          'step': spec.step, 'min_hidden': spec.min_hidden, 'bytes_per_param': spec.bytes_per_param,
          'decode_batch': spec.decode_batch, 'decode_context': spec.decode_context, 'gates': spec.gates,
          'budgets': list(spec.budgets), 'seeds': seeds,
          'designs': {d.label: d.axes() for d in frontier.designs},
          'points': {base_name(m, spec): {'budget': m.budget_index, 'design': m.design.label, 'value': m.value,
                                          'quantity': m.quantity} for m in frontier.matches},
          'dropped': [list(x) for x in frontier.dropped]}


def spec_from(meta: dict) -> Spec:
  """The Spec an emitted file's FRONTIER records."""
  keys = {f.name for f in dataclasses.fields(Spec)}
  return Spec(**{k: (tuple(v) if k == 'budgets' else v) for k, v in meta.items() if k in keys})


def cost_lines(frontier: Frontier, seeds: int, tokens_per_run: int, flops_per_second: float | None) -> list[str]:
  """The expected cost: runs, tokens, training FLOPs (and wall time at a measured throughput, when given)."""
  flops = sum(m.flops_per_token for m in frontier.matches) * seeds * tokens_per_run
  runs = len(frontier.matches) * seeds
  lines = [f'{runs} runs of {tokens_per_run:,} training tokens; {flops:.3g} training FLOPs in all '
           '(accounting flops_per_token x tokens; decay branches and evaluation not included)']
  if flops_per_second:
    lines.append(f'about {flops / flops_per_second / 60:.0f} minutes of training at {flops_per_second:.3g} '
                 'FLOP/s (the throughput given to --flops_per_second)')
  return lines


def emit(path: str, frontier: Frontier, seeds: int, source: str, source_arg: str | None, command: str,
         tokens_per_run: int, flops_per_second: float | None = None) -> list[dict]:
  """Writes the experiment file (get_config, get_sweep, FRONTIER) atomically; returns its sweep points."""
  spec, sweep = frontier.spec, points(frontier, seeds)
  budgets = ', '.join(f'{b:.4g}' for b in spec.budgets)
  dropped = ''.join(f'\n  - {label}: {why}' for label, why in frontier.dropped) or ' none'
  cost = '\n  '.join(cost_lines(frontier, seeds, tokens_per_run, flops_per_second))
  meta = pprint.pformat(metadata(frontier, seeds), indent=1, width=110, sort_dicts=True)
  doc = f'''Compute-matched frontier ({datetime.date.today().isoformat()}): at fixed {MATCHES[spec.match]}, which MoE design
reaches the lowest held-out loss, and how does the optimum move as the budget grows?

{len(frontier.designs)} designs ({', '.join(d.label for d in frontier.designs)}) at {len(spec.budgets)} budgets
({budgets}), each holding {MATCHES[spec.match]} within ±{spec.tolerance:.1%} by solving {spec.solve}; {seeds} seed(s).
Dropped designs:{dropped}

Generated by:
  {command}
Run:
  python -m moejax.sweep --config={path} --root=runs/<name>
  python -m moejax.frontier --analyze --config={path} --root=runs/<name> --out=runs/<name>/frontier
Cost:
  {cost}
Each point is a design on top of {source}{':' + source_arg if source_arg else ''}'s settings (data, schedule, optimizer).
'''
  emitted.write(path, doc, source, sweep, 'Every matched design at every budget and seed.', source_arg,
                f'\nFRONTIER = {meta}\n')
  return sweep

"""Shared pieces of the paper grids (experiments/paper_a.py, experiments/paper_b.py).

The protocol (docs/reproducing-the-papers.md says why each rule is there):
- Gates: softmax top-k, renormalized over the k selected experts and multiplied by
  routed_scaling_factor = k. Every selected expert's gate is then about 1 whatever k is, and
  at gates of exactly 1 a top-k layer of experts of width d_exp computes a SwiGLU of width
  k * d_exp, the active-matched dense baseline: changing k changes nothing but k. Top-1 is
  left out of every grid (a renormalized top-1 gate is the constant 1, so the router gets no
  gradient from the loss; a raw softmax top-1 gate is a different parameterization).
- Dense baselines are true dense models (no experts, FFN hidden k * d_exp).
- Schedule: warmup-stable-decay (5% warmup at tiny, 10% at tiny2; 20% linear decay to 0.1x),
  with decay branches at 25% and 50% of the run (`optim.decay_branches`), so each run also
  gives the held-out loss at 1/4 and 1/2 of its tokens. A branch shares the run's warmup (at
  tiny2 150 steps: 40% of the 1/4 branch's 375 steps), as WSD branches do.
- Learning rate: `LR` below. tiny, gpu, paper: one rate chosen by the sweep of grid `LR`
  (paper_b.py) on anchor configurations (dense, the B1 centre, the largest E, the finest B2
  expert). tiny2: a rate per width and top-k class (`LR_RULE`, fitted to grid LR at
  `LR_ANCHORS`: MoE anchors only, so the dense baseline takes the k=2 MoE rate of its width).
- Seeds: every point runs at seeds 0..seeds-1; seed i sets both the initialization
  (`seed`) and the data order (`data.seed`), so points of one seed are paired (same batches).

Scales:
  tiny   2-core CPU: d=64, L=2, 500 steps of 32x128 tokens (2.05M tokens per run), 2 seeds.
  tiny2  the tiny scale under the repaired protocol: heads at head_dim 16, 1500 steps (6.1M
         tokens), 10% warmup, held-out scores every 150 steps, a rate per width and top-k
         (LR_RULE, from grid LR), sequence balancing at 1e-4 (DeepSeek-V3).
  gpu    one H100: d=256, L=4, bfloat16, on a FineWeb-Edu token store (8k BPE); sized in
         docs/reproducing-the-papers.md.
  paper  a cluster plan near the studies' scale: d=1024, L=16, 20k steps of 256x2048 tokens.
The tiny scale reads the stdlib's bytes. The gpu and paper scales read token stores of a
public web corpus (FineWeb-Edu) with a BPE trained on it: 8k tokens at gpu scale (a 32k
embedding would outweigh the routed experts of a d=256 model and break the fixed-N_total
grids), 32k at paper scale. Build them as docs/data.md shows, or point
--config.data.source=store:DIR at your own store with the same tokenizer spec. Their
vocabulary is set explicitly, so accounting and design searches work before a store
exists, and a store with another tokenizer is refused.

The experiment argument is `SCALE[,GRID...]`: `tiny` runs the scale's tier-1 grids,
`tiny,all` every grid, `tiny,B3,B5` the named grids.
"""

from moejax import base_config as base
from moejax import config as config_lib
from moejax.errors import ConfigError

SCALES = {
    'tiny': dict(model_dim=64, num_layers=2, num_heads=2, seq_len=128, batch_size=32, steps=500,
                 heldout_bytes=131072, seeds=2, compute_dtype='float32', source='stdlib', tokenizer='bytes',
                 vocab_size=None),
    # The tiny scale under the repaired protocol (docs/reproducing-the-papers.md, "The tiny2 protocol"):
    # heads grow with width at head_dim 16, 3x the tokens, warmup 10%, held-out score every 10%,
    # a learning rate per width and top-k (LR_RULE), sequence balancing at DeepSeek-V3's 1e-4.
    'tiny2': dict(model_dim=64, num_layers=2, num_heads=4, head_dim=16, seq_len=128, batch_size=32, steps=1500,
                  heldout_bytes=131072, seeds=2, compute_dtype='float32', source='stdlib', tokenizer='bytes',
                  vocab_size=None, warmup_fraction=0.1, eval_every_steps=150, sequence_aux_coef=1e-4),
    'gpu': dict(model_dim=256, num_layers=4, num_heads=4, seq_len=256, batch_size=64, steps=1000,
                heldout_bytes=1 << 20, seeds=2, compute_dtype='bfloat16', source='store:~/moejax-data/fineweb-edu-bpe8k',
                tokenizer='train:bpe:8192', vocab_size=8192),
    'paper': dict(model_dim=1024, num_layers=16, num_heads=16, seq_len=2048, batch_size=256, steps=20000,
                  heldout_bytes=1 << 24, seeds=2, compute_dtype='bfloat16',
                  source='store:~/moejax-data/fineweb-edu-bpe32k', tokenizer='train:bpe:32768', vocab_size=32768),
}
SCHEDULE = {'optim.schedule': 'wsd', 'optim.warmup_fraction': 0.05, 'optim.decay_fraction': 0.2,
            'optim.final_lr_fraction': 0.1, 'optim.decay_branches': '0.25,0.5'}

# The learning-rate rule of each scale and its evidence (the sweep of grid LR at that scale).
# rule 'constant': every point uses `peak`. `sweep`: the peak learning rates grid LR tries on
# the anchors (factor 2 apart); the one equal to `peak` is the grid point itself.
LR = {
    # Grid LR, seed 0, held-out loss at 1e-3 / 2e-3 / 4e-3 / 8e-3 (2026-12-02, 2-core CPU):
    #   dense-f128 2.068 / 1.923 / 1.833 / 1.954;  e32k2f64 1.908 / 1.771 / 1.721 / 1.945;
    #   e128k2f64 1.896 / 1.780 / 1.723 / 1.979;   e64k8f24 1.867 / 1.749 / 1.724 / 1.715.
    # 4e-3 is best (bracketed) for three anchors across 33x in N_total and E = 0..128, and within
    # 0.008 nats (one seed each) of the best for the fine-grained one: one constant rate.
    'tiny': dict(rule='constant', peak=4e-3, sweep=(1e-3, 2e-3, 4e-3, 8e-3),
                 evidence='grid LR: 4e-3 best for dense, E32, E128 (k=2); e64k8f24 0.008 better at 8e-3'),
    # tiny2: a rate per (width, top-k), LR_RULE below, from grid LR at d in {64, 96, 144} x k in {2, 8}; the rates
    # swept per width are LR_ANCHORS' (`sweep` here: d = 64's).
    'tiny2': dict(rule='per_width_topk', peak=4e-3, sweep=(2e-3, 4e-3, 8e-3, 1.6e-2),
                  evidence='grid LR of paper_b.py:tiny2,LR, 26 runs at seed 0 (docs/results/tiny2/runs); the joint '
                           'fit of `claims --lr_rule` (docs/results/tiny2/lr_rule.md, 2026-12-06): optimum ~ '
                           'width^(-2.20 +- 0.29), curvature 0.0105 +- 0.0026 nats per factor 2 squared; each anchor '
                           'takes the swept rate nearest the fit (predicted cost <= 0.0026 nats)'),
    'gpu': dict(rule='constant', peak=2e-3, sweep=(1e-3, 2e-3, 4e-3),
                evidence='not measured: run grid LR first (paper_b.py:gpu,LR)'),
    'paper': dict(rule='constant', peak=1e-3, sweep=(5e-4, 1e-3, 2e-3),
                  evidence='not measured: run grid LR first (paper_b.py:paper,LR)'),
}
TIER1 = ('B1', 'B2', 'A1', 'A2a', 'B6')
# tiny2's rule: peak rate by (model width, top-k class), read off grid LR (seed 0) at the anchor
# widths 64, 96, 144 and k in {2, 8}; a width between anchors takes the rate of log-linear
# interpolation in log width, k <= 4 the k=2 rates, k > 4 the k=8 rates. None = not yet measured:
# the grids refuse to run until grid LR has filled it (`lr_for`).
LR_RULE = {
    'tiny2': {2: {64: 0.008, 96: 0.002, 144: 0.001}, 8: {64: 0.008, 96: 0.004, 144: 0.001}},
}
# Rates swept per anchor width. Planned as d = 64's four at every width; changed 2026-12-06 before those points ran,
# once d = 96 had put k = 8's best at the lowest rate tried (2e-3: 1.4027 against 1.4162 at 4e-3) and 1.6e-2
# diverging at k = 2 (1.4755): d = 96 adds 1e-3 (bracketing it from below), d = 144 is shifted one factor of 2 down
# (wider models take lower Adam rates; 1.6e-2 would be a diverging, wasted run there).
LR_ANCHORS = {'tiny2': dict(widths=(64, 96, 144), topks=(2, 8),
                            sweeps={64: (2e-3, 4e-3, 8e-3, 1.6e-2), 96: (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
                                    144: (1e-3, 2e-3, 4e-3, 8e-3)})}


def parse_arg(arg):
  """'tiny,B1,B6' -> ('tiny', ['B1', 'B6']); 'tiny' -> ('tiny', None) (tier 1); 'tiny,all' -> ('tiny', 'all')."""
  parts = [p.strip() for p in (arg or 'tiny').split(',') if p.strip()]
  scale = parts[0]
  if scale not in SCALES:
    raise ConfigError(f'unknown scale {scale!r}; use one of {sorted(SCALES)} (e.g. --config=experiments/paper_b.py:tiny)')
  grids = parts[1:]
  return scale, ('all' if grids == ['all'] else grids or None)


def check_arg(arg, grid_names):
  """Refuses an argument whose scale or grid names this file does not have (before anything is built)."""
  _, chosen = parse_arg(arg)
  unknown = [g for g in (chosen if isinstance(chosen, list) else []) if g not in grid_names]
  if unknown:
    raise ConfigError(f'unknown grids {unknown}; use SCALE[,GRID...] with grids from {sorted(grid_names)} or all')


def get_config(arg=None):
  """The shared settings of every grid point at a scale."""
  scale, _ = parse_arg(arg)
  s = SCALES[scale]
  c = base.get_config()
  c.name = f'paper-{scale}'
  c.model.model_dim = s['model_dim']
  c.model.num_layers = s['num_layers']
  c.model.num_heads = c.model.num_kv_heads = s['num_heads']
  c.model.ffn_hidden = 4 * s['model_dim']
  c.model.compute_dtype = s['compute_dtype']
  c.moe.use_renormalized_gates = True
  c.model.vocab_size = s['vocab_size']
  c.data.source = s['source']
  c.data.tokenizer = s['tokenizer']
  c.data.seq_len = s['seq_len']
  c.data.heldout_bytes = s['heldout_bytes']
  c.train.steps = s['steps']
  c.train.batch_size = s['batch_size']
  c.optim.peak_learning_rate = LR[scale]['peak']
  c.checkpoint.every_steps = max(s['steps'] // 4, 1)
  schedule = dict(SCHEDULE)
  if 'head_dim' in s:
    c.model.head_dim = s['head_dim']
  if 'warmup_fraction' in s:
    schedule['optim.warmup_fraction'] = s['warmup_fraction']
  if 'eval_every_steps' in s:
    c.eval.every_steps = s['eval_every_steps']
  return config_lib.apply_overrides(c, schedule)


def gates(k):
  """The gate parameterization of every grid point: renormalized top-k gates times k (module docstring)."""
  if k < 2:
    raise ConfigError(f'top-{k} points are not part of the grids: a renormalized top-1 gate is the constant 1 '
                      '(no router gradient from the loss); see experiments/papers.py')
  return {'moe.use_renormalized_gates': True, 'moe.routed_scaling_factor': float(k)}


def point(E, k, f, *, d=None, L=None, seed=0, tag='', **extra):
  """Overrides of one grid point: E experts, top-k, expert hidden f (plus width, depth, other keys)."""
  name = f'e{E}k{k}f{f}' + (f'-d{d}' if d else '') + (f'-L{L}' if L else '') + (f'-{tag}' if tag else '')
  o = {'moe.num_experts': E, 'moe.experts_per_token': k, 'moe.expert_hidden': f, **gates(k)}
  if d:
    o['model.model_dim'] = d
  if L:
    o['model.num_layers'] = L
  o.update(extra)
  return _seeded(o, name, seed)


def _seeded(o, name, seed):
  """`o` at `seed`: initialization and data order both follow it (paired across points of one seed)."""
  return dict(o, seed=seed, name=name + (f'-seed{seed}' if seed else ''), **{'data.seed': seed})


def dense(hidden, *, seed=0, **extra):
  """A true dense baseline: no experts, the SwiGLU FFN of hidden `hidden` (= k * d_exp of the MoE it is matched to)."""
  return _seeded({'moe.num_experts': 0, 'model.ffn_hidden': hidden, **extra}, f'dense-f{hidden}', seed)


def seeds(p, n):
  """`p` at seeds 0..n-1."""
  return [_seeded(p, p['name'].split('-seed')[0], i) for i in range(n)]


def seeded(points, scale):
  """Every point of `points` at the scale's seeds (with the scale's per-point protocol, `protocol`)."""
  return [q for p in points for q in seeds(protocol(p, scale), SCALES[scale]['seeds'])]


def protocol(p: dict, scale: str) -> dict:
  """A point with its scale's per-point rules: heads at a fixed head_dim (tiny2), the learning rate
  of LR_RULE, and sequence-wise balancing at the literature's coefficient (DeepSeek-V3: 1e-4)."""
  s = SCALES[scale]
  if 'head_dim' not in s:
    return p
  d = p.get('model.model_dim', s['model_dim'])
  if d % s['head_dim']:
    raise ConfigError(f'{p.get("name")}: width {d} is not a multiple of head_dim {s["head_dim"]}')
  out = dict(p, **{'model.num_heads': d // s['head_dim'], 'model.num_kv_heads': d // s['head_dim']})
  if 'optim.peak_learning_rate' not in p:
    out['optim.peak_learning_rate'] = lr_for(scale, d, p.get('moe.experts_per_token') or 2)
  if p.get('moe.load_balancing') == 'sequence':
    out['moe.aux_loss_coef'] = s['sequence_aux_coef']
  return out


def lr_for(scale: str, width: int, topk: int) -> float:
  """The rate LR_RULE gives a (width, top-k) point: log-linear in log width between the anchors."""
  import math  # pylint: disable=import-outside-toplevel
  table = LR_RULE[scale][2 if topk <= 4 else 8]
  if any(v is None for v in table.values()):
    raise ConfigError(f'{scale}: the learning-rate rule is not measured yet; run grid LR first '
                      f'(python -m moejax.sweep --config=experiments/paper_b.py:{scale},LR) and fill papers.LR_RULE')
  widths = sorted(table)
  w = min(max(width, widths[0]), widths[-1])
  hi = next(x for x in widths if x >= w)
  lo = max(x for x in widths if x <= w)
  if hi == lo:
    return table[lo]
  t = (math.log(w) - math.log(lo)) / (math.log(hi) - math.log(lo))
  return float(math.exp((1 - t) * math.log(table[lo]) + t * math.log(table[hi])))


def lr_anchor_points(scale: str) -> list[dict]:
  """tiny2's grid LR: an MoE of the B1 centre's shape at each anchor width and k, at each swept rate (seed 0)."""
  a, s = LR_ANCHORS[scale], SCALES[scale]
  out = []
  for d in a['widths']:
    for k in a['topks']:
      f = 128 // k  # active expert width k * f = 128 at every k, as B1's centre (k=2, f=64)
      base_point = point(32 * k // 2, k, f, d=d if d != s['model_dim'] else None)
      for lr in a['sweeps'][d]:
        q = protocol(dict(base_point, **{'optim.peak_learning_rate': lr}), scale)
        out.append(dict(q, name=q['name'] + f'-lr{lr:g}'))
  return out


def lr_points(p, scale):
  """Anchor point `p` (seed 0) at each learning rate of the scale's sweep; the scale's own is the grid point itself."""
  return [p if lr == LR[scale]['peak'] else dict(p, name=p['name'] + f'-lr{lr:g}', **{'optim.peak_learning_rate': lr})
          for lr in LR[scale]['sweep']]


def selected(arg, grid_names) -> list[str]:
  """The grid ids an argument selects: the named ones, every one ('all'), or the tier-1 ones."""
  _, chosen = parse_arg(arg)
  names = list(grid_names) if chosen == 'all' else (chosen or [g for g in TIER1 if g in grid_names])
  unknown = [g for g in names if g not in grid_names]
  if unknown:
    raise ConfigError(f'unknown grids {unknown}; this file has {sorted(grid_names)}')
  return names


def sweep_of(grids, arg):
  """The deduplicated points of the selected grids (a point shared by two grids runs once)."""
  out, seen = [], set()
  for g in selected(arg, list(grids)):
    for p in grids[g]:
      if p['name'] not in seen:
        seen.add(p['name'])
        out.append(p)
  return out


# Noise classes, declared before the runs (issue 32): seed noise is heteroscedastic. Points that perturb routing
# (training capacity factors, other balancing modes, heterogeneous experts) exit the early plateau at a
# seed-dependent time, so their seed spread is several times that of the default design. Each class gets its
# own sigma and degrees of freedom; a difference across classes uses a Welch interval.
NOISE_CLASSES = ('default', 'routing-perturbed')


def noise_class(p: dict) -> str:
  """The noise class of a grid point (its dotted overrides)."""
  perturbed = (p.get('moe.train_capacity_factor') is not None
               or p.get('moe.load_balancing', 'global_batch') != 'global_batch'
               or bool(p.get('moe.expert_size_classes')))
  return 'routing-perturbed' if perturbed else 'default'


# The small-effect margin T per scale (nats/token), fixed in advance and never estimated from the runs under test.
# tiny: 0.02 = half the dense-to-MoE gap (s = 4 vs its active-matched dense model: 0.043 nats) measured in the
# 2026-12 tiny pilot (docs/results/tiny, grid B1), rounded; the B3-B5 points it judges are other configurations.
# gpu, paper: no pilot yet (None): their equivalence claims stay inconclusive until a pilot fixes T.
EQUIVALENCE_MARGIN = {'tiny': 0.02, 'tiny2': 0.02, 'gpu': None, 'paper': None}


# The effect of interest of each claim per scale (nats/token, end to end for a series), declared before a run and
# read by `python -m moejax.claims --plan` (moejax/studies/plan.py) to size seeds and run length for 80% power.
# The default is the scale's margin T: the smallest difference that counts as a difference, so a direction claim is
# planned to detect T and an equivalence claim to show |delta| < T when the true difference is 0. Claims whose pilot
# effect is many times T are planned for half the pilot's effect (halved against the pilot's own selection bias and
# its early-training transients), not for T. Pilot: the tiny runs of 2026-12-03 (docs/results/tiny).
_T = 'T, the smallest difference that matters here'
EFFECT_OF_INTEREST = {
    'tiny': {
        'C-A1': (0.09, "half the pilot's s = 2 -> 16 rise (+0.187)"),
        'C-A2': (0.02, _T + ' (paper A: "slightly")'),
        'C-A2b': (0.02, _T + ' (either side of the discriminating claim)'),
        'C-A4': (0.02, _T),
        'C-B1': (0.02, _T + ' (the pilot: 0.079, but 0.004 from E = 32 to 128)'),
        'prior': (0.02, _T + " (the pilot's gap is 0.043, which set T)"),
        'C-B2': (0.02, _T + ': a bowl whose grid ends are T above its bottom'),
        'C-B2a': (0.02, _T + ': bowls of depth T with their bottoms at each grid\'s centre (48 and 72)'),
        'C-B3': (0.02, _T + ': equivalence, planned for a true difference of 0'),
        'C-B4': (0.02, _T + ': equivalence, planned for a true difference of 0'),
        'C-B5/sequence': (0.02, _T + ': equivalence, planned for a true difference of 0'),
        'C-B5/aux_free': (0.02, _T + ': equivalence, planned for a true difference of 0'),
        'C-B5n': (0.04, "half the pilot's no-balancing loss rise (+0.084)"),
        'C-B6': (0.12, "half the pilot's CF 0.5 -> dropless gain (0.25)"),
    },
    'tiny2': None,  # the tiny pilot's, below
    'gpu': None,  # no pilot yet: run one (two seeds of a few grids) before planning
    'paper': None,
}
# tiny2 is planned from the tiny runs as its pilot (`claims --plan --scale=tiny2 --pilot_scale=tiny`), declared
# 2026-12-06 before any tiny2 grid point ran: the same effects (T where T is the question; half the pilot's effect
# where it is many times T). Effects that shrink with tokens (C-A1 did from 1M to 2M tokens) may be smaller at
# tiny2's 6.1M tokens than these: then the plan's power is optimistic for them, and the report says so.
EFFECT_OF_INTEREST['tiny2'] = dict(EFFECT_OF_INTEREST['tiny'])

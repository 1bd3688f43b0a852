"""Shared pieces of the paper grids (experiments/paper_a.py, experiments/paper_b.py).

Scales (SCIENCE.md §4):
  tiny   2-core CPU: d=64, L=2, 600 steps of 32x128 tokens (2.5M tokens per run) at peak LR
         2e-3; the tier-1 grids take about 25 minutes. (Measured at the B1 s=16 point, 2 seeds:
         300 steps at 4e-3 gave 2.318/2.403 nats, a seed spread of 0.085; 300 at 2e-3 2.220/2.260;
         600 at 4e-3 1.757/1.949; 600 at 2e-3 1.860/1.854, spread 0.006.)
  gpu    one H100: d=256, L=4, 1000 steps of 64x256 tokens (16M tokens per run), bfloat16.
  paper  a cluster plan near the studies' scale: d=1024, L=16, 20k steps of 256x2048 tokens
         (10.5B tokens per run).
The tiny scale reads the stdlib's bytes. The gpu and paper scales read token stores of a
public web corpus (FineWeb-Edu) with a BPE trained on it: 8k tokens at gpu scale (a 32k
embedding would outweigh the routed experts of a d=256 model and break the fixed-N_total
grids), 32k at paper scale. Build them as docs/data.md shows, or point
--config.data.source=store:DIR at your own store with the same tokenizer spec. Their
vocabulary is set explicitly, so accounting and design searches work before a store
exists, and a store with another tokenizer is refused.

Every run of a scale uses the same data seed (paired data order); `seed` (model
initialization) is the seed axis. Gates are renormalized over the top k when k > 1 (the
quickstart showed raw softmax gates handicap large E at this scale); with k = 1 that would make
every gate 1 and starve the router of gradient, so k = 1 points keep the raw softmax gate. The experiment argument is
`SCALE[,GRID...]`: `tiny` runs the scale's tier-1 grids, `tiny,all` every grid,
`tiny,B3,B5` the named grids.
"""

from experiments import base
from moejax.errors import ConfigError

SCALES = {
    'tiny': dict(model_dim=64, num_layers=2, num_heads=2, seq_len=128, batch_size=32, steps=600, lr=2e-3,
                 heldout_bytes=131072, seeds=3, compute_dtype='float32', source='stdlib', tokenizer='bytes',
                 vocab_size=None),
    'gpu': dict(model_dim=256, num_layers=4, num_heads=4, seq_len=256, batch_size=64, steps=1000, lr=2e-3,
                heldout_bytes=1 << 20, seeds=3, compute_dtype='bfloat16', source='store:~/moejax-data/fineweb-edu-bpe8k',
                tokenizer='train:bpe:8192', vocab_size=8192),
    'paper': dict(model_dim=1024, num_layers=16, num_heads=16, seq_len=2048, batch_size=256, steps=20000, lr=1e-3,
                  heldout_bytes=1 << 24, seeds=2, compute_dtype='bfloat16',
                  source='store:~/moejax-data/fineweb-edu-bpe32k', tokenizer='train:bpe:32768', vocab_size=32768),
}
TIER1 = ('B1', 'B2', 'A1', 'A2a', 'B6')


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
  c.optim.peak_learning_rate = s['lr']
  c.checkpoint.every_steps = max(s['steps'] // 4, 1)
  return c


def point(E, k, f, *, d=None, L=None, seed=0, tag='', **extra):
  """Overrides of one grid point: E experts, top-k, expert hidden f (plus width, depth, other keys)."""
  name = f'e{E}k{k}f{f}' + (f'-d{d}' if d else '') + (f'-L{L}' if L else '') + (f'-{tag}' if tag else '')
  # Top-k gates are renormalized (Mixtral) for k > 1; for k = 1 a renormalized gate is always 1 and
  # the router would get no gradient from the loss, so k = 1 keeps the raw softmax gate (Switch).
  o = {'moe.num_experts': E, 'moe.experts_per_token': k, 'moe.expert_hidden': f, 'moe.use_renormalized_gates': k > 1}
  if d:
    o['model.model_dim'] = d
  if L:
    o['model.num_layers'] = L
  o.update(extra)
  o['seed'] = seed
  o['name'] = name + (f'-seed{seed}' if seed else '')
  return o


def dense(hidden, *, seed=0, **extra):
  """A true dense baseline: no experts, the SwiGLU FFN of hidden `hidden` (= k * d_exp of the MoE it is matched to)."""
  o = {'moe.num_experts': 0, 'model.ffn_hidden': hidden, **extra, 'seed': seed}
  o['name'] = f'dense-f{hidden}' + (f'-seed{seed}' if seed else '')
  return o


def seeds(p, n):
  """`p` at seeds 0..n-1."""
  return [dict(p, seed=i, name=p['name'].split('-seed')[0] + (f'-seed{i}' if i else '')) for i in range(n)]


def sweep_of(grids, arg):
  """The deduplicated points of the selected grids (a point shared by two grids runs once)."""
  _, chosen = parse_arg(arg)
  names = list(grids) if chosen == 'all' else (chosen or [g for g in TIER1 if g in grids])
  unknown = [g for g in names if g not in grids]
  if unknown:
    raise ConfigError(f'unknown grids {unknown}; this file has {sorted(grids)}')
  out, seen = [], set()
  for g in names:
    for p in grids[g]:
      if p['name'] not in seen:
        seen.add(p['name'])
        out.append(p)
  return out

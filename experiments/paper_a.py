"""Paper A (Liew et al. 2026): at fixed memory, loss follows N_total and sparsity s = E/k.

Grids (docs/reproducing-the-papers.md; `--config=experiments/paper_a.py:SCALE[,GRID...]`). Every point runs
at the scale's seeds with the protocol of experiments/papers.py (top-k >= 2 everywhere).
  A1   s at fixed N_total and core: E and expert size fixed, top-k varied (s = 16 .. 2).
       Claim C-A1: loss rises monotonically with s.
  A2a  experts at fixed N_total (within 3%), s = 4 and granularity G = d/d_exp = 2: more experts
       force a smaller width. Claim C-A2: loss rises slightly with E.
  A2b  experts at fixed L, d, N_total, N_active and s = 8, expert size free (d_exp ~ 1/E):
       the s = 8 row of B2 (paper_b.py). Claim C-A2b (discriminating): paper A's "minimize E"
       predicts equal or worse loss with more experts; Krajewski/OLMoE/DeepSeekMoE predict
       finer experts help.
  A4   the §5 design search under a memory and an active budget (top-k >= 2): its top design
       and A4_RANDOM designs drawn uniformly (seeded) from the feasible designs in the same
       N_total bucket (within 3% of the top's N_total), so the comparison tests the ranking's
       later keys (s, then E), not N_total. Claim C-A4: the top design beats their median.
Tier 1 (the default selection): A1 and A2a.
"""

import numpy as np

from experiments import papers
from experiments.papers import EQUIVALENCE_MARGIN, noise_class  # pylint: disable=unused-import  (read by moejax.studies)
from experiments.papers import point
from moejax.studies import design

# Budgets (in parameters, embeddings included) and search grids of A4 per scale.
A4 = {
    'tiny': dict(memory=6e5, active=2e5, layers=[1, 2, 3, 4], widths=list(range(32, 257, 16)), head_dim=16),
    'tiny2': dict(memory=6e5, active=2e5, layers=[1, 2, 3, 4], widths=list(range(32, 257, 16)), head_dim=16,
                  bucket_on='n_total_nonembed'),
    'gpu': dict(memory=3e7, active=6e6, layers=[2, 3, 4, 6, 8], widths=list(range(128, 577, 32)), head_dim=64),
    'paper': dict(memory=1.6e9, active=3e8, layers=[8, 12, 16, 24, 32], widths=list(range(512, 2049, 128)),
                  head_dim=128),
}
A4_RANDOM = 3
A4_BUCKET = 0.03  # relative N_total window of the random designs around the top design's

get_config = papers.get_config
GRIDS = ('A1', 'A2a', 'A2b', 'A4')  # every grid id


def check_arg(arg):
  """`SCALE[,GRID...]`: a known scale and grid ids of this file."""
  papers.check_arg(arg, GRIDS)


def designs(scale):
  """{grid id: [point overrides at seed 0]}: one entry per configuration."""
  if scale.startswith('tiny'):
    return {
        'A1': [point(32, k, 32) for k in (16, 8, 4, 2)],
        # N_total 703.6K, 684.9K, 691.7K (embeddings included; test: papers_test). tiny2 fixes head_dim at 16, so
        # its middle width is 112 (f 54: N_total 713.9K, +1.5%; G = 2.07) instead of 108.
        'A2a': [point(8, 2, 72, d=144), point(16, 4, 54, d=112 if scale == 'tiny2' else 108), point(32, 8, 40, d=80)],
        'A2b': [point(8 * k, k, 192 // k) for k in (2, 3, 4, 6, 8)],
        'A4': a4_points(scale),
    }
  m = 4 if scale == 'paper' else 1  # the paper scale is the gpu grid at 4x width
  return {
      'A1': [point(64, k, 128 * m) for k in (32, 16, 8, 4)],
      # gpu N_total 29.39M, 29.07M, 29.82M, 29.85M (within 3%)
      'A2a': [point(8, 2, 256 * m, d=512 * m, L=6), point(16, 4, 196 * m, d=392 * m, L=6),
              point(32, 8, 148 * m, d=296 * m, L=6), point(64, 16, 108 * m, d=216 * m, L=6)],
      'A2b': [point(8 * k, k, 768 * m // k) for k in (2, 3, 4, 6, 8, 12, 16)],
      'A4': a4_points(scale),
  }


def a4_points(scale):
  """The top design of the constrained search and A4_RANDOM random feasible designs of matched N_total (seeded)."""
  b = A4[scale]
  space = design.space_from_config(get_config(scale), layers=b['layers'], widths=b['widths'], head_dim=b['head_dim'],
                                   experts=[1] + [2**i for i in range(1, 8)], shared=[0], aspect_range=(8, 256),
                                   min_topk=2)
  result = design.search(space, design.Budget(b['memory'], b['active'], None, bytes_per_param=1.0))
  n_total = result.designs[b.get('bucket_on', 'n_total')]  # tiny2: the bucket leaves the tied embedding out
  bucket = np.flatnonzero(np.abs(n_total - n_total[0]) <= A4_BUCKET * n_total[0])[1:]
  picks = np.random.default_rng(0).choice(bucket, min(A4_RANDOM, len(bucket)), replace=False)
  out = []
  for tag, i in [('top', 0)] + [(f'rand{j}', int(i)) for j, i in enumerate(sorted(picks))]:
    o = design.overrides(result.designs, i, head_dim=b['head_dim'])
    if o['moe.num_experts']:
      o.update(papers.gates(o['moe.experts_per_token']))
    out.append(dict(o, seed=0, name=f'A4-{tag}-{design.design_name(o)}', **{'data.seed': 0}))
  return out


def grids(scale, names=None):
  """{grid id: [point overrides]} at `scale` (only `names` if given): every design at the scale's seeds."""
  return {g: papers.seeded(pts, scale) for g, pts in designs(scale).items() if names is None or g in names}


def get_sweep(arg=None):
  """The selected grids' points, deduplicated."""
  scale, _ = papers.parse_arg(arg)
  return papers.sweep_of(grids(scale, papers.selected(arg, GRIDS)), arg)

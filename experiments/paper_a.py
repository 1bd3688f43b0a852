"""Paper A (Liew et al. 2026): at fixed memory, loss follows N_total and sparsity s = E/k.

Grids (SCIENCE.md §4; `--config=experiments/paper_a.py:SCALE[,GRID...]`):
  A1   s at fixed N_total and core: E and expert size fixed, top-k varied.
       Claim C-A1: loss rises monotonically with s.
  A2a  experts at fixed N_total, s and granularity G = d/d_exp: more experts force a smaller
       width. Claim C-A2: loss rises slightly with E.
  A2b  control: experts at fixed L, d, N_total, N_active and s, expert size free (d_exp ~ 1/E).
       Claim C-A2b (discriminating): paper A's "minimize E" predicts equal or worse loss
       with more experts; Krajewski/OLMoE/DeepSeekMoE predict finer experts help.
  A4   the §5 design search under a memory and an active budget: its top design and four
       designs drawn uniformly from the feasible set (seeded). Claim C-A4: the top design
       beats the median of the random ones.
Tier 1 (the default selection): A1 and A2a. At tiny scale A2b equals B2 (paper_b.py).
"""

import numpy as np

from experiments import papers
from experiments.papers import point
from moejax import design

# Budgets (in parameters, embeddings included) and search grids of A4 per scale.
A4 = {
    'tiny': dict(memory=6e5, active=2e5, layers=[1, 2, 3, 4], widths=list(range(32, 257, 16)), head_dim=16),
    'gpu': dict(memory=3e7, active=6e6, layers=[2, 3, 4, 6, 8], widths=list(range(128, 577, 32)), head_dim=64),
    'paper': dict(memory=1.6e9, active=3e8, layers=[8, 12, 16, 24, 32], widths=list(range(512, 2049, 128)),
                  head_dim=128),
}
A4_RANDOM = 4

get_config = papers.get_config
GRIDS = ('A1', 'A2a', 'A2b', 'A4')  # every grid id at some scale (sweep_of checks the scale's own set)


def check_arg(arg):
  """`SCALE[,GRID...]`: a known scale and grid ids of this file."""
  papers.check_arg(arg, GRIDS)


def grids(scale):
  """{grid id: [point overrides]} at `scale`."""
  if scale == 'tiny':
    return {
        'A1': [point(32, k, 32) for k in (16, 4, 1)],
        'A2a': [point(4, 1, 72, d=144), point(16, 4, 44, d=88), point(64, 16, 24, d=48)],
        'A2b': [point(8, 1, 128), point(32, 4, 32), point(128, 16, 8)],
        'A4': a4_points(scale),
    }
  m = 4 if scale == 'paper' else 1  # the paper scale is the gpu grid at 4x width and depth
  return {
      'A1': [point(64, k, 128 * m) for k in (32, 16, 8, 4)],
      'A2a': [point(8, 1, 256 * m, d=512 * m, L=6 * m), point(16, 2, 192 * m, d=384 * m, L=6 * m),
              point(32, 4, 144 * m, d=288 * m, L=6 * m), point(64, 8, 104 * m, d=208 * m, L=6 * m)],
      'A2b': [point(8, 1, 576 * m, d=288 * m, L=6 * m), point(32, 4, 144 * m, d=288 * m, L=6 * m),
              point(128, 16, 36 * m, d=288 * m, L=6 * m)],
      'A4': a4_points(scale),
  }


def a4_points(scale):
  """The top design of the constrained search and A4_RANDOM random feasible designs (seeded)."""
  b = A4[scale]
  space = design.space_from_config(get_config(scale), layers=b['layers'], widths=b['widths'], head_dim=b['head_dim'],
                                   experts=[1] + [2**i for i in range(1, 8)], shared=[0], aspect_range=(8, 256))
  result = design.search(space, design.Budget(b['memory'], b['active'], None, bytes_per_param=1.0))
  n = len(result.designs['n_total'])
  picks = np.random.default_rng(0).choice(np.arange(1, n), A4_RANDOM, replace=False)
  out = []
  for tag, i in [('top', 0)] + [(f'rand{j}', int(i)) for j, i in enumerate(picks)]:
    o = design.overrides(result.designs, i, head_dim=b['head_dim'])
    if o['moe.num_experts']:
      o['moe.use_renormalized_gates'] = o['moe.experts_per_token'] > 1  # as papers.point
    out.append(dict(o, seed=0, name=f'A4-{tag}-{design.design_name(o)}'))
  return out


def get_sweep(arg=None):
  """The selected grids' points, deduplicated."""
  scale, _ = papers.parse_arg(arg)
  return papers.sweep_of(grids(scale), arg)



"""Paper A (Liew et al. 2026): at fixed memory, loss follows N_total and sparsity s = E/k.

Grids (SCIENCE.md §4; `--config=experiments/paper_a.py:SCALE[,GRID...]`):
  A1   s at fixed N_total and core: E and expert size fixed, top-k varied.
       Claim C-A1: loss rises monotonically with s.
  A2a  experts at fixed N_total, s and granularity G = d/d_exp: more experts force a smaller
       width. Claim C-A2: loss rises slightly with E.
  A2b  control: experts at fixed L, d, N_total, N_active and s, expert size free (d_exp ~ 1/E).
       Claim C-A2b (discriminating): paper A's "minimize E" predicts equal or worse loss
       with more experts; Krajewski/OLMoE/DeepSeekMoE predict finer experts help.
Tier 1 (the default selection): A1 and A2a. At tiny scale A2b equals B2 (paper_b.py).
"""

from experiments import papers
from experiments.papers import point

get_config = papers.get_config


def grids(scale):
  """{grid id: [point overrides]} at `scale`."""
  if scale == 'tiny':
    return {
        'A1': [point(32, k, 32) for k in (16, 4, 1)],
        'A2a': [point(4, 1, 72, d=144), point(16, 4, 44, d=88), point(64, 16, 24, d=48)],
        'A2b': [point(8, 1, 128), point(32, 4, 32), point(128, 16, 8)],
    }
  m = 4 if scale == 'paper' else 1  # the paper scale is the gpu grid at 4x width and depth
  return {
      'A1': [point(64, k, 128 * m) for k in (32, 16, 8, 4)],
      'A2a': [point(8, 1, 256 * m, d=512 * m, L=6 * m), point(16, 2, 192 * m, d=384 * m, L=6 * m),
              point(32, 4, 144 * m, d=288 * m, L=6 * m), point(64, 8, 104 * m, d=208 * m, L=6 * m)],
      'A2b': [point(8, 1, 576 * m, d=288 * m, L=6 * m), point(32, 4, 144 * m, d=288 * m, L=6 * m),
              point(128, 16, 36 * m, d=288 * m, L=6 * m)],
  }


def get_sweep(arg=None):
  """The selected grids' points, deduplicated."""
  scale, _ = papers.parse_arg(arg)
  return papers.sweep_of(grids(scale), arg)



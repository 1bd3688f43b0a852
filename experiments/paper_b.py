"""Paper B ("Slicing and Dicing", 2026): at fixed active parameters, what the MoE design space buys.

Grids (SCIENCE.md §4; `--config=experiments/paper_b.py:SCALE[,GRID...]`):
  B1   total parameters at fixed active: a true dense model (no experts, FFN hidden k * d_exp,
       first), then E grows at fixed k and expert size; the s=16 point has 3 seeds (the
       seed-noise estimate). Claims C-B1 (loss falls with E, diminishing returns) and the
       prior "MoE beats the active-matched dense model" (dense vs s = 4).
  B2   expert size at fixed active (k * d_exp fixed) at s = 8 (and s = 32 at gpu scale,
       `B2s32` at tiny): C-B2, the best d_exp barely moves with s.
  B2p  (gpu/paper) B2 at a 1.5x wider model: does the best d_exp move with N_active?
  B3   shared expert vs one more routed expert (equal total and active): small effect.
  B4   heterogeneous expert sizes vs uniform (equal total): small effect.
  B5   load balancing: sequence-wise aux, aux-free bias (+ sequence aux 1e-4), none.
  B6   token dropping in training (capacity factor 1.0 and 1.25, position policy) vs
       dropless; evaluation is dropless. C-B6: dropless < CF 1.25 <= CF 1.0.
Tier 1 (the default selection): B1, B2 and B6.
"""

from experiments import papers
from experiments.papers import dense, point, seeds

get_config = papers.get_config
GRIDS = ('B1', 'B2', 'B2s32', 'B2p', 'B3', 'B4', 'B5', 'B6')  # every grid id at some scale (sweep_of checks the scale's own set)


def check_arg(arg):
  """`SCALE[,GRID...]`: a known scale and grid ids of this file."""
  papers.check_arg(arg, GRIDS)


def grids(scale):
  """{grid id: [point overrides]} at `scale`."""
  if scale == 'tiny':
    center = point(32, 2, 64)  # B1 at s = 16: the reference of B3-B6 and the seed replicates
    return {
        'B1': [dense(2 * 64), point(2, 2, 64), point(8, 2, 64), *seeds(center, papers.SCALES['tiny']['seeds']), point(128, 2, 64)],
        'B2': [point(8, 1, 128), point(32, 4, 32), point(128, 16, 8)],
        'B2s32': [point(32, 1, 128), point(128, 4, 32), point(512, 16, 8)],
        'B3': [center, point(31, 1, 64, tag='sh1', **{'moe.num_shared_experts': 1})],
        'B4': [center, point(32, 2, 64, tag='het', **{'moe.expert_size_classes': '16x32,16x96'})],
        'B5': [center, point(32, 2, 64, tag='lb_sequence', **{'moe.load_balancing': 'sequence'}),
               point(32, 2, 64, tag='lb_auxfree', **{'moe.load_balancing': 'aux_free',
                                                     'moe.aux_free_sequence_coef': 1e-4}),
               point(32, 2, 64, tag='lb_none', **{'moe.load_balancing': 'none'})],
        'B6': [center, point(32, 2, 64, tag='cf1.0', **{'moe.train_capacity_factor': 1.0}),
               point(32, 2, 64, tag='cf1.25', **{'moe.train_capacity_factor': 1.25})],
    }
  m = 4 if scale == 'paper' else 1  # the paper scale is the gpu grid at 4x width and depth
  f, k = 128 * m, 4
  center = point(64, k, f)
  n_seeds = papers.SCALES[scale]['seeds']
  return {
      'B1': [dense(k * f), point(4, k, f), point(16, k, f), *seeds(center, n_seeds), point(256, k, f), point(512, k, f)],
      'B2': [point(s * kk, kk, 512 * m // kk) for s in (8, 32) for kk in (2, 4, 8, 16)],
      'B2p': [point(8 * kk, kk, 768 * m // kk, d=384 * m) for kk in (2, 4, 8, 16)],
      'B3': [center, point(63, 3, f, tag='sh1', **{'moe.num_shared_experts': 1})],
      'B4': [center, point(64, k, f, tag='het', **{'moe.expert_size_classes': f'32x{f // 2},32x{3 * f // 2}'})],
      'B5': [center, point(64, k, f, tag='lb_sequence', **{'moe.load_balancing': 'sequence'}),
             point(64, k, f, tag='lb_auxfree', **{'moe.load_balancing': 'aux_free', 'moe.aux_free_sequence_coef': 1e-4}),
             point(64, k, f, tag='lb_none', **{'moe.load_balancing': 'none'})],
      'B6': [center, point(64, k, f, tag='cf1.0', **{'moe.train_capacity_factor': 1.0}),
             point(64, k, f, tag='cf1.25', **{'moe.train_capacity_factor': 1.25})],
  }


def get_sweep(arg=None):
  """The selected grids' points, deduplicated."""
  scale, _ = papers.parse_arg(arg)
  return papers.sweep_of(grids(scale), arg)

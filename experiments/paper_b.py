"""Paper B ("Slicing and Dicing", 2026): at fixed active parameters, what the MoE design space buys.

Grids (docs/reproducing-the-papers.md; `--config=experiments/paper_b.py:SCALE[,GRID...]`). Every point runs
at the scale's seeds (papers.SCALES) with the protocol of experiments/papers.py; points of a
grid differ only in the variables its claim names.
  LR   the learning-rate sweep, seed 0: at tiny, gpu and paper, anchor configurations (dense,
       the B1 centre, the largest E, the finest B2 expert) at the rates of papers.LR[scale]
       ['sweep']; at tiny2, the B1 centre's shape at k = 2 and 8 and widths 64, 96, 144 at the
       rates of papers.LR_ANCHORS (papers.LR_RULE is fitted to it). Points at the chosen rate are
       grid points too.
  B1   total parameters at fixed active: a true dense model (no experts, FFN hidden k * d_exp,
       first), then E grows at fixed k and expert size. Claims C-B1 (loss falls with E,
       diminishing returns) and the prior "MoE beats the active-matched dense model"
       (dense vs s = 4). B1's s = 4 -> 16 step also sets the equivalence margin T.
  B2   expert size at fixed active (k * d_exp fixed, s = 8): 5 sizes (k = 2..8), plus B2s32
       (the same at s = 32, 3 sizes) and B2p (5 sizes at a 1.5x wider model, a second active
       scale): C-B2, the best d_exp follows the active scale, not s.
  B3   shared expert vs one more routed expert (equal total and active): small effect.
  B4   heterogeneous expert sizes vs uniform (equal total, equal expected active): small effect.
  B5   load balancing: sequence-wise aux, aux-free bias (+ sequence aux 1e-4) (small effects),
       and none (a collapse check, reported apart).
  B6   token dropping in training, a dose-response over capacity factors 0.5, 1.0, 1.25
       (position policy) and dropless; evaluation is dropless. C-B6: loss falls as CF rises.
Tier 1 (the default selection): B1, B2 and B6.
"""

from experiments import papers
from experiments.papers import EQUIVALENCE_MARGIN, noise_class  # pylint: disable=unused-import  (read by moejax.studies)
from experiments.papers import dense, lr_points, point

get_config = papers.get_config
GRIDS = ('LR', 'B1', 'B2', 'B2s32', 'B2p', 'B3', 'B4', 'B5', 'B6')  # every grid id


def check_arg(arg):
  """`SCALE[,GRID...]`: a known scale and grid ids of this file."""
  papers.check_arg(arg, GRIDS)


def designs(scale):
  """{grid id: [point overrides at seed 0]}: one entry per configuration."""
  if scale.startswith('tiny'):
    d, k, f = 64, 2, 64
    center = point(32, k, f)  # B1 at s = 16: the reference of B4-B6
    b2 = lambda s, dd, ks: [point(s * kk, kk, 3 * dd // kk, d=dd if dd != d else None) for kk in ks]
    out = {
        'B1': [dense(k * f), point(8, k, f), center, point(128, k, f)],
        'B2': b2(8, d, (2, 3, 4, 6, 8)),
        'B2s32': b2(32, d, (2, 4, 8)),
        'B2p': b2(8, 96, (2, 3, 4, 6, 8)),
        'B3': [point(32, 4, 32), point(31, 3, 32, tag='sh1', **{'moe.num_shared_experts': 1})],
        'B4': [center, point(32, k, f, tag='het', **{'moe.expert_size_classes': '16x32,16x96'})],
    }
  else:
    m = 4 if scale == 'paper' else 1  # the paper scale is the gpu grid at 4x width
    d, k, f = 256 * m, 4, 128 * m
    center = point(64, k, f)
    b2 = lambda s, dd, ks: [point(s * kk, kk, 3 * dd // kk, d=dd if dd != d else None) for kk in ks]
    out = {
        'B1': [dense(k * f), point(16, k, f), center, point(256, k, f), point(512, k, f)],
        'B2': b2(8, d, (2, 3, 4, 6, 8, 12, 16)),
        'B2s32': b2(32, d, (2, 4, 8, 16)),
        'B2p': b2(8, 384 * m, (2, 3, 4, 6, 8, 12, 16)),
        'B3': [point(64, 4, f), point(63, 3, f, tag='sh1', **{'moe.num_shared_experts': 1})],
        'B4': [center, point(64, k, f, tag='het', **{'moe.expert_size_classes': f'32x{f // 2},32x{3 * f // 2}'})],
    }
  E = center['moe.num_experts']
  out['B5'] = [center, point(E, k, f, tag='lb_sequence', **{'moe.load_balancing': 'sequence'}),
               point(E, k, f, tag='lb_auxfree', **{'moe.load_balancing': 'aux_free', 'moe.aux_free_sequence_coef': 1e-4}),
               point(E, k, f, tag='lb_none', **{'moe.load_balancing': 'none'})]
  out['B6'] = [point(E, k, f, tag=f'cf{cf:g}', **{'moe.train_capacity_factor': cf}) for cf in (0.5, 1.0, 1.25)] + [center]
  anchors = [out['B1'][0], center, out['B1'][-1], out['B2'][-1]]
  lr_grid = papers.lr_anchor_points(scale) if scale in papers.LR_ANCHORS else [q for p in anchors for q in lr_points(p, scale)]
  out = {'LR': lr_grid, **out}
  return out


def grids(scale, names=None):
  """{grid id: [point overrides]} at `scale` (only `names` if given): every design at the scale's seeds
  (LR: seed 0 only)."""
  return {g: (pts if g == 'LR' else papers.seeded(pts, scale)) for g, pts in designs(scale).items()
          if names is None or g in names}


def get_sweep(arg=None):
  """The selected grids' points, deduplicated."""
  scale, _ = papers.parse_arg(arg)
  return papers.sweep_of(grids(scale, papers.selected(arg, GRIDS)), arg)

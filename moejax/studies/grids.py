"""The paper grids' rows: results rows matched to the grids of experiments/paper_a.py and paper_b.py at a scale
by configuration hash (so names and seeds do not matter and a point shared by two grids is one row), the rows
the noise is estimated from, and the default-design rows the scaling laws are fitted to."""

from __future__ import annotations

import functools
import json
import os

from moejax import config as config_lib
from moejax.studies import results

EXPERIMENTS = ('paper_a', 'paper_b')


def experiments_dir() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'experiments')


def grid_points(scale: str, names=None) -> dict[str, list[dict]]:
  """{grid id: [{'config_hash', 'point' (the overrides at seed 0), 'noise_class', 'config'}]} for the paper grids
  at `scale` (only the grids `names`, if given), one entry per configuration (seeds of one configuration are one
  entry), in grid order."""
  out = {}
  for name in EXPERIMENTS:
    module = config_lib.load_module(os.path.join(experiments_dir(), f'{name}.py'))
    base = module.get_config(scale)
    classify = getattr(module, 'noise_class', lambda p: 'default')
    for grid, points in module.grids(scale, names).items():
      found, seen = [], set()
      for p in points:
        cfg = config_lib.apply_overrides(base, p)
        digest = results.config_hash(config_lib.flatten(json.loads(cfg.to_json_best_effort())))
        if digest not in seen:
          seen.add(digest)
          found.append({'config_hash': digest, 'point': p, 'noise_class': classify(p), 'config': cfg})
      out[grid] = found
  return out


@functools.lru_cache(maxsize=4)
def _grid_hashes(scale: str) -> tuple:
  """((grid id, ((config_hash, noise_class), ...)), ...): what `grid_rows` needs of `grid_points`, read once per
  process (the report evaluates the claims at every decay-branch budget)."""
  return tuple((grid, tuple((p['config_hash'], p['noise_class']) for p in points))
               for grid, points in grid_points(scale).items())


def grid_rows(rows: list[dict], scale: str) -> dict[str, list[dict | None]]:
  """{grid id: [results row or None per configuration]} for the paper grids at `scale`."""
  by_hash = {r['config_hash']: r for r in rows}
  out = {}
  for grid, points in _grid_hashes(scale):
    found = []
    for digest, noise_class in points:
      row = by_hash.get(digest)
      if row is not None:
        row['noise_class'] = noise_class  # declared by the grid file before the runs
      found.append(row)
    out[grid] = found
  return out


def equivalence_margin(scale: str) -> float | None:
  """The small-effect margin T the grid files fix in advance for `scale` (None: not fixed, no equivalence verdict)."""
  module = config_lib.load_module(os.path.join(experiments_dir(), 'paper_b.py'))
  return (getattr(module, 'EQUIVALENCE_MARGIN', None) or {}).get(scale)


def effects_of_interest(scale: str) -> dict | None:
  """{claim key: (effect in nats, source)} the grid files declare for `scale` before the runs (experiments/papers.py
  EFFECT_OF_INTEREST); None where none is declared."""
  module = config_lib.load_module(os.path.join(experiments_dir(), 'papers.py'))
  return (getattr(module, 'EFFECT_OF_INTEREST', None) or {}).get(scale)


def noise_rows(g: dict) -> list[dict]:
  """The rows the noise is estimated from: every grid point (deduplicated) but the learning-rate sweep's and the
  no-balancing collapse check's (whose variance is its own)."""
  out = {}
  for grid, rows in g.items():
    for r in rows:
      if r is not None and grid != 'LR' and r.get('load_balancing') != 'none':
        out[r['config_hash']] = r
  return list(out.values())


def scaling_rows(rows: list[dict]) -> list[dict]:
  """The MoE rows with the default design choices (global-batch balancing, dropless, no shared and uniform
  experts): the B3-B6 variants change other axes than the counts the laws are about."""
  return [r for r in rows if (r.get('num_experts') or 0) > 0 and r.get('load_balancing') == 'global_batch'
          and r.get('drop_policy') == 'dropless' and r.get('eval_drop_policy') == 'dropless'
          and not r.get('num_shared_experts')
          and not r.get('moe.expert_size_classes')]


FAMILIES = {'A': ('A1', 'A2a', 'A2b', 'A4'), 'B': ('B1', 'B2', 'B2s32', 'B2p')}


def family_rows(rows: list[dict], g: dict) -> dict[str, list[dict]]:
  """{'A': paper A's grids, 'B': paper B's count grids, 'all': both} (default-design MoE rows, deduplicated).

  Only grid points enter: runs outside the grids (the learning-rate sweep's other rates) would mix protocols.
  """
  default = {r['config_hash'] for r in scaling_rows(rows)}
  out, every = {}, {}
  for fam, grids in FAMILIES.items():
    chosen = {r['config_hash']: r for grid in grids for r in (g.get(grid) or []) if r and r['config_hash'] in default}
    out[fam] = list(chosen.values())
    every.update(chosen)
  out['all'] = list(every.values())
  return out

"""The claims at every decay-branch budget, and loss against parameters and tokens from the same branches.

Every run of the paper grids also records the held-out loss after short decays branched at 1/4 and 1/2 of its
steps (`decay_curve` in result.json; Hägele et al. 2024: a branch matches a separate run of that length). So each
configuration has its seeds' losses at several token budgets, and:

  `rows_at(rows, tokens)`       the results rows as if every run had stopped at `tokens` (its decay branch there)
  `by_budget(rows, scale)`      every claim evaluated at every budget with the noise measured at that budget
  `effect_rows(stages, ...)`    claim x budget: the effect and verdict at each, and whether the effect still changes
                                between the last two budgets (the same claims on per-seed loss changes)
  `token_points(rows)`          one point per configuration and budget for `fits.fit_token_laws`

The change between two budgets is a contrast of per-seed changes L_seed(later) - L_seed(earlier): evaluating the
claims on those rows gives each linear effect's change with the noise of the changes themselves (the same blocks
and classes as the losses), so the strong correlation of one run's losses at two budgets is measured, not assumed.
"""

from __future__ import annotations

import dataclasses
import statistics as stats_lib

import numpy as np

from moejax.studies import claims as claims_lib
from moejax.studies.verdicts import Claim

LINEAR = ('direction', 'trend', 'equivalence')  # claims whose effect is a difference of loss means


@dataclasses.dataclass
class Stage:
  """The claims at one budget: tokens per run, the claims, and `claims.evaluate`'s noise information there."""
  tokens: int
  claims: list[Claim]
  noise: dict


def budgets(rows: list[dict]) -> list[int]:
  """Every budget (tokens per run) some row has a seed's decay branch at, ascending, the full runs' included."""
  found = {p['tokens'] for r in rows for curve in (r.get('seed_curves') or {}).values() for p in curve
           if p.get('tokens') and p.get('loss') is not None}
  return sorted(found | {r['tokens'] for r in rows if r.get('tokens')})


def _with_losses(r: dict, losses: dict[str, float], **extra) -> dict:
  v = list(losses.values())
  return dict(r, seed_losses=losses, losses=v, seeds=len(v), loss_mean=stats_lib.fmean(v),
              loss_std=stats_lib.stdev(v) if len(v) > 1 else None, **extra)


def seed_losses_at(r: dict, tokens: int) -> dict[str, float]:
  """{seed: held-out loss after that seed's decay branch at `tokens`} (the full run: its recorded scores)."""
  if r.get('tokens') == tokens:
    return dict(r.get('seed_losses') or {})
  return {s: p['loss'] for s, curve in (r.get('seed_curves') or {}).items() for p in curve
          if p.get('tokens') == tokens and p.get('loss') is not None}


def rows_at(rows: list[dict], tokens: int) -> list[dict]:
  """The rows as if every run had stopped at `tokens`: seed losses from the decay branches there (rows without a
  branch at `tokens` are left out; a diverged branch drops its seed)."""
  out = []
  for r in rows:
    losses = seed_losses_at(r, tokens)
    if losses:
      out.append(_with_losses(r, losses, tokens=tokens,
                              decay_curve=[p for p in r.get('decay_curve') or [] if p['tokens'] <= tokens]))
  return out


def change_rows(rows: list[dict], earlier: int, later: int) -> list[dict]:
  """Rows whose seed 'losses' are L_seed(later) - L_seed(earlier), over the seeds with both."""
  out = []
  for r in rows:
    a, b = seed_losses_at(r, earlier), seed_losses_at(r, later)
    losses = {s: b[s] - a[s] for s in a if s in b}
    if losses:
      out.append(_with_losses(r, losses))
  return out


def by_budget(rows: list[dict], scale: str, final: tuple[list[Claim], dict] | None = None) -> list[Stage]:
  """The claims at every budget, ascending; the full runs' are `final` (claims, noise) when given (with the fits
  that decide C-A3: the fit at a shorter budget is not refitted here, so C-A3 is inconclusive there)."""
  out = []
  full = max((r['tokens'] for r in rows if r.get('tokens')), default=None)
  for tokens in budgets(rows):
    if tokens == full and final is not None:
      out.append(Stage(tokens, *final))
    else:
      out.append(Stage(tokens, *claims_lib.evaluate(rows_at(rows, tokens), scale)))
  return out


def _tendency(earlier: Claim, later: Claim, change: Claim | None) -> str:
  """'shrinks' / 'grows': the 95% interval of the change in the effect excludes 0 towards / away from no effect;
  'crosses 0' when the two budgets' effects differ in sign and that change is resolved ('sign differs (not
  resolved)' when it is not); else 'no change resolved' (or why there is no test)."""
  if change is None or change.delta is None or earlier.delta is None or later.delta is None:
    return '-'
  if change.half_width is None:
    return 'no noise estimate'
  moved = np.sign(earlier.delta) * change.delta
  resolved = abs(change.delta) > change.half_width
  if earlier.delta * later.delta < 0:
    return 'crosses 0' if resolved else 'sign differs (not resolved)'
  if moved + change.half_width < 0:
    return 'shrinks'
  if moved - change.half_width > 0:
    return 'grows'
  return 'no change resolved'


def effect_rows(stages: list[Stage], rows: list[dict] | None = None, scale: str | None = None) -> list[dict]:
  """Claim x budget: [{'id', 'statement', 'kind', 'cells': [{'tokens', 'claim'}], 'change': the claim evaluated
  on the per-seed changes between the last two budgets (None without `rows` or a second budget), 'tendency'}]."""
  if not stages:
    return []
  changes = None
  if rows is not None and len(stages) >= 2:
    changes = claims_lib.evaluate(change_rows(rows, stages[-2].tokens, stages[-1].tokens), scale)[0]
  out = []
  for i, last in enumerate(stages[-1].claims):
    cells = [{'tokens': s.tokens, 'claim': s.claims[i]} for s in stages if i < len(s.claims)
             and s.claims[i].id == last.id]
    change = changes[i] if changes and last.kind in LINEAR and changes[i].id == last.id else None
    out.append({'id': last.id, 'statement': last.statement, 'kind': last.kind, 'cells': cells, 'change': change,
                'tendency': _tendency(cells[-2]['claim'], last, change) if len(cells) >= 2 else '-'})
  return out


def token_points(rows: list[dict]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """(x, y, groups) for `fits.fit_token_laws`: one point per configuration and budget (seed-mean loss over the
  seeds with a branch there), non-embedding N_total and N_active, tokens per run; groups: the configuration."""
  x: dict[str, list] = {'n_total': [], 'n_active': [], 'tokens': []}
  y, groups = [], []
  for r in rows:
    for tokens in budgets([r]):
      losses = seed_losses_at(r, tokens)
      if not losses:
        continue
      x['n_total'].append(r.get('n_total_nonembed') or r['n_total'])
      x['n_active'].append(r.get('n_active_nonembed') or r['n_active'])
      x['tokens'].append(tokens)
      y.append(stats_lib.fmean(losses.values()))
      groups.append(r['config_hash'])
  return {k: np.asarray(v, np.float64) for k, v in x.items()}, np.asarray(y, np.float64), np.asarray(groups)

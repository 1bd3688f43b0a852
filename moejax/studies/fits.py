"""Scaling-law fits over result tables (SCIENCE.md §3), and which forms beat their baselines.

Method (Chinchilla approach 3, Hoffmann et al. 2022): minimize the sum of Huber losses
(delta = 1e-3) between predicted and measured log-loss with L-BFGS-B, started from every
point of an initial grid (subsampled to at most `max_starts`), keeping the best optimum.
Positive constants are fitted as exp(raw) and kappa as a sigmoid, so the search is
unconstrained. Counts are non-embedding (Kaplan et al.); the data term is dropped because
every run of a scale sees the same tokens.

Forms (X = one row per configuration; N_t = N_total, N_a = N_active, E = routed experts,
s = E/k, f = expert hidden size; E = 1, s = 1 for dense):
  total_sparsity      L = exp(e) + exp(a) * N_t^-alpha * s^gamma          (paper A: L = f(N_total, s))
  effective_params    L = exp(e) + exp(a) * N_eff^-alpha + c_E * ln E,    N_eff = N_t^(1-kappa) * N_a^kappa
  expert_size         effective_params + exp(h) * (ln f - ln f*)^2,       ln f* = mu0 + mu_a ln N_a + mu_t ln N_t

Baselines, fitted and scored the same way beside every form:
  constant            L = exp(c)                                          (one number for every run)
  log_linear          ln L = c0 + c1 ln N_t + c2 ln N_a

Against tokens too (`TOKEN_FORMS`, `fit_token_laws`: one point per configuration and decay-branch budget D):
  chinchilla          L = E + exp(a) * N_a^-alpha + exp(b) * D^-beta      (E, alpha, beta box-bounded at 0)
  log_linear_tokens   ln L = c0 + c1 ln N_a + c2 ln D                     (its baseline, beside the constant)
There the points of one configuration move together: the bootstrap resamples configurations, leave-one-out leaves a
configuration out and the extrapolation holds out the largest-N_active configurations (`fit(groups=...)`).

Uncertainty: bootstrap over configurations (resample rows with replacement and refit
each resample from the whole start grid plus the full-data optimum), 95% percentile
intervals (`refit_starts` of the grid's points, 8 by default). Prediction:
leave-one-configuration-out error (each fold refitted the same way), reported as RMSE and max |error| in nats,
and extrapolation: refitted without the 20% of configurations with the largest N_total, RMSE on them. A form
beats a baseline when the 95% interval of its held-out RMSE minus the baseline's, from a bootstrap over
configurations, lies below 0 (`baseline_comparisons`), on both scores.
In-sample residuals are kept per configuration (`Fit.residuals`) so callers can look for a bias by k. The objective is the Huber sum divided
by delta^2 (values of order 1, not 1e-5), with tight L-BFGS-B tolerances: at the raw
scale L-BFGS-B's relative stop test ended resample fits at their start, which made the
bootstrap intervals several times too narrow (true alpha 0.3: [0.275, 0.280]) and left
LOO folds unmoved.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3
BOUND_TOLERANCE = 1e-3  # a bounded parameter this close to its bound is reported at the bound


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@dataclasses.dataclass(frozen=True)
class Form:
  """A parametric law: raw parameter names, their initial grid, readable values, and the prediction."""
  name: str
  raw_names: tuple[str, ...]
  init: dict[str, tuple[float, ...]]
  values: Callable[[np.ndarray], dict[str, float]]
  predict: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray]
  needs: tuple[str, ...]
  bounds: dict = dataclasses.field(default_factory=dict)  # readable value -> (low, high) it can only approach
  raw_bounds: tuple | None = None  # L-BFGS-B box bounds per raw parameter ((low, high), None = free), if any


def _total_sparsity(theta, x):
  e, a, alpha, gamma = theta
  return np.exp(e) + np.exp(a - alpha * np.log(x['n_total']) + gamma * np.log(x['sparsity']))


def _log_n_eff(theta_kappa, x):
  kappa = _sigmoid(theta_kappa)
  return (1 - kappa) * np.log(x['n_total']) + kappa * np.log(x['n_active'])


def _effective(theta, x):
  e, a, alpha, kappa_raw, c_e = theta[:5]
  return np.exp(e) + np.exp(a - alpha * _log_n_eff(kappa_raw, x)) + c_e * np.log(x['num_experts'])


def _constant(theta, x):
  return np.full(np.shape(x['n_total']), np.exp(theta[0]))


def _log_linear(theta, x):
  c0, c1, c2 = theta
  return np.exp(c0 + c1 * np.log(x['n_total']) + c2 * np.log(x['n_active']))


def _expert_size(theta, x):
  h, mu0, mu_a, mu_t = theta[5:]
  log_f_star = mu0 + mu_a * np.log(x['n_active']) + mu_t * np.log(x['n_total'])
  return _effective(theta, x) + np.exp(h) * (np.log(x['expert_hidden']) - log_f_star) ** 2


def _chinchilla(theta, x):
  e, a, alpha, b, beta = theta
  return e + np.exp(a - alpha * np.log(x['n_active'])) + np.exp(b - beta * np.log(x['tokens']))


def _log_linear_tokens(theta, x):
  c0, c1, c2 = theta
  return np.exp(c0 + c1 * np.log(x['n_active']) + c2 * np.log(x['tokens']))


FORMS = {
    'constant': Form('constant', ('c',), {'c': (0.0, 1.0)}, lambda t: {'L': float(np.exp(t[0]))}, _constant,
                     ('n_total',)),
    'log_linear': Form('log_linear', ('c0', 'c1', 'c2'), {'c0': (0.0, 2.0), 'c1': (-0.1, 0.0), 'c2': (-0.1, 0.0)},
                       lambda t: {'c0': float(t[0]), 'c1': float(t[1]), 'c2': float(t[2])}, _log_linear,
                       ('n_total', 'n_active')),
    'total_sparsity': Form(
        'total_sparsity', ('e', 'a', 'alpha', 'gamma'),
        {'e': (-1.0, 0.0, 0.5), 'a': (0.0, 5.0, 10.0), 'alpha': (0.1, 0.3, 0.6), 'gamma': (0.0, 0.1)},
        lambda t: {'E': float(np.exp(t[0])), 'A': float(np.exp(t[1])), 'alpha': float(t[2]), 'gamma': float(t[3])},
        _total_sparsity, ('n_total', 'sparsity')),
    'effective_params': Form(
        'effective_params', ('e', 'a', 'alpha', 'kappa_raw', 'c_E'),
        {'e': (-1.0, 0.0, 0.5), 'a': (0.0, 5.0, 10.0), 'alpha': (0.1, 0.3, 0.6), 'kappa_raw': (-2.0, 0.0, 2.0),
         'c_E': (0.0,)},
        lambda t: {'E': float(np.exp(t[0])), 'A': float(np.exp(t[1])), 'alpha': float(t[2]),
                   'kappa': float(_sigmoid(t[3])), 'c_E': float(t[4])},
        _effective, ('n_total', 'n_active', 'num_experts'), {'kappa': (0.0, 1.0)}),
    'expert_size': Form(
        'expert_size', ('e', 'a', 'alpha', 'kappa_raw', 'c_E', 'h', 'mu0', 'mu_a', 'mu_t'),
        {'e': (-1.0, 0.0, 0.5), 'a': (0.0, 5.0, 10.0), 'alpha': (0.1, 0.3, 0.6), 'kappa_raw': (-2.0, 0.0, 2.0),
         'c_E': (0.0,), 'h': (-5.0, -2.0), 'mu0': (0.0, 2.0), 'mu_a': (0.0, 0.3), 'mu_t': (0.0,)},
        lambda t: {'E': float(np.exp(t[0])), 'A': float(np.exp(t[1])), 'alpha': float(t[2]),
                   'kappa': float(_sigmoid(t[3])), 'c_E': float(t[4]), 'h': float(np.exp(t[5])), 'mu0': float(t[6]),
                   'mu_a': float(t[7]), 'mu_t': float(t[8])},
        _expert_size, ('n_total', 'n_active', 'num_experts', 'expert_hidden'), {'kappa': (0.0, 1.0)}),
}

# Loss against parameters and training tokens, fitted to the decay branches (one point per configuration and budget):
# Chinchilla's L = E + A / N^alpha + B / D^beta with N the non-embedding N_active (`fit_token_laws`). E, alpha and
# beta are box-bounded at 0 (a negative exponent or floor has no meaning), so a parameter the data cannot separate
# from 0 lands on its bound and is reported there; the start grid is SCIENCE.md §3.1's (E = exp(e)).
TOKEN_FORMS = {
    'constant': FORMS['constant'],
    'log_linear_tokens': Form(
        'log_linear_tokens', ('c0', 'c1', 'c2'), {'c0': (0.0, 2.0), 'c1': (-0.1, 0.0), 'c2': (-0.1, 0.0)},
        lambda t: {'c0': float(t[0]), 'c1': float(t[1]), 'c2': float(t[2])}, _log_linear_tokens,
        ('n_active', 'tokens')),
    'chinchilla': Form(
        'chinchilla', ('E', 'a', 'alpha', 'b', 'beta'),
        {'E': tuple(float(np.exp(e)) for e in (-1.0, -0.5, 0.0, 0.5)), 'a': (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
         'alpha': (0.0, 0.5, 1.0, 1.5, 2.0), 'b': (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), 'beta': (0.0, 0.5, 1.0, 1.5, 2.0)},
        lambda t: {'E': float(t[0]), 'A': float(np.exp(t[1])), 'alpha': float(t[2]), 'B': float(np.exp(t[3])),
                   'beta': float(t[4])},
        _chinchilla, ('n_active', 'tokens'), {'E': (0.0, np.inf), 'alpha': (0.0, np.inf), 'beta': (0.0, np.inf)},
        ((0.0, None), (None, None), (0.0, None), (None, None), (0.0, None))),
}
TOKEN_BASELINES = ('constant', 'log_linear_tokens')


def _form(name: str) -> Form:
  return FORMS.get(name) or TOKEN_FORMS[name]


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(form: Form, x: dict, y: np.ndarray) -> Callable[[np.ndarray], float]:
  log_y = np.log(y)

  def f(theta):
    with np.errstate(over='ignore', invalid='ignore'):  # a step out to exp overflow: rejected just below, not a fault
      pred = form.predict(theta, x)
    if not np.all(np.isfinite(pred)) or np.any(pred <= 0):
      return 1e6
    return float(np.sum(huber(np.log(pred) - log_y)) / HUBER_DELTA ** 2)
  return f


def _minimize(form: Form, x: dict, y: np.ndarray, start: np.ndarray) -> tuple[float, np.ndarray]:
  res = optimize.minimize(_objective(form, x, y), start, method='L-BFGS-B', bounds=form.raw_bounds,
                          options={'maxiter': 2000, 'ftol': 1e-12, 'gtol': 1e-7})
  return float(res.fun), res.x


def _best(form: Form, x: dict, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
  return min((_minimize(form, x, y, s) for s in grid), key=lambda r: r[0])[1]


def starts(form: Form, max_starts: int, seed: int = 0) -> np.ndarray:
  """The initial grid (every combination), deterministically subsampled to at most `max_starts`."""
  grid = np.array(list(itertools.product(*[form.init[n] for n in form.raw_names])), dtype=np.float64)
  if len(grid) > max_starts:
    grid = grid[np.random.default_rng(seed).choice(len(grid), max_starts, replace=False)]
  return grid


@dataclasses.dataclass
class Fit:
  """A fitted form: values, 95% bootstrap intervals, in-sample and leave-one-out errors (nats)."""
  form: str
  values: dict[str, float]
  intervals: dict[str, tuple[float, float]]
  theta: np.ndarray
  rmse: float
  loo_rmse: float | None
  loo_max: float | None
  n: int
  extrapolation_rmse: float | None = None  # fitted without the largest-N_total configurations, scored on them
  extrapolation_n: int = 0  # configurations held out for it
  residuals: np.ndarray | None = None  # in-sample prediction - measurement per configuration (nats)
  at_bound: dict = dataclasses.field(default_factory=dict)  # parameters at a bound of their range: {name: bound}
  loo_errors: np.ndarray | None = None  # prediction - measurement of each configuration when it was left out
  extrapolation_errors: np.ndarray | None = None  # the same for the largest-N_total configurations (refit without)
  groups: np.ndarray | None = None  # the configuration of each point when a configuration has several (budgets)
  holdout: str = 'n_total'  # the size whose largest configurations the extrapolation score holds out
  outside: np.ndarray | None = None  # the points that score held out, in the order of extrapolation_errors

  def predict(self, x: dict) -> np.ndarray:
    return _form(self.form).predict(self.theta, {k: np.asarray(v, np.float64) for k, v in x.items()})


def fit(form_name: str, x: dict, y, max_starts: int = 64, bootstrap: int = 100, loo: bool = True,
        seed: int = 0, refit_starts: int = 8, holdout_fraction: float = 0.2, groups=None,
        holdout: str = 'n_total') -> Fit:
  """Fits `form_name` to losses `y` (nats) at inputs `x` (dict of arrays); see the module docstring.

  Besides leave-one-out, the form is refitted without the `holdout_fraction` of configurations
  with the largest `holdout` size (N_total) and scored on them (extrapolation, the use a law is fitted for).
  `groups` (one label per point) marks points of one configuration (its decay-branch budgets): the bootstrap
  resamples configurations, leave-one-out leaves a whole configuration out, and the held-out largest are whole
  configurations. Without it every point is its own configuration.
  """
  form = _form(form_name)
  size = np.asarray(x[holdout] if holdout in x else np.arange(len(y)), np.float64)
  x = {k: np.asarray(x[k], np.float64) for k in form.needs}
  y = np.asarray(y, np.float64)
  n = len(y)
  if n < len(form.raw_names) + 1 or n < 2:
    raise ValueError(f'{form_name} has {len(form.raw_names)} parameters; {n} configurations are too few to fit it')
  labels = np.unique(np.asarray(groups), return_inverse=True)[1] if groups is not None else np.arange(n)
  members = [np.flatnonzero(labels == g) for g in range(labels.max() + 1)]
  grid = starts(form, max_starts, seed)
  theta = _best(form, x, y, grid)
  # Resamples restart from `refit_starts` points of the start grid and the full-data optimum; leave-one-out folds
  # and the held-out-largest refit from the start grid only (the full-data optimum has seen the left-out points).
  held_grid = grid[:refit_starts]
  refit_grid = np.concatenate([held_grid, theta[None]])
  rmse = float(np.sqrt(np.mean((form.predict(theta, x) - y) ** 2)))
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(bootstrap):
    idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
    if len(set(idx.tolist())) < len(form.raw_names):
      continue
    samples.append(form.values(_best(form, {k: v[idx] for k, v in x.items()}, y[idx], refit_grid)))
  intervals = {k: (float(np.percentile([s[k] for s in samples], 2.5)), float(np.percentile([s[k] for s in samples], 97.5)))
               for k in form.values(theta)} if samples else {}
  loo_errors, extra_errors, outside = _held_out_errors(form, x, y, members, size, held_grid, loo, holdout_fraction)
  loo_rmse = None if loo_errors is None else float(np.sqrt(np.mean(np.square(loo_errors))))
  loo_max = None if loo_errors is None else float(np.max(np.abs(loo_errors)))
  extra_rmse = None if extra_errors is None else float(np.sqrt(np.mean(extra_errors ** 2)))
  values = form.values(theta)
  at_bound = {k: b for k, (lo, hi) in form.bounds.items() for b in (lo, hi) if abs(values[k] - b) < BOUND_TOLERANCE}
  for k in at_bound:  # a parameter at its bound is not identified: report the bound, not a percentile interval
    intervals.pop(k, None)
  return Fit(form_name, values, intervals, theta, rmse, loo_rmse, loo_max, n, extra_rmse,
             0 if outside is None else len(set(labels[outside].tolist())), form.predict(theta, x) - y, at_bound,
             loo_errors, extra_errors, None if groups is None else labels, holdout, outside)


def _held_out_errors(form, x, y, members, size, grid, loo, holdout_fraction):
  """(prediction - measurement of every point when its configuration was left out, or None; the same for the
  largest configurations by `size` refitted without them, or None; the indices of those points, or None)."""
  n, loo_errors, extra_errors, outside = len(y), None, None, None
  take = lambda idx: {k: v[idx] for k, v in x.items()}
  if loo and len(members) > len(form.raw_names) + 1:
    loo_errors = np.empty(n)
    for out in members:
      keep = np.setdiff1d(np.arange(n), out)
      loo_errors[out] = form.predict(_best(form, take(keep), y[keep], grid), take(out)) - y[out]
  n_out = int(round(holdout_fraction * len(members)))
  if n_out >= 1 and len(members) - n_out > len(form.raw_names) + 1:
    order = np.argsort([size[m].max() for m in members], kind='stable')
    outside = np.concatenate([members[g] for g in order[len(members) - n_out:]])
    inside = np.concatenate([members[g] for g in order[:len(members) - n_out]])
    extra_errors = form.predict(_best(form, take(inside), y[inside], grid), take(outside)) - y[outside]
  return loo_errors, extra_errors, outside


def inputs_from_rows(rows: list[dict]) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Fit inputs (non-embedding counts; dense: E = s = 1, f = its FFN width) and seed-mean losses from results rows."""
  x = {'n_total': [], 'n_active': [], 'sparsity': [], 'num_experts': [], 'expert_hidden': []}
  y = []
  for r in rows:
    x['n_total'].append(r.get('n_total_nonembed') or r['n_total'])
    x['n_active'].append(r.get('n_active_nonembed') or r['n_active'])
    x['sparsity'].append(max(r.get('sparsity') or 1.0, 1.0))
    x['num_experts'].append(max(r.get('num_experts') or 1, 1))
    x['expert_hidden'].append(r.get('expert_hidden') or r.get('ffn_hidden') or 1)
    y.append(r['loss_mean'])
  return {k: np.asarray(v, np.float64) for k, v in x.items()}, np.asarray(y, np.float64)


POINTS_PER_PARAMETER = 5  # a form is fitted only with at least this many configurations per free parameter


BASELINES = ('constant', 'log_linear')


def fit_laws(rows: list[dict], bootstrap: int = 100, starts: int = 32, loo: bool = True) -> dict[str, Fit]:
  """The baselines and every form the default-design MoE rows support (>= 5 configurations per free parameter)."""
  x, y = inputs_from_rows(rows)
  fits = {}
  for name, form in FORMS.items():
    if len(y) >= POINTS_PER_PARAMETER * len(form.raw_names) and len(y) > len(form.raw_names) + 1:
      fits[name] = fit(name, x, y, max_starts=starts, bootstrap=bootstrap, loo=loo)
  return fits


MIN_TOKEN_BUDGETS = 3  # distinct token counts a (N, D) law needs: one budget leaves B and beta free


def fit_token_laws(x: dict, y, groups, bootstrap: int = 100, starts: int = 32, loo: bool = True) -> dict[str, Fit]:
  """`TOKEN_FORMS` fitted to one point per configuration and decay-branch budget (x: 'n_total', 'n_active'
  non-embedding, 'tokens'; `groups`: the configuration of each point), each form only with at least
  POINTS_PER_PARAMETER configurations per free parameter and MIN_TOKEN_BUDGETS distinct token counts (else
  nothing is fitted); extrapolation holds out the largest N_active."""
  configurations = len(set(np.asarray(groups).tolist()))
  if len(set(np.asarray(x['tokens']).tolist())) < MIN_TOKEN_BUDGETS:  # one D: the D term is not identified
    return {}
  return {name: fit(name, x, y, max_starts=starts, bootstrap=bootstrap, loo=loo, groups=groups, holdout='n_active')
          for name, form in TOKEN_FORMS.items()
          if configurations >= POINTS_PER_PARAMETER * len(form.raw_names) and configurations > len(form.raw_names) + 1}


def missing_points(n: int) -> dict[str, int]:
  """{form: configurations still missing} for the forms `fit_laws` cannot fit on n configurations."""
  return {name: max(POINTS_PER_PARAMETER * len(form.raw_names), len(form.raw_names) + 2) - n
          for name, form in FORMS.items()
          if not (n >= POINTS_PER_PARAMETER * len(form.raw_names) and n > len(form.raw_names) + 1)}


COMPARISON_DRAWS = 2000


def baseline_comparisons(fits: dict[str, Fit], name: str, draws: int = COMPARISON_DRAWS, seed: int = 0,
                         baselines: tuple[str, ...] = BASELINES) -> list[dict]:
  """Form `name` against every baseline fitted beside it, on held-out error: [{'baseline', 'score' ('leave-one-out'
  or 'largest N_total'), 'difference' (the form's RMSE minus the baseline's, nats), 'interval' (95%)}].

  The interval is a bootstrap over configurations: the same resampled configurations score both fits (paired), so
  a form that beats a baseline on a few points by chance gets an interval that covers 0. Points of one
  configuration (`Fit.groups`: its decay-branch budgets) are resampled together.
  """
  fit, out = fits.get(name), []
  if fit is None:
    return out
  rng = np.random.default_rng(seed)
  rmse = lambda e: np.sqrt(np.mean(np.square(e), axis=-1))
  for b in baselines:
    rival = fits.get(b)
    if rival is None or b == name:
      continue
    largest = 'largest ' + {'n_total': 'N_total', 'n_active': 'N_active'}.get(fit.holdout, fit.holdout)
    for score, mine, theirs in (('leave-one-out', fit.loo_errors, rival.loo_errors),
                                (largest, fit.extrapolation_errors, rival.extrapolation_errors)):
      if mine is None or theirs is None or len(mine) != len(theirs):
        continue
      if fit.groups is None:
        idx = rng.integers(0, len(mine), (draws, len(mine)))
        boot = rmse(mine[idx]) - rmse(theirs[idx])
      else:  # whole configurations: per-configuration sums of squares, resampled together
        where = fit.groups if score == 'leave-one-out' else np.unique(fit.groups[fit.outside], return_inverse=True)[1]
        count = np.bincount(where)
        pick = rng.integers(0, len(count), (draws, len(count)))
        pooled = lambda e: np.sqrt(np.bincount(where, np.square(e))[pick].sum(1) / count[pick].sum(1))
        boot = pooled(mine) - pooled(theirs)
      out.append({'baseline': b, 'score': score, 'difference': float(rmse(mine) - rmse(theirs)),
                  'interval': (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))})
  return out


def beats_baselines(fits: dict[str, Fit], name: str, baselines: tuple[str, ...] = BASELINES) -> bool:
  """Whether form `name` predicts held-out configurations better than every baseline fitted beside it: the 95%
  bootstrap interval of its RMSE minus the baseline's lies below 0 on leave-one-out error and, where scored, on
  the largest-N_total configurations (`baseline_comparisons`)."""
  fit = fits.get(name)
  if fit is None or fit.loo_errors is None:
    return False
  rows = baseline_comparisons(fits, name, baselines=baselines)
  if not any(r['score'] == 'leave-one-out' for r in rows):
    return False
  return all(r['interval'][1] < 0 for r in rows)


def residuals_by_k(fits: dict[str, Fit], rows: list[dict]) -> dict[str, dict[int, tuple[float, int]]]:
  """{form: {k: (mean in-sample residual, configurations)}}: prediction - measurement (nats) by top-k, where a
  k-dependent bias shows."""
  ks = sorted({r.get('experts_per_token') or 0 for r in rows})
  out = {}
  for name, f in fits.items():
    if f.residuals is None:
      continue
    out[name] = {}
    for k in ks:
      res = [e for e, r in zip(f.residuals, rows) if (r.get('experts_per_token') or 0) == k]
      if res:
        out[name][k] = (float(np.mean(res)), len(res))
  return out

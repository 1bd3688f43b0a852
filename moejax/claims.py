"""Evaluate the two papers' checkable claims (SCIENCE.md §4) on a results root.

  python -m moejax.claims --root=docs/results/tiny/runs --scale=tiny --out=docs/results/tiny

The library is moejax/studies/ (report.py runs it). Runs are matched to the grids of
experiments/paper_a.py and paper_b.py at --scale by configuration hash (`studies.results.config_hash`), so names and seeds do not matter and a
point shared by two grids is one row. Every point of a grid differs from its neighbours
only in the variables its claim names (experiments/papers.py). For every claim the report
gives the expected direction, the measured difference in held-out loss (nats/token), a 95%
interval, a one-sided p-value and a verdict:

  holds          directional claims: the interval excludes zero on the expected side and
                 every step of the series goes that way; small-effect claims: an
                 equivalence test, the 90% interval lies inside +-T (TOST at 5%);
  contradicted   the interval excludes zero on the other side and every step goes that
                 way (small effects: |difference| minus the 95% half-width exceeds T);
  inconclusive   otherwise, or the runs are missing, or the noise estimate has fewer than
                 MIN_DOF = 6 degrees of freedom.

Noise: a seed sets initialization and data order, so the configurations run at one seed set
are paired: seeds are the blocks of a randomized complete block design. A difference between
two such configurations uses the residual sigma of the additive model loss = configuration +
seed (`block_sigma`, dof = (C-1)(S-1)), in which the seed's shared effect cancels; any other
comparison uses the pooled sample standard deviation of every configuration with two or more
seeds. A difference of seed means over n_a and n_b seeds gets the t interval
+-t(0.975, dof) * sigma * sqrt(1/n_a + 1/n_b).
T = 0.25 |L(s=16) - L(s=4)| from B1: half the mean gain of one doubling of E at this scale.

Also reported: each claim's contrast in each seed alone; which decided verdicts survive a Holm
correction over all decided ones; for trend claims, whether the verdict hinges on one point
(dropping any single point changes it); for undecided claims, how many seeds per point would
decide them at this scale if the effect is as measured; a forest plot of every effect with its
interval and the margin T; every claim again at each decay-branch budget (1/4 and 1/2 of the
run) and whether its effect still shrinks with tokens; the literature's side of each claim; the
effective speedup of each B1 MoE over the dense baseline from the decay-branch curves, with a
95% interval; the best expert size at each active scale (B2 grids) with the interval of the
argmin; the scaling-law fits per grid family beside their baselines, and loss against N_active
and tokens from the decay branches (Chinchilla's form). Outputs: OUT/claims.md, OUT/report.md,
OUT/*.png (forest.png, best_expert.png and one per grid among them).

Power planning before compute (moejax/studies/plan.py):

  python -m moejax.claims --plan --budget=8h --root=docs/results/tiny/runs --scale=tiny [--out=DIR]

reads the runs under --root as a pilot (noise per declared class, recorded wall time per token), each claim's
effect of interest (experiments/papers.py EFFECT_OF_INTEREST) and proposes seeds per point and a run length so that
every claim reaches 80% power within the budget (hours of training wall time on this machine, or FLOPs); claims no
plan within the budget decides are named with what they would need. With --budget but without --plan, the plan is
added to claims.md beside the verdicts. A scale may be planned from another scale's pilot, and the plan written as
an experiment file to run:

  python -m moejax.claims --plan --budget=7h --root=docs/results/tiny/runs --pilot_scale=tiny --scale=tiny2 \
      --emit=experiments/tiny2_plan.py --done_root=docs/results/tiny2/runs
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from moejax.errors import ConfigError
from moejax.studies import report

FLAGS = flags.FLAGS


def check_flags(f) -> None:
  """One ConfigError line for flags that do not go together or cannot be used (`f`: the parsed flags), before
  anything is read or planned."""
  planned = [f'--{name}' for name in ('emit', 'done_root') if getattr(f, name)]
  if planned and not f.plan:
    raise ConfigError(f'{planned[0]} applies to --plan')
  piloted = [f'--{name}' for name in ('pilot_scale', 'pilot_root') if getattr(f, name)]
  if piloted and not f.budget:
    raise ConfigError(f'{piloted[0]} applies to a plan (--budget)')
  if f.pilot_root and f.plan:
    raise ConfigError('--pilot_root applies to the report; with --plan, --root holds the pilot runs')
  if f.pilot_root and not os.path.isdir(f.pilot_root):
    raise ConfigError(f'--pilot_root={f.pilot_root} is not a directory')
  if f.done_root and not f.emit:
    raise ConfigError('--done_root applies to --emit (the runs it leaves out of the emitted sweep)')
  if f.lr_rule and not f.root:
    raise ConfigError('--lr_rule needs --root (the runs of grid LR)')
  if getattr(f, 'calibrate', None):
    if not f.budget:
      raise ConfigError('--calibrate applies to a plan (--budget)')
    if not f.pilot_scale or f.pilot_scale == f.scale:
      raise ConfigError('--calibrate prices runs at a scale the pilot did not run: give --pilot_scale (the pilot\'s '
                        'scale, not --scale)')
    for d in f.calibrate:
      if not os.path.isfile(os.path.join(d, 'result.json')):
        raise ConfigError(f'--calibrate={d}: no result.json there (a finished run directory)')
  if f.lr_rule and (f.plan or f.budget or f.out):
    raise ConfigError(f'--lr_rule prints the rate rule only; it does not take {"--plan" if f.plan else "--budget" if f.budget else "--out"}')
  if f.plan:
    if not f.root or not f.budget:
      raise ConfigError('--plan needs --root (the pilot runs) and --budget (e.g. 8h or 1e15FLOPs)')
    if f.done_root and not os.path.isdir(f.done_root):
      raise ConfigError(f'--done_root={f.done_root} is not a directory')
    parent = os.path.dirname(os.path.abspath(f.emit or '.'))
    if f.emit and not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
      raise ConfigError(f'--emit={f.emit}: the directory {parent} does not exist or is not writable')
    if f.emit and os.path.isdir(f.emit):
      raise ConfigError(f'--emit={f.emit} is a directory; give the experiment file to write (e.g. {f.emit}/plan.py)')


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  check_flags(FLAGS)
  calibrate = report.calibration_runs(FLAGS.calibrate)  # a bad run is one line before anything is read or planned
  if FLAGS.lr_rule:
    sys.stdout.write(report.lr_rule_page(FLAGS.root, FLAGS.scale))
    return
  if FLAGS.plan:
    try:
      sys.stdout.write(report.plan_page(FLAGS.root, FLAGS.scale, FLAGS.budget, FLAGS.out, FLAGS.pilot_scale,
                                        FLAGS.emit, FLAGS.done_root, 'python -m moejax.claims ' + ' '.join(sys.argv[1:]),
                                        calibrate))
    except report.PlanEmitError as e:
      sys.stdout.write(e.page)  # the plan, then the one error line
      raise
    return
  if not FLAGS.root or not FLAGS.out:
    raise app.UsageError('--root and --out are required')
  sys.stdout.write(report.run(FLAGS.root, FLAGS.scale, FLAGS.out, FLAGS.bootstrap, loo=FLAGS.loo, budget=FLAGS.budget,
                              pilot_root=FLAGS.pilot_root, pilot_scale=FLAGS.pilot_scale, calibrate=calibrate))


if __name__ == '__main__':
  from moejax import cli  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('root', None, 'Results root holding the paper-grid runs.')
  flags.DEFINE_string('scale', 'tiny', 'Scale the runs were made at (tiny, tiny2, gpu, paper).')
  flags.DEFINE_string('out', None, 'Directory for claims.md, report.md and the figures.')
  flags.DEFINE_integer('bootstrap', 100, 'Bootstrap resamples for the fit intervals.')
  flags.DEFINE_bool('loo', True, 'Leave-one-out refits of every fit; --noloo skips them (minutes faster while '
                    'developing; then no fit beats its baselines and C-A3 is inconclusive).')
  flags.DEFINE_bool('plan', False, 'Only plan: seeds per point and run length for 80% power on every claim within '
                    '--budget, from the runs under --root as a pilot (OUT/plan.md when --out is given).')
  flags.DEFINE_bool('lr_rule', False, "Only the scale's learning-rate rule, fitted to its grid LR runs under --root "
                    '(what papers.LR_RULE records).')
  flags.DEFINE_string('pilot_scale', None, 'With --budget: the scale the pilot runs (--root with --plan, else '
                      '--pilot_root) were made at, when it is not --scale (e.g. --scale=tiny2 --pilot_scale=tiny): noise '
                      'from the pilot, points and prices from --scale at its own run length.')
  flags.DEFINE_string('pilot_root', None, 'The report with --budget: the pilot runs its plan is made from (default '
                      '--root), with --pilot_scale their scale: the plan the runs followed, beside their verdicts.')
  flags.DEFINE_string('emit', None, "--plan: also write the plan's runs as an experiment file (run it with "
                      'python -m moejax.sweep).')
  flags.DEFINE_string('done_root', None, '--emit: runs already made at --scale (their configuration and seed are '
                      'left out of the emitted sweep).')
  flags.DEFINE_list('calibrate', None, 'With --budget: run directories at --scale made with the machine to itself; '
                    'every price is multiplied by their measured / priced wall time (the pilot\'s speed misses what '
                    'the scale adds, e.g. tiny2\'s held-out scoring every 150 steps).')
  flags.DEFINE_string('budget', None, 'Compute budget of the plan: training wall time on this machine (8h, 90m) or '
                      'training FLOPs (1e15FLOPs). Without --plan, the plan is shown beside the verdicts.')
  cli.cli(_main, interrupted='nothing was written (a report or plan under --out appears whole or not at all)')

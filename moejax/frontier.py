"""Compute-matched frontiers: emit a grid that holds one cost fixed across MoE designs, then analyse it.

  python -m moejax.frontier --match=flops|memory|decode --budgets=x1,x2,x4 [--tolerance=0.02]
      [--experts=1,4,16] [--topk=2,4] [--shared=0,1] [--classes=1,1:3] [--solve=expert_hidden|model_dim]
      [--expert_hidden=64] [--step=1] [--seeds=2] [--dtype=bfloat16] [--decode_batch=1] [--decode_context=N]
      [--flops_per_second=X] [--config=experiments/base.py[:arg]] --emit=experiments/my_frontier.py
  python -m moejax.sweep --config=experiments/my_frontier.py --root=runs/my_frontier
  python -m moejax.frontier --analyze --config=experiments/my_frontier.py --root=runs/my_frontier \\
      [--out=runs/my_frontier/frontier]

The matching, the dropped designs and the emitted file are `moejax.studies.frontier`; the analysis
(the loss-optimal design per budget with intervals, how the optimum moves) is
`moejax.studies.frontier_analysis`; both docstrings have the rules (docs/studies.md §11).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags

from moejax import cli, config as config_lib
from moejax.errors import ConfigError
from moejax.studies import design, frontier, frontier_analysis, render_frontier

FLAGS = flags.FLAGS


def _emit():
  if not FLAGS.emit:
    raise ConfigError('give --emit=FILE (the experiment file to write), or --analyze')
  path, _, arg = (FLAGS.config or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                               'experiments', 'base.py')).partition(':')
  cfg = config_lib.validate(config_lib.load_module(path).get_config(arg or None))
  bpp = design.BYTES_PER_PARAM[FLAGS.dtype]
  spec = frontier.Spec(FLAGS.match, (1.0,), FLAGS.tolerance, FLAGS.solve, FLAGS.step, FLAGS.min_hidden, bpp,
                       FLAGS.decode_batch, FLAGS.decode_context, FLAGS.gates)
  reference = frontier.quantity(cfg, spec)
  spec = dataclasses.replace(spec, budgets=frontier.parse_budgets(FLAGS.budgets, FLAGS.match, reference, bpp))
  hidden = design.parse_grid(FLAGS.expert_hidden, name='--expert_hidden grid') if FLAGS.expert_hidden else [None]
  if FLAGS.expert_hidden and FLAGS.solve != 'model_dim':
    raise ConfigError('--expert_hidden is an axis only with --solve=model_dim (else the expert size is solved)')
  designs = frontier.designs_from_axes(design.parse_grid(FLAGS.experts, name='--experts grid'),
                                       design.parse_grid(FLAGS.topk, name='--topk grid'),
                                       design.parse_grid(FLAGS.shared, minimum=0, name='--shared grid'),
                                       frontier.parse_ratios(FLAGS.classes), hidden)
  result = frontier.build(cfg, designs, spec)
  print(render_frontier.frontier_grid(result, reference))
  command = 'python -m moejax.frontier ' + ' '.join(sys.argv[1:])
  tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
  points = frontier.emit(FLAGS.emit, result, FLAGS.seeds, path, arg or None, command, tokens, FLAGS.flops_per_second)
  print(f'wrote {FLAGS.emit}: {len(points)} points ({len(result.designs)} designs x {len(spec.budgets)} budgets x '
        f'{FLAGS.seeds} seeds); ' + '; '.join(frontier.cost_lines(result, FLAGS.seeds, tokens, FLAGS.flops_per_second)))


def _main(argv):
  if len(argv) > 1:
    raise ConfigError(f'unexpected arguments: {" ".join(argv[1:])} (flags take the form --name=value)')
  emitting = [f'--{n}' for n in ('emit', 'budgets', 'experts', 'topk', 'shared', 'classes', 'seeds')
              if FLAGS[n].present]
  if FLAGS.analyze and emitting:
    raise ConfigError(f'{emitting[0]} applies to emitting a frontier, not to --analyze')
  analysing = [f'--{n}' for n in ('root', 'out') if FLAGS[n].present]
  if not FLAGS.analyze and analysing:
    raise ConfigError(f'{analysing[0]} applies to --analyze')
  if not FLAGS.analyze:
    _emit()
    return
  if not FLAGS.config or not FLAGS.root:
    raise ConfigError('--analyze needs --config (the emitted frontier file) and --root (its runs)')
  out = FLAGS.out or os.path.join(FLAGS.root, 'frontier')
  report = frontier_analysis.write(FLAGS.config, FLAGS.root, out)
  print(f'wrote {report} and {os.path.join(out, frontier_analysis.FIGURE)}', file=sys.stderr)


if __name__ == '__main__':
  flags.DEFINE_bool('analyze', False, 'Analyse finished runs of an emitted frontier instead of emitting one.')
  flags.DEFINE_string('config', None, 'Emitting: the base experiment file[:arg] (default experiments/base.py). '
                      'Analysing: the emitted frontier file.')
  flags.DEFINE_string('root', None, 'Analysing: the sweep root holding the runs.')
  flags.DEFINE_string('out', None, 'Analysing: where report.md, frontier.json and the figure go (default ROOT/frontier).')
  flags.DEFINE_enum('match', 'flops', list(frontier.MATCHES), 'The cost held fixed: training FLOPs per token, '
                    'parameter bytes, or bytes per decode step.')
  flags.DEFINE_string('budgets', 'x1,x2,x4', 'Budgets: multiples of the base config\'s own cost (x2) or amounts '
                      '(2e7; 4MB for memory and decode; a plain memory number is parameters).')
  flags.DEFINE_float('tolerance', 0.02, 'Largest relative miss of the budget a matched design may have.')
  flags.DEFINE_enum('solve', 'expert_hidden', list(frontier.SOLVES), 'The free dimension solved per design.')
  flags.DEFINE_integer('step', 1, 'The solved dimension moves in multiples of this (times head_dim x group for '
                       'model_dim).')
  flags.DEFINE_integer('min_hidden', 8, 'Smallest expert (or dense FFN) hidden size when solving expert_hidden.')
  flags.DEFINE_string('experts', '1,4,16', 'Routed-expert axis (1 = dense).')
  flags.DEFINE_string('topk', '2', 'Top-k axis (k <= E).')
  flags.DEFINE_string('shared', '0', 'Shared-expert axis (each as wide as the solved expert size).')
  flags.DEFINE_string('classes', '1', 'Size-class axis: 1 = uniform; 1:3 = E/2 experts of a and E/2 of 3a.')
  flags.DEFINE_string('expert_hidden', None, 'Expert-size axis when --solve=model_dim (default: the config\'s).')
  flags.DEFINE_enum('gates', 'scaled', ['scaled', 'config'], 'scaled: renormalized gates times k (SCIENCE.md §4); '
                    'config: the base config\'s gates.')
  flags.DEFINE_integer('seeds', 2, 'Seeds per point (seed i sets initialization and data order).')
  flags.DEFINE_enum('dtype', 'bfloat16', list(design.BYTES_PER_PARAM), 'Bytes per parameter for memory and decode.')
  flags.DEFINE_integer('decode_batch', 1, 'Sequences per decode step for --match=decode.')
  flags.DEFINE_integer('decode_context', None, 'KV positions per sequence for --match=decode (default seq_len).')
  flags.DEFINE_float('flops_per_second', None, 'A measured training throughput: the emitted file states the '
                     'expected wall time at it.')
  flags.DEFINE_string('emit', None, 'The experiment file to write.')
  cli.require_positive(('step', 'min_hidden', 'seeds', 'decode_batch', 'decode_context'),
                       ('flops_per_second',))
  cli.cli(_main, interrupted='nothing was written (--emit, and the analysis under --out, are written whole or not at '
          'all)')

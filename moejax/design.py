"""The best MoE for a memory and an inference budget (SCIENCE.md §5, paper A's principle).

  python -m moejax.design --memory=2GB --active=2e8 [--flops_per_token=1e9] [--dtype=bfloat16]
      [--memory_for=weights|inference|training] [--decode_bytes=300MB | --decode_ms=0.1 --bandwidth=3.35TB]
      [--decode_batch=8] [--decode_context=N] [--tiebreak=n_exp_asc|granularity] [--top=20]
      [--config=experiments/base.py] [--emit=experiments/my_design.py]

The search, the ranking and --emit are `moejax.studies.design` (its docstring has the rules);
this module reads the flags and prints the ranked table (`moejax.studies.render.design_table`).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from moejax import cli, config as config_lib
from moejax.model import accounting
from moejax.cli import parse_amount
from moejax.errors import ConfigError
from moejax.studies import design, render

FLAGS = flags.FLAGS


def _main(argv):
  if len(argv) > 1:
    raise ConfigError(f'unexpected arguments: {" ".join(argv[1:])} (flags take the form --name=value)')
  path = FLAGS.config or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      'experiments', 'base.py')
  cfg = config_lib.validate(config_lib.load_module(path).get_config(None))
  bpp = design.BYTES_PER_PARAM[FLAGS.dtype]
  if FLAGS.top < 1:
    raise ConfigError(f'--top={FLAGS.top} must be >= 1')
  memory = design.bytes_budget(FLAGS.memory, bpp)
  active = design.params_budget(FLAGS.active, bpp)
  flops = None
  if FLAGS.flops_per_token:
    flops, is_bytes = parse_amount(FLAGS.flops_per_token)
    if is_bytes:
      raise ConfigError(f'--flops_per_token={FLAGS.flops_per_token} is a FLOP count; give a plain number, e.g. 8e8')
  extra = {}
  for name in ('layers', 'widths', 'experts'):
    if getattr(FLAGS, name):
      extra[name] = design.parse_grid(getattr(FLAGS, name), name=f'--{name} grid')
  if FLAGS.granularities:
    extra['granularities'] = design.parse_grid(FLAGS.granularities, float, 0, '--granularities grid', strict=True)
  if FLAGS.seq_len:
    extra['seq_len'] = FLAGS.seq_len
  aspect = design.parse_grid(FLAGS.aspect_range, float, 0, '--aspect_range', strict=True)
  if len(aspect) != 2:
    raise ConfigError(f'--aspect_range={FLAGS.aspect_range} needs two different numbers, low,high (e.g. 16,512)')
  lo, hi = aspect
  space = design.space_from_config(cfg, head_dim=FLAGS.head_dim, kv_group=FLAGS.kv_group, max_topk=FLAGS.max_topk,
                            shared=design.parse_grid(FLAGS.shared, minimum=0, name='--shared grid'), aspect_range=(lo, hi),
                            **extra)
  if FLAGS.bandwidth and FLAGS.decode_ms is None:
    raise ConfigError('--bandwidth applies to --decode_ms (the decode budget in ms per step at that bandwidth)')
  decode = parse_amount(FLAGS.decode_bytes, 'bytes')[0] if FLAGS.decode_bytes else None
  if FLAGS.decode_ms is not None:
    if decode is not None or not FLAGS.bandwidth:
      raise ConfigError('--decode_ms needs --bandwidth (bytes/s, e.g. 3.35TB for an H100) and excludes --decode_bytes')
    bandwidth, is_bytes = parse_amount(FLAGS.bandwidth, 'bandwidth')
    if not is_bytes:
      raise ConfigError(f'--bandwidth={FLAGS.bandwidth} needs a byte unit per second, e.g. 3.35TB or 80GB/s')
    decode = FLAGS.decode_ms / 1e3 * bandwidth
  budget = design.Budget(memory, active, flops, bpp, FLAGS.memory_for, FLAGS.kv_batch, decode, FLAGS.decode_batch,
                  FLAGS.decode_context)
  result = design.search(space, budget, FLAGS.tiebreak, FLAGS.target_granularity, FLAGS.aspect)
  n = len(result.designs['n_total'])
  print(f'{n:,} of {result.considered:,} grid designs fit (memory {"-" if memory is None else render.human_bytes(memory)} '
        f'for {FLAGS.memory_for} at {FLAGS.dtype}, active {"-" if active is None else accounting.human(active)}, '
        f'forward FLOPs/token {"-" if flops is None else f"{flops:.3g}"}, decode '
        f'{"-" if decode is None else render.human_bytes(decode)}/step at batch {FLAGS.decode_batch}); ranked by N_total '
        f'(3% buckets), then s, then {FLAGS.tiebreak}:\n')
  print(render.design_table(result, FLAGS.top))
  if FLAGS.emit:
    command = 'python -m moejax.design ' + ' '.join(a for a in sys.argv[1:])
    points = design.emit(FLAGS.emit, result, FLAGS.top, path, command, FLAGS.head_dim)
    print(f'wrote {FLAGS.emit}: a sweep over the top {len(points)} designs')


if __name__ == '__main__':
  flags.DEFINE_string('config', None, 'Experiment file whose vocab, tying, QK-norm and seq_len the designs use '
                      '(default experiments/base.py); also the base of --emit.')
  flags.DEFINE_string('memory', None, 'Memory budget: parameters (1.5e9) or bytes (2GB, 3GiB).')
  flags.DEFINE_string('active', None, 'Budget of active parameters per token (embeddings included): parameters '
                      '(2e8) or bytes (400MB), converted with --dtype as for --memory.')
  flags.DEFINE_string('flops_per_token', None, 'Budget of forward FLOPs per token at --seq_len.')
  flags.DEFINE_enum('dtype', 'bfloat16', list(design.BYTES_PER_PARAM), 'Parameter dtype for byte budgets.')
  flags.DEFINE_enum('memory_for', 'weights', ['weights', 'inference', 'training'], 'What the memory budget holds.')
  flags.DEFINE_integer('kv_batch', 1, 'Sequences in the KV cache for --memory_for=inference.')
  flags.DEFINE_string('decode_bytes', None, 'Decode budget: bytes one decode step may read (e.g. 2GB).')
  flags.DEFINE_float('decode_ms', None, 'Decode budget: predicted ms per decode step at --bandwidth.')
  flags.DEFINE_string('bandwidth', None, 'Memory bandwidth in bytes/s for --decode_ms, e.g. 3.35TB or 3.35TB/s '
                      '(H100 HBM3).')
  flags.DEFINE_integer('decode_batch', 1, 'Sequences per decode step for the decode budget.')
  flags.DEFINE_integer('decode_context', None, 'KV-cache positions per sequence for the decode budget (default '
                       '--seq_len).')
  flags.DEFINE_integer('seq_len', None, 'Context for FLOPs and the KV cache (default: the config data.seq_len).')
  flags.DEFINE_enum('tiebreak', 'n_exp_asc', list(design.TIEBREAKS), 'Third ranking key.')
  flags.DEFINE_float('target_granularity', 2.0, 'G = d/d_exp preferred by --tiebreak=granularity (2 = G_K 8).')
  flags.DEFINE_float('aspect', 64.0, 'Reference d/L for the last ranking key.')
  flags.DEFINE_string('aspect_range', '16,512', 'Allowed d/L range.')
  flags.DEFINE_string('layers', None, 'Depth grid, e.g. 2,4,8 or 2:24:2.')
  flags.DEFINE_string('widths', None, 'Width grid, e.g. 256:2048:64.')
  flags.DEFINE_string('granularities', None, 'G = d/d_exp grid, e.g. 0.25,0.5,1,2,4,8.')
  flags.DEFINE_string('experts', None, 'Routed-expert grid (1 = dense), e.g. 1,8,64.')
  flags.DEFINE_string('shared', '0,1', 'Shared-expert counts to try.')
  flags.DEFINE_integer('head_dim', 64, 'Per-head width; heads = d / head_dim.')
  flags.DEFINE_integer('kv_group', 1, 'Query heads per KV head (1 = MHA).')
  flags.DEFINE_integer('max_topk', 16, 'Largest top-k.')
  flags.DEFINE_integer('top', 20, 'Rows to print and designs to --emit.')
  flags.DEFINE_string('emit', None, 'Write an experiment file whose sweep trains the top designs.')
  cli.require_positive(('kv_batch', 'decode_batch', 'decode_context', 'seq_len', 'head_dim', 'kv_group', 'max_topk',
                        'top'), ('decode_ms', 'target_granularity', 'aspect'))
  cli.cli(_main, interrupted='nothing was written (--emit is written whole or not at all)')

"""Gather every result.json under a root into one table, seeds grouped.

  python -m moejax.results --root=DIR|gs://bucket/dir [--format=md|csv|json] [--out=FILE]

One row per configuration: runs whose resolved configs differ only in `name`, `seed` and
`data.seed` are seeds of one configuration, reported as mean, standard deviation (ddof=1)
and count of the held-out loss. Columns: the configuration hash, every config field that
varies across the gathered runs, the accounting numbers (N_total, N_active, s,
granularity, experts, top-k, expert size, shared experts), the load-balancing and drop
settings, training tokens, held-out loss and bits per byte, and held-out routing
diagnostics averaged over MoE layers. Points a sweep recorded as failed (`failed.json`)
are listed separately; a result.json that cannot be read or lacks a field is reported
and skipped, never counted.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import statistics
import sys
from typing import Any

from absl import app, flags
from etils import epath

from moejax import files
from moejax import config as config_lib
from moejax.model import accounting
from moejax.errors import ConfigError, DataError, MoejaxError

FLAGS = flags.FLAGS

SEED_FIELDS = ('name', 'seed', 'data.seed')
# How a run was launched (joining a multi-process runtime) never changes what it computes.
LAUNCH_PREFIXES = ('distributed.',)


def _identity_key(key: str) -> bool:
  return key not in SEED_FIELDS and not key.startswith(LAUNCH_PREFIXES)
REQUIRED = (('name',), ('config',), ('accounting', 'n_total'), ('accounting', 'n_active'), ('eval', 'loss'),
            ('eval', 'bits_per_byte'))
# Config keys that have their own columns, so they are not repeated as "varied".
SHOWN_CONFIG_KEYS = ('moe.num_experts', 'moe.experts_per_token', 'moe.expert_hidden', 'moe.num_shared_experts',
                     'moe.load_balancing', 'moe.train_capacity_factor', 'moe.eval_capacity_factor',
                     'moe.drop_policy', 'moe.expert_parallel_capacity_factor')


@dataclasses.dataclass
class Gathered:
  """What a root holds: readable records, failed points and unreadable files (path, reason)."""
  records: list[dict]
  failed: list[dict]
  unreadable: list[tuple[str, str]]


def _check(record: Any) -> str | None:
  if not isinstance(record, dict):
    return 'not a JSON object'
  for path in REQUIRED:
    node = record
    for key in path:
      if not isinstance(node, dict) or key not in node:
        return f'missing {".".join(path)}'
      node = node[key]
  loss = record['eval']['loss']
  if not isinstance(loss, (int, float)) or not math.isfinite(loss):
    return f'eval.loss is {loss!r}'
  return None


_SKIP_DIRS = ('checkpoints', 'tensorboard')


def _find(base: epath.Path, names: tuple[str, ...], max_depth: int = 8) -> dict[str, list[epath.Path]]:
  """Files called `names` under `base`, depth-first, not descending into checkpoint folders.

  (epath refuses `**` globs on GCS; listing level by level also skips the many checkpoint files.)
  """
  found: dict[str, list[epath.Path]] = {n: [] for n in names}
  stack = [(base, 0)]
  while stack:
    folder, depth = stack.pop()
    for child in sorted(folder.iterdir()):
      if child.name in found and not child.is_dir():
        found[child.name].append(child)
      elif depth < max_depth and child.name not in _SKIP_DIRS and child.is_dir():
        stack.append((child, depth + 1))
  return {n: sorted(paths) for n, paths in found.items()}


def gather(root: str) -> Gathered:
  """Reads every ROOT/**/result.json (and failed.json) through etils.epath (local or gs://)."""
  base = epath.Path(root)
  if not base.exists():
    raise DataError(f'results root {root} does not exist')
  records, failed, unreadable = [], [], []
  found = _find(base, ('result.json', 'failed.json'))
  for path in found['result.json']:
    try:
      record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      unreadable.append((str(path), f'unreadable: {e}'))
      continue
    problem = _check(record)
    if problem:
      unreadable.append((str(path), f'incomplete: {problem}'))
      continue
    record['_path'] = str(path)
    records.append(record)
  done = {epath.Path(r['_path']).parent for r in records}
  for path in found['failed.json']:
    if path.parent in done:
      continue
    try:
      failed.append(dict(json.loads(path.read_text()), _path=str(path)))
    except (OSError, ValueError) as e:
      unreadable.append((str(path), f'unreadable: {e}'))
  return Gathered(records, failed, unreadable)


def raw_config_hash(flat_config: dict) -> str:
  """A short hash of a flattened config without its seed and launch (`distributed.*`) fields, exactly as given."""
  kept = {k: v for k, v in flat_config.items() if _identity_key(k)}
  return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=1)
def _base_config():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return config_lib.load_module(os.path.join(root, 'experiments', 'base.py')).get_config()


def config_hash(flat_config: dict) -> str:
  """A short hash of a flattened config without its seed fields: equal for seeds of one configuration.

  The config is first rebuilt on the current experiments/base.py, so a key added to moejax after
  a run was recorded (absent from its record, at its default now) does not change the hash. A
  record with a key that no longer exists keeps its raw hash.
  """
  try:
    rebuilt = config_lib.apply_overrides(_base_config(), flat_config)
  except (ConfigError, KeyError, TypeError, ValueError, AttributeError):
    return raw_config_hash(flat_config)
  if rebuilt.model.vocab_size is None:  # an unvalidated grid point: the vocabulary its run records
    try:
      rebuilt.model.vocab_size = config_lib.vocab_size(rebuilt)
    except MoejaxError:
      pass
  return raw_config_hash(config_lib.flatten(json.loads(rebuilt.to_json_best_effort())))


def varied_fields(flat_configs: list[dict]) -> list[str]:
  """Config keys (seed fields excluded) whose values differ across the runs, sorted."""
  keys = sorted(set().union(*flat_configs)) if flat_configs else []
  return [k for k in keys if _identity_key(k) and
          len({json.dumps(c.get(k), default=str) for c in flat_configs}) > 1]


def drop_settings(flat: dict) -> tuple[str, str]:
  """(train, eval) labels of what can drop tokens: 'dropless', or e.g. 'CF 1.25 (probs) + EP CF 1'.

  Training drops with `moe.train_capacity_factor`, evaluation with `moe.eval_capacity_factor`
  (both keeping tokens by `moe.drop_policy`), and both with the expert-parallel buffer
  `moe.expert_parallel_capacity_factor` when the expert mesh axis is larger than 1.
  """
  policy = flat.get('moe.drop_policy', 'position')
  ep_cf = flat.get('moe.expert_parallel_capacity_factor')
  ep = ep_cf is not None and flat.get('mesh.expert', 1) not in (0, 1)  # (-1: every device)

  def label(cf):
    parts = ([f'CF {cf:g} ({policy})'] if cf is not None else []) + ([f'EP CF {ep_cf:g}'] if ep else [])
    return ' + '.join(parts) or 'dropless'

  return label(flat.get('moe.train_capacity_factor')), label(flat.get('moe.eval_capacity_factor'))


def _layer_mean(record: dict, key: str) -> float | None:
  layers = (record.get('routing') or {}).get('layers') or []
  values = [layer[key] for layer in layers if key in layer]
  return statistics.fmean(values) if values else None


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def seed_key(config: dict) -> str:
  """'seed/data.seed' of a run's (nested) config: the block a run belongs to in a paired design."""
  return f'{config.get("seed", 0)}/{(config.get("data") or {}).get("seed", 0)}'


def mean_curve(curves: list[list[dict]]) -> list[dict]:
  """[{'step', 'tokens', 'loss', 'std', 'n'}]: the seeds' decay curves averaged at the steps every seed has."""
  by_step: dict[int, list[dict]] = {}
  for curve in curves:
    for p in curve:
      if p.get('loss') is not None:  # (a diverged decay branch has none)
        by_step.setdefault(p['step'], []).append(p)
  out = []
  for step in sorted(by_step):
    points = by_step[step]
    if len(points) == len(curves):
      mean, std = _mean_std([p['loss'] for p in points])
      out.append({'step': step, 'tokens': points[0].get('tokens'), 'loss': mean, 'std': std, 'n': len(points)})
  return out


def table(records: list[dict]) -> tuple[list[dict], list[str]]:
  """One row per configuration (seeds grouped) and the list of varied config fields."""
  flats = [config_lib.flatten(r['config']) for r in records]
  varied = [k for k in varied_fields(flats) if k not in SHOWN_CONFIG_KEYS]
  groups: dict[str, list[int]] = {}
  for i, flat in enumerate(flats):
    groups.setdefault(config_hash(flat), []).append(i)
  rows = []
  for digest, members in groups.items():
    first, flat = records[members[0]], flats[members[0]]
    acc = first['accounting']
    runs = [records[i] for i in members]
    loss_mean, loss_std = _mean_std([r['eval']['loss'] for r in runs])
    train_drop, eval_drop = drop_settings(flat) if acc.get('num_experts') else ('-', '-')
    row = {'config_hash': digest, 'name': first['name'], **{k: flat.get(k) for k in varied},
           'n_total': acc['n_total'], 'n_active': acc['n_active'], 'n_total_nonembed': acc.get('n_total_nonembed'),
           'n_active_nonembed': acc.get('n_active_nonembed'), 'sparsity': acc.get('sparsity'),
           'granularity': acc.get('granularity'), 'num_experts': acc.get('num_experts'),
           'experts_per_token': acc.get('experts_per_token'), 'expert_hidden': acc.get('expert_hidden'),
           'num_shared_experts': acc.get('num_shared_experts'),
           'load_balancing': flat.get('moe.load_balancing') if acc.get('num_experts') else '-',
           'drop_policy': train_drop, 'eval_drop_policy': eval_drop,
           'tokens': (first.get('train') or {}).get('tokens'),
           'loss_mean': loss_mean, 'loss_std': loss_std, 'seeds': len(runs),
           'bits_per_byte_mean': _mean_std([r['eval']['bits_per_byte'] for r in runs])[0],
           'load_max_over_mean': _mean_std([_layer_mean(r, 'load_max_over_mean') for r in runs])[0],
           'dead_experts': _mean_std([_layer_mean(r, 'dead_experts') for r in runs])[0],
           'drop_fraction': _mean_std([_layer_mean(r, 'drop_fraction') for r in runs])[0],
           'n_active_measured': _mean_std([(r.get('routing') or {}).get('n_active_measured') for r in runs])[0],
           # training-time routing (result.json train.routing: last 10% of steps), mean over MoE layers
           **{f'train_{k}': _mean_std([_layer_mean(r.get('train') or {}, k) for r in runs])[0] for k in TRAIN_ROUTING},
           'train_capacity_factor': flat.get('moe.train_capacity_factor'),
           'peak_learning_rate': flat.get('optim.peak_learning_rate'),
           'flops_per_token': acc.get('flops_per_token'),
           'wall_s': sum((r.get('train') or {}).get('wall_s') or 0.0 for r in runs),
           'decay_curve': mean_curve([r.get('decay_curve') or [] for r in runs]),
           'seed_losses': {seed_key(r['config']): r['eval']['loss'] for r in runs},
           'losses': [r['eval']['loss'] for r in runs], 'paths': [r['_path'] for r in runs]}
    if not acc.get('num_experts'):  # dense: no expert columns
      row.update(granularity=None, experts_per_token=None, expert_hidden=None, num_shared_experts=None)
    rows.append(row)
  rows.sort(key=lambda r: (r['n_active'], r['n_total'], r['loss_mean']))
  return rows, varied


def _fmt(value: Any, key: str) -> str:
  if value is None:
    return '-'
  if key in ('n_total', 'n_active', 'n_total_nonembed', 'n_active_nonembed', 'n_active_measured', 'tokens'):
    return accounting.human(value)
  if key in ('loss_mean', 'loss_std', 'bits_per_byte_mean'):
    return f'{value:.4f}'
  if isinstance(value, float):
    return f'{value:.3g}'
  return str(value)


MD_COLUMNS = (('config_hash', 'hash'), ('name', 'name'), ('n_total', 'N_total'), ('n_active', 'N_active'),
              ('sparsity', 's'), ('granularity', 'G'), ('num_experts', 'E'), ('experts_per_token', 'k'),
              ('expert_hidden', 'd_exp'), ('num_shared_experts', 'shared'), ('load_balancing', 'LB'),
              ('drop_policy', 'drop'), ('eval_drop_policy', 'eval drop'), ('tokens', 'tokens'), ('loss_mean', 'loss'), ('loss_std', '± std'),
              ('seeds', 'n'), ('bits_per_byte_mean', 'bits/byte'), ('load_max_over_mean', 'max/mean load'),
              ('dead_experts', 'dead'), ('drop_fraction', 'dropped'))
TRAIN_ROUTING = ('drop_fraction', 'ep_drop_fraction', 'load_max_over_mean', 'dead_experts', 'router_entropy')
TRAIN_COLUMNS = (('train_drop_fraction', 'train dropped'), ('train_load_max_over_mean', 'train max/mean'))


def markdown(rows: list[dict], varied: list[str], gathered: Gathered | None = None) -> str:
  """The table (and failed/unreadable lists) as Markdown."""
  cols = list(MD_COLUMNS[:2]) + [(k, k) for k in varied] + list(MD_COLUMNS[2:])
  cols += [c for c in TRAIN_COLUMNS if any(r.get(c[0]) is not None for r in rows)]  # (runs before issue 31 lack them)
  lines = ['| ' + ' | '.join(title for _, title in cols) + ' |',
           '|' + '|'.join('---' if k in ('config_hash', 'name') or k in varied else '---:' for k, _ in cols) + '|']
  for r in rows:
    lines.append('| ' + ' | '.join(_fmt(r.get(k), k) for k, _ in cols) + ' |')
  out = '\n'.join(lines) + '\n'
  out += ('\nLoss: held-out nats/token, mean over n seeds (± sample std). s = E/k; G = d_model*E/sum(d_exp) '
          '(d/d_exp for equal experts). Routing columns: held-out pass, mean over MoE layers (train ones: the last 10% of training steps).\n')
  if gathered and gathered.failed:
    out += '\n**Failed points**\n\n' + ''.join(f'- {f.get("name", "?")}: {f.get("error", "?")}\n'
                                               for f in gathered.failed)
  if gathered and gathered.unreadable:
    out += '\n**Skipped files**\n\n' + ''.join(f'- {p}: {why}\n' for p, why in gathered.unreadable)
  return out


def _csv_value(key: str, value: Any) -> Any:
  if key == 'decay_curve':  # tokens:mean loss per point
    return ';'.join(f'{p["tokens"]}:{p["loss"]:.6f}' for p in value)
  return ';'.join(map(str, value)) if isinstance(value, list) else value


def csv_text(rows: list[dict], varied: list[str]) -> str:
  """The table as CSV with full-precision numbers (seed losses joined by ';')."""
  fields = ['config_hash', 'name', *varied] + [k for k in rows[0] if k not in ('config_hash', 'name', *varied)] \
      if rows else []
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=fields)
  writer.writeheader()
  for r in rows:
    writer.writerow({k: _csv_value(k, v) for k, v in r.items()})
  return out.getvalue()


def json_text(rows: list[dict], varied: list[str], gathered: Gathered) -> str:
  """Everything as one JSON document."""
  return json.dumps({'rows': rows, 'varied': varied,
                     'failed': [{k: v for k, v in f.items()} for f in gathered.failed],
                     'unreadable': [{'path': p, 'reason': why} for p, why in gathered.unreadable]},
                    indent=2, default=str) + '\n'


def formatted(rows: list[dict], varied: list[str], gathered: Gathered, fmt: str = 'md') -> str:
  """The table in `fmt` ('md', 'csv' or 'json')."""
  if fmt == 'csv':
    return csv_text(rows, varied)
  if fmt == 'json':
    return json_text(rows, varied, gathered)
  return markdown(rows, varied, gathered)


def render(root: str, fmt: str = 'md') -> tuple[str, Gathered]:
  """(the table of ROOT in `fmt`, what was gathered)."""
  gathered = gather(root)
  return formatted(*table(gathered.records), gathered, fmt), gathered


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.root:
    raise app.UsageError('--root is required')
  gathered = gather(FLAGS.root)
  rows, varied = table(gathered.records)
  text = formatted(rows, varied, gathered, FLAGS.format)
  if FLAGS.out:
    from moejax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
    files.atomic_write(FLAGS.out, text)
  else:
    sys.stdout.write(text)
  for path, why in gathered.unreadable:
    print(f'moejax: warning: skipped {path} ({why})', file=sys.stderr)
  if not gathered.records:
    print(f'moejax: warning: no complete result.json under {FLAGS.root}', file=sys.stderr)
  print(f'{len(gathered.records)} runs in {len(rows)} configurations, '
        f'{len(gathered.failed)} failed, {len(gathered.unreadable)} skipped', file=sys.stderr)


if __name__ == '__main__':
  from moejax import cli  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('root', None, 'Directory (or gs:// prefix) holding result.json files, at any depth.')
  flags.DEFINE_enum('format', 'md', ['md', 'csv', 'json'], 'Output format.')
  flags.DEFINE_string('out', None, 'Write the table here (atomically) instead of stdout.')
  cli.cli(_main)

"""Gather every result.json under a root into one table, seeds grouped (`python -m moejax.results`).

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
import io
import json
import math
import statistics
import sys

from typing import Any

from etils import epath

from moejax import base_config, config as config_lib
from moejax.studies import render as render_lib
from moejax.errors import ConfigError, DataError, MoejaxError

# Results that differ only in these keys are seeds of one configuration (config.SEED_KEYS) or
# launches of one (config.LAUNCH_KEYS: joining a multi-process runtime or tracking a run with W&B never
# changes what it computes).
NOT_IDENTITY = config_lib.SEED_KEYS + config_lib.LAUNCH_KEYS


TRAIN_ROUTING = ('drop_fraction', 'ep_drop_fraction', 'load_max_over_mean', 'dead_experts', 'router_entropy')


def _identity_key(key: str) -> bool:
  return not config_lib.key_in(key, NOT_IDENTITY)
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


def _mtime(path: epath.Path) -> float:
  try:
    return float(path.stat().mtime)
  except (OSError, AttributeError, ValueError):
    return 0.0


def split_reproductions(runs: list[dict]) -> tuple[list[dict], list[dict]]:
  """(one run per seed actually used, the other runs): runs of one configuration with the same 'seed/data.seed'
  (`seed_key`) are the same seed re-run (e.g. by `moejax.reproduce`), never a new seed. The earliest-written
  record of a seed (then the first path) is the seed's run; the rest are its reproductions."""
  first: dict[str, dict] = {}
  again = []
  for r in sorted(runs, key=lambda r: (r.get('_written') or 0.0, r.get('_path') or '')):
    key = seed_key(r['config'])
    if key in first:
      again.append(r)
    else:
      first[key] = r
  return sorted(first.values(), key=lambda r: r.get('_path') or ''), again


def warn_unreadable(gathered: Gathered) -> None:
  """One `moejax: warning:` line on stderr per result file that could not be read (and is left out)."""
  for path, why in gathered.unreadable:
    print(f'moejax: warning: skipped {path} ({why})', file=sys.stderr)


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
    record['_written'] = _mtime(path)
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
  return config_lib.config_hash(flat_config, NOT_IDENTITY, digits=8)


@functools.lru_cache(maxsize=1)
def _base_config():
  return base_config.get_config()


def config_hash(flat_config: dict) -> str:
  """A short hash of a flattened config without its seed fields: equal for seeds of one configuration.

  The config is first rebuilt on the current `moejax.base_config`, so a key added to moejax after
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
    runs, repeats = split_reproductions([records[i] for i in members])
    seed_loss = {seed_key(r['config']): r['eval']['loss'] for r in runs}
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
           # training-time routing (result.json train.routing: the last 10% of steps), mean over MoE layers; in the
           # CSV and JSON tables (the Markdown table keeps its columns)
           **{f'train_{k}': _mean_std([_layer_mean(r.get('train') or {}, k) for r in runs])[0] for k in TRAIN_ROUTING},
           'train_capacity_factor': flat.get('moe.train_capacity_factor'),
           'peak_learning_rate': flat.get('optim.peak_learning_rate'),
           'flops_per_token': acc.get('flops_per_token'),
           'wall_s': sum((r.get('train') or {}).get('wall_s') or 0.0 for r in runs),
           'decay_curve': mean_curve([r.get('decay_curve') or [] for r in runs]),
           'seed_curves': {seed_key(r['config']): [{k: p.get(k) for k in ('step', 'tokens', 'loss')}
                                                   for p in r.get('decay_curve') or []] for r in runs},
           'seed_losses': {seed_key(r['config']): r['eval']['loss'] for r in runs},
           'losses': [r['eval']['loss'] for r in runs], 'paths': [r['_path'] for r in runs],
           'reproductions': [{'path': r['_path'], 'seed': seed_key(r['config']), 'loss': r['eval']['loss'],
                              'difference': r['eval']['loss'] - seed_loss[seed_key(r['config'])]} for r in repeats]}
    if not acc.get('num_experts'):  # dense: no expert columns
      row.update(granularity=None, experts_per_token=None, expert_hidden=None, num_shared_experts=None)
    rows.append(row)
  rows.sort(key=lambda r: (r['n_active'], r['n_total'], r['loss_mean']))
  return rows, varied


def _csv_value(key: str, value: Any) -> Any:
  if key == 'decay_curve':  # tokens:mean loss per point
    return ';'.join(f'{p["tokens"]}:{p["loss"]:.6f}' for p in value)
  if key == 'reproductions':  # seed:loss per re-run
    return ';'.join(f'{x["seed"]}:{x["loss"]!r}' for x in value)
  return ';'.join(map(str, value)) if isinstance(value, list) else value


def csv_text(rows: list[dict], varied: list[str]) -> str:
  """The table as CSV with full-precision numbers (seed losses joined by ';')."""
  fields = ['config_hash', 'name', *varied] + [k for k in rows[0] if k not in ('config_hash', 'name', *varied)] \
      if rows else []
  # seed_curves stay in the JSON (the CSV has their mean, decay_curve); reproductions only when there is one
  dropped = {'seed_curves'} | (set() if any(r.get('reproductions') for r in rows) else {'reproductions'})
  fields = [k for k in fields if k not in dropped]
  rows = [{k: v for k, v in r.items() if k not in dropped} for r in rows]
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
  return render_lib.results_markdown(rows, varied, gathered)


def render(root: str, fmt: str = 'md') -> tuple[str, Gathered]:
  """(the table of ROOT in `fmt`, what was gathered)."""
  gathered = gather(root)
  return formatted(*table(gathered.records), gathered, fmt), gathered

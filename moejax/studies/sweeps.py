"""Run, list or emit every point of an experiment file's `get_sweep()`.

  python -m moejax.sweep --config=experiments/X.py[:arg] --root=DIR [--config.a.b=v ...]
      [--dry_run] [--point=I] [--emit=slurm|tpu]

Each point is the experiment's `get_config(arg)` plus the point's dotted overrides (and
any `--config.*` flags, applied to every point). Every point's overrides are applied and
validated before anything runs. Point i runs in ROOT/<name>, where <name> is the point's
`name` override or its shortened overrides plus a hash. Points run one after another in
this process; runs that differ only in seeds (or anything else outside the compiled step)
reuse the compiled train and eval steps. A point whose result.json exists is skipped (if
that record was made with a different config, the point fails with a message instead); a
failing point gets ROOT/<name>/failed.json with its error and the sweep goes on. At the
end the table of the whole root (`moejax.results`) is printed and written to
ROOT/results.md and ROOT/results.csv.

--dry_run lists the points with their parameter counts and status (todo, done, failed, or stale:
a result.json made with another config). --point=I runs only
point I (the form cluster jobs use). --emit=slurm writes ROOT/sweep.slurm, a job-array
script with one task per point; --emit=tpu writes ROOT/sweep_tpu.sh, one command per TPU
slice. Neither runs anything.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shlex
import time

from moejax import config as config_lib, files
from moejax.train import run as run_lib, tracking
from moejax.model import accounting
from moejax.studies import render, results
from moejax.errors import ConfigError, Interrupted, MoejaxError, Preempted


def point_name(point: dict) -> str:
  """A readable, unique workdir name: the point's `name`, else its shortened overrides plus a hash."""
  digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:6]
  if 'name' in point:
    return re.sub(r'[^A-Za-z0-9._=-]+', '_', str(point['name']))
  parts = [f'{k.split(".")[-1]}={v}' for k, v in sorted(point.items())]
  return re.sub(r'[^A-Za-z0-9._=-]+', '_', '_'.join(parts))[:80] + '-' + digest


def resolve_points(cfg, points: list[dict]) -> list[tuple[str, object]]:
  """(name, validated config) of every point; a bad key or value fails before any point runs."""
  resolved, seen = [], {}
  for i, point in enumerate(points):
    name = point_name(point)
    if name in seen:
      raise ConfigError(f'sweep points {seen[name]} and {i} have the same name {name!r}; give them distinct names')
    seen[name] = i
    try:
      resolved.append((name, config_lib.validate(
          config_lib.apply_overrides(cfg, dict(point, name=point.get('name', name))))))
    except ConfigError as e:
      raise ConfigError(f'sweep point {i} ({name}): {e}') from None
  return resolved


def _done(root: str, name: str) -> bool:
  return os.path.exists(os.path.join(root, name, 'result.json'))


def _stale(result_path: str, cfg) -> str | None:
  """Why an existing result.json cannot stand for `cfg` (unreadable, or made with another config), else None."""
  try:
    with open(result_path) as f:
      stored = json.load(f)['config']
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'{result_path} exists but is unreadable ({e}); move it away to re-run the point'
  want = results.config_hash(config_lib.flatten(json.loads(cfg.to_json_best_effort())))
  have = results.config_hash(config_lib.flatten(stored))
  if want != have:
    return (f'{result_path} was made with a different config (hash {have}, this point is {want}); '
            'move it away or use another --root')
  return None


def run_points(resolved: list[tuple[str, object]], root: str, only: int | None = None) -> list[tuple[str, str]]:
  """Runs (or skips) each point; returns the failures [(name, error)]."""
  indices = range(len(resolved)) if only is None else [only]
  for i in indices:  # a missing optional package stops the sweep once, not every point
    tracking.check_installed(resolved[i][1])
  from moejax.parallel import distributed  # pylint: disable=import-outside-toplevel  (jax: only when points run)
  failures = []
  for i in indices:
    name, cfg = resolved[i]
    workdir = os.path.join(root, name)
    failed_path = os.path.join(workdir, 'failed.json')
    head = f'[{i + 1}/{len(resolved)}] {name}'
    if _done(root, name):
      problem = _stale(os.path.join(workdir, 'result.json'), cfg)
      if problem:
        failures.append((name, problem))
        print(f'{head}: FAILED: {problem}', flush=True)
      else:
        print(f'{head}: done earlier', flush=True)
      continue
    t0 = time.time()
    try:
      record = run_lib.execute(cfg, workdir)
    except (Preempted, Interrupted):
      raise  # SIGTERM / Ctrl-C stop the whole sweep (the point saved a checkpoint; rerunning resumes it)
    except MoejaxError as e:
      failures.append((name, str(e)))
      print(f'{head}: FAILED: {e}', flush=True)
      try:
        if distributed.is_leader():  # every process runs every point; process 0 keeps the books
          files.atomic_write(failed_path, json.dumps(
              {'name': name, 'error': f'{type(e).__name__}: {e}', 'point': i,
               'time': datetime.datetime.now().isoformat(timespec='seconds')}, indent=2) + '\n')
      except OSError:
        pass  # the workdir itself is unwritable; the failure is still printed and returned
      continue
    if distributed.is_leader():
      with contextlib.suppress(FileNotFoundError):
        os.remove(failed_path)
    print(f'{head}: held-out loss {record["eval"]["loss"]:.4f} ({time.time() - t0:.0f}s)', flush=True)
  return failures


def dry_run_text(resolved: list[tuple[str, object]], root: str) -> str:
  """One line per point: index, name, parameter counts and whether it is done."""
  lines = [f'{len(resolved)} points under {root}:']
  for i, (name, cfg) in enumerate(resolved):
    acc = accounting.count(cfg)
    if _done(root, name):  # 'stale': a result made with another config; the run would fail on it
      status = 'stale' if _stale(os.path.join(root, name, 'result.json'), cfg) else 'done'
    else:
      status = 'failed' if os.path.exists(os.path.join(root, name, 'failed.json')) else 'todo'
    lines.append(f'{i:4d}  {name:<50} N_total {accounting.human(acc["n_total"]):>8}  '
                 f'N_active {accounting.human(acc["n_active"]):>8}  s {acc["sparsity"]:<5g} seed {cfg.seed:<3d} {status}')
  return '\n'.join(lines) + '\n'


def point_command(argv: list[str], root: str, index: int | str) -> str:
  """The shell command that runs one point: this invocation's config flags plus --root and --point."""
  path, arg = config_lib.config_flag(argv)
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  parts = ['"${PYTHON:-python}"', '-m', 'moejax.sweep', shlex.quote(f'--config={path}' + (f':{arg}' if arg else '')),
           shlex.quote(f'--root={root}'), f'--point={index}', *map(shlex.quote, overrides)]
  return ' '.join(parts)


def emit_slurm(argv: list[str], resolved: list[tuple[str, object]], root: str, repo: str) -> str:
  """A SLURM job-array script: task i runs point i (finished points exit at once)."""
  index = '\n'.join(f'#   {i:4d}  {name}' for i, (name, _) in enumerate(resolved))
  job = re.sub(r'[^A-Za-z0-9_-]+', '_', os.path.basename(root.rstrip('/')) or 'sweep')
  return f"""#!/bin/bash
# Generated by `python -m moejax.sweep --emit=slurm` ({len(resolved)} points). Submit with
#   sbatch [--partition=... --gres=gpu:1 --time=...] {os.path.join(root, 'sweep.slurm')}
# Add cluster-specific #SBATCH lines (account, partition, GPUs) below, or pass them to sbatch.
#SBATCH --job-name=moejax-{job}
#SBATCH --array=0-{len(resolved) - 1}
#SBATCH --ntasks=1
#SBATCH --output={os.path.join(root, 'slurm-%A_%a.out')}
# Points (array index, workdir under {root}):
{index}
set -euo pipefail
cd {shlex.quote(repo)}
{point_command(argv, root, '"$SLURM_ARRAY_TASK_ID"')}
"""


def emit_tpu(argv: list[str], resolved: list[tuple[str, object]], root: str, repo: str) -> str:
  """One command per TPU slice: point i runs on slice $TPU_PREFIX-i, all workers, in parallel."""
  lines = [f"""#!/bin/bash
# Generated by `python -m moejax.sweep --emit=tpu` ({len(resolved)} points): one command per TPU slice.
# Slices are named $TPU_PREFIX-0 ... $TPU_PREFIX-{len(resolved) - 1} and must already exist with moejax
# checked out at $REPO (default: the path below). Every worker of a slice runs the same command.
set -euo pipefail
: "${{TPU_PREFIX:?set TPU_PREFIX: slice i is named TPU_PREFIX-i}}"
: "${{ZONE:?set ZONE, the zone of the slices}}"
REPO="${{REPO:-{repo}}}"
"""]
  for i, (name, _) in enumerate(resolved):
    # "$REPO" expands here; the quoted rest (including ${PYTHON:-python}) is expanded on the workers.
    lines.append(f'# {i}: {name}\ngcloud compute tpus tpu-vm ssh "$TPU_PREFIX-{i}" --zone="$ZONE" --worker=all '
                 f'--command="cd $REPO && "{shlex.quote(point_command(argv, root, i))} &\n')
  lines.append('wait\n')
  return ''.join(lines)


def write_tables(root: str) -> str:
  """Writes ROOT/results.md and ROOT/results.csv from every result under ROOT; returns the Markdown."""
  gathered = results.gather(root)
  rows, varied = results.table(gathered.records)
  text = render.results_markdown(rows, varied, gathered)
  files.atomic_write(os.path.join(root, 'results.md'), text)
  files.atomic_write(os.path.join(root, 'results.csv'), results.csv_text(rows, varied))
  return text

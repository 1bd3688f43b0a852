"""The study workflow: sweeps (run, skip, fail, dry run, cluster scripts) and the results table."""

import csv
import io
import json
import os
import statistics
import subprocess
import sys

import pytest

from moejax import files
from moejax import config as config_lib
from moejax.studies import figures, report, results, sweeps as sweep
from moejax.errors import ConfigError, Interrupted, Preempted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_runs_points_skips_finished_and_records_failures(tiny_cfg, tmp_path):
  points = [{'name': 'dense', 'moe.num_experts': 0, 'train.steps': 2},
            {'name': 'moe', 'train.steps': 2},
            {'name': 'broken', 'data.source': f'text:{tmp_path}/none/*.txt'}]
  resolved = sweep.resolve_points(tiny_cfg, points)
  failures = sweep.run_points(resolved, str(tmp_path))
  assert failures == [('broken', f"data.source='text:{tmp_path}/none/*.txt' matches no files")]
  failed = json.loads((tmp_path / 'broken' / 'failed.json').read_text())
  assert failed['name'] == 'broken' and 'matches no files' in failed['error'] and failed['point'] == 2
  gathered = results.gather(str(tmp_path))
  assert sorted(r['name'] for r in gathered.records) == ['dense', 'moe']
  assert [f['name'] for f in gathered.failed] == ['broken'] and not gathered.unreadable
  mtime = os.path.getmtime(tmp_path / 'moe' / 'result.json')
  assert sweep.run_points(resolved[:2], str(tmp_path)) == []
  assert os.path.getmtime(tmp_path / 'moe' / 'result.json') == mtime  # finished points are not re-run
  # A result.json left by another config under the same name is not silently reused.
  changed = sweep.resolve_points(tiny_cfg, [dict(points[1], **{'train.steps': 3})])
  [(name, problem)] = sweep.run_points(changed, str(tmp_path))
  assert name == 'moe' and 'was made with a different config' in problem
  text = sweep.write_tables(str(tmp_path))
  assert '| dense |' in text and '| moe |' in text and '**Failed points**' in text and 'broken' in text
  rows = list(csv.DictReader(io.StringIO((tmp_path / 'results.csv').read_text())))
  assert {r['name'] for r in rows} == {'dense', 'moe'}


def test_point_names_are_readable_and_unique():
  assert sweep.point_name({'name': 'moe e8'}) == 'moe_e8'
  a = sweep.point_name({'moe.num_experts': 8, 'seed': 1})
  b = sweep.point_name({'moe.num_experts': 8, 'seed': 2})
  assert a.startswith('num_experts=8_seed=1-') and a != b


def test_sweep_checks_every_point_before_running(tiny_cfg):
  sweep.resolve_points(tiny_cfg, [{'name': 'ok', 'moe.num_experts': 8}])
  with pytest.raises(ConfigError, match=r'sweep point 1 \(e2\): unknown config key: moe.num_expertz'):
    sweep.resolve_points(tiny_cfg, [{'name': 'e1'}, {'name': 'e2', 'moe.num_expertz': 2}])
  with pytest.raises(ConfigError, match=r'sweep point 0 \(e3\): moe.experts_per_token=2 must be in'):
    sweep.resolve_points(tiny_cfg, [{'name': 'e3', 'moe.num_experts': 1}])
  with pytest.raises(ConfigError, match='the same name'):
    sweep.resolve_points(tiny_cfg, [{'name': 'x'}, {'name': 'x', 'seed': 3}])


def _sweep_cli(args, timeout=300, **env):
  return subprocess.run([sys.executable, '-m', 'moejax.sweep'] + args, cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, **env))


def test_sweep_cli_dry_run_emit_and_bad_input(corpus_glob, tmp_path):
  config = f'--config=tests/testdata/tiny.py:{corpus_glob}'
  out = _sweep_cli([config, f'--root={tmp_path}/r', '--dry_run', '--config.train.batch_size=2'])
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == f'4 points under {tmp_path}/r:' and len(lines) == 5
  assert 'num_experts=0_seed=0_steps=2-' in lines[1] and lines[1].rstrip().endswith('todo')
  assert 's 2' in lines[3] and 'seed 0' in lines[3]
  assert not os.path.exists(tmp_path / 'r')  # a dry run writes nothing

  out = _sweep_cli([config, f'--root={tmp_path}/r', '--emit=slurm', '--config.train.batch_size=2'])
  assert out.returncode == 0, out.stderr
  script = (tmp_path / 'r' / 'sweep.slurm').read_text()
  assert '#SBATCH --array=0-3' in script and '--point="$SLURM_ARRAY_TASK_ID"' in script
  assert '--config.train.batch_size=2' in script
  assert subprocess.run(['bash', '-n', str(tmp_path / 'r' / 'sweep.slurm')]).returncode == 0
  assert not [d for d in os.listdir(tmp_path / 'r') if os.path.isdir(tmp_path / 'r' / d)]  # nothing ran
  # The emitted array task runs exactly its point, as SLURM would.
  task = subprocess.run(['bash', str(tmp_path / 'r' / 'sweep.slurm')], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, SLURM_ARRAY_TASK_ID='2', PYTHON=sys.executable))
  assert task.returncode == 0, task.stderr
  done = [d for d in os.listdir(tmp_path / 'r') if os.path.exists(tmp_path / 'r' / d / 'result.json')]
  assert len(done) == 1 and done[0].startswith('num_experts=4_seed=0_steps=2-')
  record = json.loads((tmp_path / 'r' / done[0] / 'result.json').read_text())
  assert record['config']['train']['batch_size'] == 2 and record['config']['moe']['num_experts'] == 4

  out = _sweep_cli([config, f'--root={tmp_path}/r', '--emit=tpu'])
  script = (tmp_path / 'r' / 'sweep_tpu.sh').read_text()
  assert out.returncode == 0 and script.count('gcloud compute tpus tpu-vm ssh') == 4 and '--point=3' in script
  assert subprocess.run(['bash', '-n', str(tmp_path / 'r' / 'sweep_tpu.sh')]).returncode == 0
  unset = subprocess.run(['bash', str(tmp_path / 'r' / 'sweep_tpu.sh')], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != 'TPU_PREFIX'})
  assert unset.returncode != 0 and 'set TPU_PREFIX' in unset.stderr

  for extra, message in ((['--config.moe.num_expertz=2'], 'num_expertz'), (['--point=9'], '--point=9 is out of range')):
    out = _sweep_cli([config, f'--root={tmp_path}/bad'] + extra)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr
    assert not os.path.exists(tmp_path / 'bad')


def _record(name, seed, num_experts, loss, steps=100, dropless=True):
  cfg = {'name': name, 'seed': seed, 'data': {'seed': 0, 'source': 'stdlib'}, 'train': {'steps': steps},
         'moe': {'num_experts': num_experts, 'experts_per_token': 2, 'load_balancing': 'global_batch',
                 'train_capacity_factor': None if dropless else 1.25, 'capacity_policy': 'position'}}
  return {'name': name, 'config': cfg, 'eval': {'loss': loss, 'bits_per_byte': loss / 0.7, 'tokens': 1000},
          'accounting': {'n_total': 1000 * (num_experts + 1), 'n_active': 3000, 'sparsity': num_experts / 2 or 1.0,
                         'num_experts': num_experts, 'experts_per_token': 2, 'granularity': 2.0, 'expert_hidden': 64,
                         'num_shared_experts': 0},
          'train': {'tokens': steps * 512},
          'routing': {'layers': [{'load_max_over_mean': 1.5, 'dead_experts': 0, 'drop_fraction': 0.0},
                                 {'load_max_over_mean': 2.5, 'dead_experts': 1, 'drop_fraction': 0.0}],
                      'n_active_measured': 3000}}


def _write(path, record_or_text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(record_or_text if isinstance(record_or_text, str) else json.dumps(record_or_text))


def test_results_group_seeds_and_report_bad_files(tmp_path):
  for seed, loss in ((0, 2.0), (1, 2.2), (2, 2.1)):
    _write(f'{tmp_path}/a/e8-s{seed}/result.json', _record(f'e8-s{seed}', seed, 8, loss))
  _write(f'{tmp_path}/a/e16/result.json', _record('e16', 0, 16, 1.9))
  _write(f'{tmp_path}/b/deep/er/e16-long/result.json', _record('e16-long', 0, 16, 1.8, steps=200))
  _write(f'{tmp_path}/corrupt/result.json', '{"name": "half-writ')
  partial = _record('partial', 0, 8, 2.0)
  del partial['eval']['loss']
  _write(f'{tmp_path}/partial/result.json', partial)
  _write(f'{tmp_path}/nan/result.json', _record('nan', 0, 8, float('nan')))
  _write(f'{tmp_path}/oom/failed.json', {'name': 'oom', 'error': 'DataError: boom'})

  gathered = results.gather(str(tmp_path))
  assert len(gathered.records) == 5 and [f['name'] for f in gathered.failed] == ['oom']
  reasons = dict((os.path.basename(os.path.dirname(p)), why) for p, why in gathered.unreadable)
  assert reasons['corrupt'].startswith('unreadable') and reasons['partial'] == 'incomplete: missing eval.loss'
  assert reasons['nan'] == 'incomplete: eval.loss is nan'

  rows, varied = results.table(gathered.records)
  assert varied == ['train.steps']  # seeds and names are not "varied fields"; num_experts has its own column
  by_name = {r['name']: r for r in rows}
  e8 = by_name['e8-s0']
  assert e8['seeds'] == 3 and e8['loss_mean'] == pytest.approx(2.1)
  assert e8['loss_std'] == pytest.approx(statistics.stdev([2.0, 2.2, 2.1]))
  assert by_name['e16']['seeds'] == 1 and by_name['e16']['loss_std'] is None
  assert by_name['e16']['config_hash'] != by_name['e16-long']['config_hash']
  assert e8['load_max_over_mean'] == 2.0 and e8['dead_experts'] == 0.5 and e8['drop_policy'] == 'dropless'
  assert e8['sparsity'] == 4 and e8['tokens'] == 51200

  md, _ = results.render(str(tmp_path), 'md')
  assert '| train.steps |' in md.splitlines()[0] and '**Failed points**' in md and '- oom: DataError: boom' in md
  assert '**Skipped files**' in md and 'incomplete: missing eval.loss' in md
  parsed = list(csv.DictReader(io.StringIO(results.render(str(tmp_path), 'csv')[0])))
  assert len(parsed) == 3 and float(parsed[0]['loss_mean']) > 0
  doc = json.loads(results.render(str(tmp_path), 'json')[0])
  assert len(doc['rows']) == 3 and len(doc['unreadable']) == 3 and doc['failed'][0]['name'] == 'oom'


def test_a_reproduction_is_not_a_new_seed(tmp_path):
  """moejax.reproduce writes a result.json with the same config and seed: the same seed re-run, not a second one."""
  _write(f'{tmp_path}/e8/result.json', _record('e8', 0, 8, 2.0))
  _write(f'{tmp_path}/e8-s1/result.json', _record('e8-s1', 1, 8, 2.2))
  later = os.path.getmtime(f'{tmp_path}/e8/result.json') + 10
  _write(f'{tmp_path}/a-repro/result.json', _record('e8', 0, 8, 2.0))  # sorts first by path, written last
  os.utime(f'{tmp_path}/a-repro/result.json', (later, later))
  rows, _ = results.table(results.gather(str(tmp_path)).records)
  assert len(rows) == 1
  row = rows[0]
  assert row['seeds'] == 2 and row['loss_mean'] == pytest.approx(2.1)  # seeds 0 and 1, each once
  assert sorted(row['seed_losses']) == ['0/0', '1/0'] and all('a-repro' not in p for p in row['paths'])
  assert [(x['seed'], x['difference']) for x in row['reproductions']] == [('0/0', 0.0)]
  assert 'a-repro' in row['reproductions'][0]['path']
  md, _ = results.render(str(tmp_path), 'md')
  assert '**Reproductions**' in md
  only = f'{tmp_path}/only'
  _write(f'{only}/x/result.json', _record('x', 0, 8, 2.0))
  _write(f'{only}/y/result.json', _record('x', 0, 8, 2.0))
  row = results.table(results.gather(only).records)[0][0]
  assert row['seeds'] == 1 and row['loss_std'] is None  # not "n=2, ± 0.0000"


def test_results_cli(tmp_path):
  _write(f'{tmp_path}/x/result.json', _record('x', 0, 8, 2.0))
  _write(f'{tmp_path}/y/result.json', 'not json')
  out = subprocess.run([sys.executable, '-m', 'moejax.results', f'--root={tmp_path}', '--format=csv'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.startswith('config_hash,name,')
  assert 'skipped' in out.stderr and 'y/result.json' in out.stderr and '1 runs in 1 configurations' in out.stderr
  out = subprocess.run([sys.executable, '-m', 'moejax.results', f'--root={tmp_path}/missing'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and out.stderr.strip() == f'moejax: error: results root {tmp_path}/missing does not exist'


def test_flatten_round_trips_a_config(tiny_cfg):
  flat = config_lib.flatten(json.loads(tiny_cfg.to_json_best_effort()))
  assert flat['moe.num_experts'] == 4
  rebuilt = config_lib.apply_overrides(tiny_cfg, dict(flat, **{'moe.num_experts': 8}))
  assert rebuilt.moe.num_experts == 8 and rebuilt.model.model_dim == tiny_cfg.model.model_dim


def test_report_series_and_figures(tmp_path):
  for seed, loss in ((0, 2.0), (1, 2.2)):
    _write(f'{tmp_path}/runs/e8-s{seed}/result.json', _record(f'e8-s{seed}', seed, 8, loss))
  _write(f'{tmp_path}/runs/e16/result.json', _record('e16', 0, 16, 1.9))
  big = _record('big-e16', 0, 16, 1.7)
  big['accounting']['n_active'] = 6000  # a second active budget
  big['config']['train']['steps'] = 300
  _write(f'{tmp_path}/runs/big/result.json', big)
  dense = _record('dense', 0, 0, 2.4)
  _write(f'{tmp_path}/runs/dense/result.json', dense)
  rows, _ = results.table(results.gather(f'{tmp_path}/runs').records)
  s = figures.series(rows, 'sparsity')
  assert list(s) == ['N_active ≈ 3.00K', 'N_active ≈ 6.00K']
  assert s['N_active ≈ 3.00K'] == [(1.0, 2.4, 0.0), (4.0, pytest.approx(2.1), pytest.approx(0.1414, abs=1e-4)),
                                   (8.0, 1.9, 0.0)]
  assert [x for x, _, _ in figures.series(rows, 'num_experts')['N_active ≈ 3.00K']] == [1.0, 8.0, 16.0]
  path = report.write_report(f'{tmp_path}/runs', f'{tmp_path}/report')
  text = open(path).read()
  for _, _, name in figures.PLOTS:
    assert f']({name})' in text
    png = open(f'{tmp_path}/report/{name}', 'rb').read()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000
  assert '| e8-s0 |' in text and '## Table' in text
  out = subprocess.run([sys.executable, '-m', 'moejax.report', f'--root={tmp_path}/report', f'--out={tmp_path}/x'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and 'no complete result.json' in out.stderr


def test_atomic_write_gives_normal_permissions(tmp_path):
  from moejax.train import metrics  # pylint: disable=import-outside-toplevel
  old = os.umask(0o022)
  try:
    files.atomic_write(str(tmp_path / 'table.md'), 'x\n')
  finally:
    os.umask(old)
  assert (os.stat(tmp_path / 'table.md').st_mode & 0o777) == 0o644 and os.listdir(tmp_path) == ['table.md']


def test_a_set_of_files_appears_whole_or_not_at_all(tmp_path, monkeypatch):
  """files.atomic_set: an interrupt while the set is written leaves every previous file and no temp; a clean exit
  renames every file in, `last` last."""
  for name in ('a.md', 'b.png', 'z.md'):
    (tmp_path / name).write_text('old')
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_set(str(tmp_path), last='a.md') as path:
      for name in ('a.md', 'b.png'):
        with open(path(name), 'w') as f:
          f.write('new')
      raise KeyboardInterrupt
  assert sorted(os.listdir(tmp_path)) == ['a.md', 'b.png', 'z.md']
  assert {n: (tmp_path / n).read_text() for n in os.listdir(tmp_path)} == {'a.md': 'old', 'b.png': 'old', 'z.md': 'old'}
  order = []
  real = os.replace
  monkeypatch.setattr(os, 'replace', lambda a, b: order.append(os.path.basename(b)) or real(a, b))
  with files.atomic_set(str(tmp_path), last='a.md') as path:
    for name in ('a.md', 'b.png', 'c.png'):
      with open(path(name), 'w') as f:
        f.write('new')
  assert order == ['b.png', 'c.png', 'a.md'] and sorted(os.listdir(tmp_path)) == ['a.md', 'b.png', 'c.png', 'z.md']
  assert (tmp_path / 'a.md').read_text() == 'new' and (tmp_path / 'z.md').read_text() == 'old'


def test_sigterm_raises_preempted_only_while_open():
  import signal  # pylint: disable=import-outside-toplevel
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(Preempted, match='stopped: the files are as they were'):
    with files.sigterm_raises('stopped: the files are as they were'):
      os.kill(os.getpid(), signal.SIGTERM)
      import time  # pylint: disable=import-outside-toplevel
      time.sleep(5)  # the handler raises at the next bytecode; never reached
  assert signal.getsignal(signal.SIGTERM) == before


def test_config_hash_ignores_keys_added_after_a_run(tiny_cfg):
  flat = config_lib.flatten(json.loads(tiny_cfg.to_json_best_effort()))
  old_record = {k: v for k, v in flat.items() if k != 'moe.kernels'}  # a run recorded before moe.kernels existed
  assert results.config_hash(old_record) == results.config_hash(flat)
  assert results.config_hash(dict(flat, seed=7, name='other')) == results.config_hash(flat)
  assert results.config_hash(dict(flat, **{'moe.num_experts': 8})) != results.config_hash(flat)
  assert results.config_hash(dict(flat, **{'moe.removed_key': 1})) == results.raw_config_hash(
      dict(flat, **{'moe.removed_key': 1}))


def test_dry_run_marks_a_result_made_with_another_config_stale(tiny_cfg, tmp_path):
  resolved = sweep.resolve_points(tiny_cfg, [{'name': 'a'}, {'name': 'b'}])
  for name, lr in (('a', tiny_cfg.optim.peak_learning_rate), ('b', 1.0)):  # b's result: another learning rate
    cfg = config_lib.apply_overrides(resolved[0][1], {'name': name, 'optim.peak_learning_rate': lr})
    os.makedirs(tmp_path / name)
    (tmp_path / name / 'result.json').write_text(json.dumps({'config': json.loads(cfg.to_json_best_effort())}))
  lines = sweep.dry_run_text(resolved, str(tmp_path)).splitlines()
  assert lines[1].rstrip().endswith('done') and lines[2].rstrip().endswith('stale')  # before: 'done' for both


@pytest.mark.parametrize('error', [Preempted, Interrupted])
def test_a_signal_stops_the_whole_sweep(tiny_cfg, tmp_path, monkeypatch, error):
  resolved = sweep.resolve_points(tiny_cfg, [{'name': 'a'}, {'name': 'b'}])
  ran = []

  def execute(cfg, workdir):
    ran.append(cfg.name)
    raise error('stop')

  monkeypatch.setattr(sweep.run_lib, 'execute', execute)
  with pytest.raises(error):
    sweep.run_points(resolved, str(tmp_path))
  assert ran == ['a'] and not (tmp_path / 'a' / 'failed.json').exists()  # before: recorded as failed, then b ran


def test_rows_are_labelled_by_the_real_drop_settings_train_and_eval():
  base_flat = {'moe.num_experts': 8}
  cases = [({}, ('dropless', 'dropless')),
           ({'moe.train_capacity_factor': 1.25, 'moe.drop_policy': 'probs'}, ('CF 1.25 (probs)', 'dropless')),
           ({'moe.eval_capacity_factor': 2.0}, ('dropless', 'CF 2 (position)')),
           ({'moe.expert_parallel_capacity_factor': 1.0}, ('dropless', 'dropless')),  # no expert axis: never drops
           ({'moe.expert_parallel_capacity_factor': 1.0, 'mesh.expert': 4}, ('EP CF 1', 'EP CF 1')),
           ({'moe.train_capacity_factor': 1.0, 'moe.expert_parallel_capacity_factor': 1.5, 'mesh.expert': -1},
            ('CF 1 (position) + EP CF 1.5', 'EP CF 1.5'))]
  for overrides, expected in cases:
    assert results.drop_settings(dict(base_flat, **overrides)) == expected, overrides

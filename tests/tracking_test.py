"""W&B tracking (moejax/train/tracking.py) in wandb's offline mode, read back with wandb's own log reader."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from moejax import config as config_lib
from moejax.errors import ConfigError, Preempted
from moejax.train import run as run_lib
from moejax.train import tracking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
  """wandb itself (skipped when not installed), kept off the network and out of the home directory."""
  wandb = pytest.importorskip('wandb')
  for name in ('WANDB_MODE', 'WANDB_DIR', 'WANDB_RUN_ID', 'WANDB_RESUME', 'WANDB_PROJECT', 'WANDB_ENTITY'):
    monkeypatch.delenv(name, raising=False)
  for name in ('WANDB_CONFIG_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR'):
    monkeypatch.setenv(name, str(tmp_path / 'wandb-home'))
  monkeypatch.setenv('WANDB_SILENT', 'true')
  return wandb


def _records(run_dir) -> list[dict]:
  """The records of an offline run's .wandb log as `wandb leet inspect --json` (wandb's own reader) prints them."""
  (log,) = [f for f in os.listdir(run_dir) if f.endswith('.wandb')]
  exe = shutil.which('wandb', path=os.path.dirname(sys.executable)) or 'wandb'
  out = subprocess.run([exe, 'leet', 'inspect', '--json', os.path.join(run_dir, log)], capture_output=True, text=True,
                       timeout=60)
  if out.returncode != 0:
    pytest.skip(f'this wandb cannot read its offline logs back (`wandb leet inspect`): {out.stderr.strip()[-200:]}')
  return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _raise(error):
  raise error


def _offline_runs(workdir) -> list[str]:
  root = os.path.join(workdir, 'wandb')
  return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith('offline-run-'))


def _expected_history(rows: list[dict]) -> list[dict]:
  """metrics.jsonl rows as charted: lists as `key/i`, finite numbers only (written out here, not with the writer)."""
  out = []
  for row in rows:
    flat = {}
    for key, value in row.items():
      for name, v in ([(f'{key}/{i}', v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]):
        if isinstance(v, (int, float)) and abs(v) != float('inf') and v == v:
          flat[name] = v
    out.append(flat)
  return out


def test_tracked_run_logs_config_metrics_and_result_offline(tiny_cfg, tmp_path, wandb_env):
  cfg = config_lib.apply_overrides(tiny_cfg, {'wandb.mode': 'offline', 'wandb.tags': 'tiny, test',
                                              'eval.every_steps': 2, 'optim.schedule': 'wsd',
                                              'optim.decay_branches': '0.5'})
  workdir = tmp_path / 'run'
  result = run_lib.execute(cfg, str(workdir))
  (run_dir,) = _offline_runs(workdir)
  records = _records(run_dir)
  (run,) = [r['run'] for r in records if r['type'] == 'run']
  assert run['run_id'] == json.loads((workdir / 'wandb_run.json').read_text())['id']
  assert run['project'] == 'moejax' and run['display_name'] == 'tiny' and run['tags'] == ['tiny', 'test']
  logged = {k: v for k, v in run['config']['update'].items() if k != '_wandb'}
  assert logged == config_lib.flatten(json.loads((workdir / 'config.json').read_text()))

  history = [{k: v for k, v in r['history']['item'].items() if not k.startswith('_')}
             for r in records if r['type'] == 'history']
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert any('eval_loss' in r for r in rows) and any(isinstance(v, list) for v in rows[0].values())
  assert [r['step'] for r in rows if 'branch_eval_loss' in r] == [3] and rows[2]['step'] == 3  # logged at step 2
  final = {'step': 6, 'eval_loss': result['eval']['loss'], 'eval_bits_per_byte': result['eval']['bits_per_byte'],
           'tokens': result['train']['tokens']}
  assert history == _expected_history(rows) + [final]

  summary = {}
  for r in records:
    if r['type'] == 'summary':
      summary.update(r['summary'].get('update', {}))
  on_disk = json.loads((workdir / 'result.json').read_text())
  assert summary['eval'] == on_disk['eval'] and summary['accounting'] == on_disk['accounting']
  assert summary['train']['steps'] == 6 and 'config' not in summary
  assert [r['exit']['exit_code'] for r in records if r['type'] == 'exit'] == [0]


def test_a_resumed_workdir_resumes_its_wandb_run(tiny_cfg, tmp_path, wandb_env):
  cfg = config_lib.apply_overrides(tiny_cfg, {'wandb.mode': 'offline', 'wandb.dir': str(tmp_path / 'logs')})
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with pytest.raises(Preempted):
    with tracking.start(cfg, workdir) as tracker:
      tracker.log(1, {'loss': 2.5, 'load_cv': [0.25, float('nan')]})
      raise Preempted('SIGTERM at step 1')
  with tracking.start(cfg, workdir) as tracker:
    tracker.log(2, {'loss': 2.0})
  first, second = (_records(d) for d in _offline_runs(tmp_path / 'logs'))
  ids = [next(r['run']['run_id'] for r in records if r['type'] == 'run') for records in (first, second)]
  assert ids[0] == ids[1] == json.loads(open(os.path.join(workdir, tracking.RUN_FILE)).read())['id']
  assert [r['exit']['exit_code'] for r in first + second if r['type'] == 'exit'] == [143, 0]
  items = [r['history']['item'] for r in first if r['type'] == 'history']
  assert [(i['step'], i['loss'], i['load_cv/0']) for i in items] == [(1, 2.5, 0.25)] and 'load_cv/1' not in items[0]
  assert not os.path.exists(os.path.join(workdir, 'wandb'))  # wandb.dir holds wandb's own files


def test_missing_wandb_is_one_line_before_training(tiny_cfg, corpus_glob, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` now raises ImportError, as when not installed
  cfg = config_lib.apply_overrides(tiny_cfg, {'wandb.mode': 'offline'})
  with pytest.raises(ConfigError, match=r"wandb.mode='offline' needs the wandb package.*moejax\[wandb\]"):
    run_lib.execute(cfg, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')  # refused before the workdir, the corpus or jax's devices

  blocker = tmp_path / 'no-wandb' / 'wandb'
  blocker.mkdir(parents=True)
  (blocker / '__init__.py').write_text("raise ImportError(\"No module named 'wandb'\")\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), ROOT]))
  out = subprocess.run([sys.executable, '-m', 'moejax.main', f'--config=tests/testdata/tiny.py:{corpus_glob}',
                        f'--workdir={tmp_path}/cli', '--config.wandb.mode=online'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 2 and len(lines) == 1, out.stderr
  assert lines[0].startswith("moejax: error: wandb.mode='online' needs the wandb package")
  assert not os.path.exists(tmp_path / 'cli')


def test_wandb_failures_are_one_line_at_the_start_and_a_warning_after(tiny_cfg, tmp_path, wandb_env, monkeypatch,
                                                                     caplog):
  cfg = config_lib.apply_overrides(tiny_cfg, {'wandb.mode': 'offline'})
  with monkeypatch.context() as m:
    m.setattr(wandb_env, 'init', lambda **kw: _raise(RuntimeError('No API key configured.\nLog in.')))
    with pytest.raises(ConfigError, match=r"^wandb.init failed \(wandb.mode='offline'\): No API key configured. Log "
                                          r"in; or set --config.wandb.mode=offline"):
      tracking.Tracker(cfg, str(tmp_path))
  with tracking.start(cfg, str(tmp_path)) as tracker:
    calls = []
    monkeypatch.setattr(tracker.run, 'log', lambda *a, **kw: calls.append(a) or _raise(OSError('gone')))
    tracker.log(1, {'loss': 1.0})
    tracker.log(2, {'loss': 0.5})  # no second try, no second warning
  assert len(calls) == 1 and caplog.text.count('W&B log failed (gone); tracking stops') == 1


def test_a_sweep_without_wandb_stops_once_before_any_point(tiny_cfg, tmp_path, monkeypatch):
  from moejax.studies import sweeps  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(sys.modules, 'wandb', None)
  resolved = sweeps.resolve_points(config_lib.apply_overrides(tiny_cfg, {'wandb.mode': 'offline'}),
                                   [{'name': 'a'}, {'name': 'b'}])
  with pytest.raises(ConfigError, match='needs the wandb package'):
    sweeps.run_points(resolved, str(tmp_path))
  assert os.listdir(tmp_path) == []  # no point started, no failed.json written


def test_wandb_mode_is_validated(tiny_cfg):
  with pytest.raises(ConfigError, match=r"wandb.mode='cloud' must be one of \('disabled', 'offline', 'online'\)"):
    config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'wandb.mode': 'cloud'}))

"""Faults around export, import, eval and generate (issue 28): each ends in one line and leaves nothing half-made."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from interop_test import DESIGNS, _cfg, _random_params, _workdir
from moejax import generate
from moejax.train import restore as restore_lib, run as run_lib
from moejax.errors import CheckpointError, DataError, WorkdirError
from moejax.interop import exporter, importer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'PYTHONPATH': ROOT}


def _run(tiny_cfg, tmp_path, overrides=None, scale=1.0):
  cfg = _cfg(tiny_cfg, overrides or DESIGNS['mixtral'])
  params = jax.tree.map(lambda x: x * scale, _random_params(cfg))
  return cfg, _workdir(cfg, params, str(tmp_path / 'run'))


def _cli(module, *args, timeout=300):
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, cwd=ROOT, env=ENV,
                        timeout=timeout)


def _one_error_line(proc) -> str:
  lines = proc.stderr.decode(errors='replace').strip().splitlines()
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr.decode(errors='replace'), lines
  assert lines[-1].startswith('moejax: error: '), lines
  return lines[-1]


def test_export_and_import_directories_have_normal_permissions(tiny_cfg, tmp_path):
  _, workdir = _run(tiny_cfg, tmp_path)
  umask = os.umask(0o022)
  try:
    exporter.export(workdir, str(tmp_path / 'hf'))
    importer.import_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'back'))
  finally:
    os.umask(umask)
  assert os.stat(tmp_path / 'hf').st_mode & 0o777 == 0o755
  assert os.stat(tmp_path / 'back').st_mode & 0o777 == 0o755


def test_sigterm_during_export_is_one_line_and_leaves_no_partial_directory(tiny_cfg, tmp_path):
  # A wider model, so that the export is still writing when the signal comes.
  _, workdir = _run(tiny_cfg, tmp_path, {**DESIGNS['mixtral'], 'model.model_dim': 256, 'moe.num_experts': 16,
                                         'moe.expert_hidden': 256, 'model.num_layers': 4})
  out = tmp_path / 'hf'
  proc = subprocess.Popen([sys.executable, '-m', 'moejax.export', f'--workdir={workdir}', f'--out={out}'],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
  deadline = time.time() + 120
  while not [n for n in os.listdir(tmp_path) if '.partial-' in n] and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  lines = err.decode().strip().splitlines()
  assert proc.returncode == 143 and 'Traceback' not in err.decode(), lines
  assert lines[-1] == f'moejax: error: export stopped by SIGTERM: nothing was written under {out}; rerun to export'
  assert sorted(os.listdir(tmp_path)) == ['run']


@pytest.mark.slow
def test_a_rerun_removes_a_partial_directory_left_by_a_killed_export(tiny_cfg, tmp_path):
  _, workdir = _run(tiny_cfg, tmp_path)
  stale = tmp_path / '.hf.partial-999999999-abc'  # no such pid: its writer is gone (SIGKILL)
  stale.mkdir()
  (stale / 'model.safetensors').write_bytes(b'\0' * 1000)
  exporter.export(workdir, str(tmp_path / 'hf'))
  assert sorted(os.listdir(tmp_path)) == ['hf', 'run']


def test_full_disk_during_export_or_import_is_one_line_and_leaves_nothing(tiny_cfg, tmp_path, monkeypatch):
  _, workdir = _run(tiny_cfg, tmp_path)
  exporter.export(workdir, str(tmp_path / 'hf'))

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), args[1] if len(args) > 1 else None)

  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(safetensors.numpy, 'save_file', full)
  with pytest.raises(WorkdirError, match=f'cannot export to {tmp_path}/hf2: no space left on device; nothing was '
                     'written under it') as info:
    exporter.export(workdir, str(tmp_path / 'hf2'))
  assert '\n' not in str(info.value)
  monkeypatch.setattr(json, 'dump', full)  # import's last write (imported.json)
  with pytest.raises(WorkdirError, match='cannot import to .*back: no space left on device'):
    importer.import_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'back'))
  assert sorted(os.listdir(tmp_path)) == ['hf', 'run']


@pytest.fixture
def small_disk(tmpfs):
  return tmpfs('1m')  # (a 1 MB disk: the tokenizer fits, the weights do not)


@pytest.mark.slow
def test_export_cli_on_a_really_full_disk_is_one_line(tiny_cfg, tmp_path, small_disk):
  _, workdir = _run(tiny_cfg, tmp_path)
  free = os.statvfs(small_disk)
  with open(small_disk / 'ballast', 'wb') as f:  # leave 32 KB: the tokenizer fits, the weights do not
    f.write(b'\0' * (free.f_bavail * free.f_frsize - 32 * 1024))
  line = _one_error_line(_cli('moejax.export', f'--workdir={workdir}', f'--out={small_disk}/hf'))
  assert line == f'moejax: error: cannot export to {small_disk}/hf: no space left on device; nothing was written under it'
  assert os.listdir(small_disk) == ['ballast']


@pytest.mark.slow
def test_eval_and_generate_refuse_non_finite_parameters(tiny_cfg, tmp_path):
  cfg = _cfg(tiny_cfg, DESIGNS['mixtral'])
  params = _random_params(cfg)
  params['blocks'][1]['attn']['wq'][0, 0, 0] = np.nan
  workdir = _workdir(cfg, params, str(tmp_path / 'run'))
  message = r'checkpoint step 0 in .* holds non-finite \(NaN or inf\) parameters \(1 tensors, first .*wq'
  with pytest.raises(CheckpointError, match=message):
    run_lib.execute(cfg, workdir, mode='eval')
  assert not os.path.exists(os.path.join(workdir, 'result.json'))
  with pytest.raises(CheckpointError, match=message):
    generate.generate_text(workdir, ['def '], max_new_tokens=2)


@pytest.mark.parametrize('args,message', [
    (['--prompt=ok', '--temperature=nan'], '--temperature=nan must be a finite number >= 0 (0 is greedy)'),
    (['--prompt=ok', '--temperature=-1'], '--temperature=-1.0 must be a finite number >= 0 (0 is greedy)'),
    (['--prompt=ok', '--top_p=0'], '--top_p=0.0 must be in (0, 1]'),
    (['--prompt=ok', '--max_new_tokens=0'], '--max_new_tokens=0 must be >= 1'),
    ([b'--prompt=caf\xe9'], '--prompt number 1 is not valid UTF-8 (byte 0xe9 at character 3); prompts are text'),
])
def test_generate_bad_options_name_only_the_violated_constraint(tmp_path, args, message):
  line = _one_error_line(_cli('moejax.generate', f'--workdir={tmp_path}', *args, timeout=120))
  assert line == f'moejax: error: {message}'


@pytest.mark.slow
def test_imported_workdir_without_a_corpus_is_not_scored(tiny_cfg, tmp_path):
  _, workdir = _run(tiny_cfg, tmp_path)
  exporter.export(workdir, str(tmp_path / 'hf'))
  back = str(tmp_path / 'back')
  importer.import_checkpoint(str(tmp_path / 'hf'), back)
  assert json.load(open(os.path.join(back, 'imported.json')))['corpus'] is None
  line = _one_error_line(_cli('moejax.main', f'--config={back}/experiment.py', f'--workdir={back}', '--mode=eval'))
  assert line == (f'moejax: error: {back} was imported from {tmp_path}/hf without a corpus: give one with '
                  '--config.data.source=SOURCE --allow_config_change (or import with --data_source=SOURCE)')
  assert not os.path.exists(os.path.join(back, 'result.json'))
  loaded = restore_lib.load_config(back)
  restore_lib.check_corpus_given(loaded.copy_and_resolve_references(), str(tmp_path / 'run'))  # not imported: no check
  given = loaded.copy_and_resolve_references()
  given.data.source = tiny_cfg.data.source
  restore_lib.check_corpus_given(given, back)  # a corpus given on the command line
  importer.import_checkpoint(str(tmp_path / 'hf'), str(tmp_path / 'back2'), data_source=tiny_cfg.data.source)
  restore_lib.check_corpus_given(restore_lib.load_config(str(tmp_path / 'back2')), str(tmp_path / 'back2'))
  with pytest.raises(DataError):
    restore_lib.check_corpus_given(loaded, back)

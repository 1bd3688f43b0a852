"""Train, eval and decode steps compiled from abstract shapes on the local (CPU) devices."""

import pytest

from moejax import config as config_lib
from moejax.bench import fit as compile_steps


@pytest.mark.slow  # three compiles of the EP model: ~1 min on 2 idle cores
def test_compile_all_reports_every_step_with_expert_parallelism(tiny_cfg):
  cfg = config_lib.apply_overrides(tiny_cfg, {'mesh.expert': 4, 'mesh.data': 1, 'mesh.fsdp': 1})
  reports = compile_steps.compile_all(config_lib.validate(cfg), None, decode_batch=2)
  assert set(reports) == {'train', 'eval', 'decode'}
  for r in reports.values():
    assert r['compiler'].startswith('XLA:CPU') and r['peak_bytes'] > 0 and r['compile_s'] > 0
  assert reports['train']['mesh']['expert'] == 4 and reports['train']['devices'] == 4


def test_fit_row_shards_the_state_over_every_device(tiny_cfg):
  row = compile_steps.fit_row(tiny_cfg, None, 4)
  assert row['devices'] == 4 and row['target'] == 'cpu x4'
  assert 0 < row['state_gb'] <= row['peak_gb'] and row['analytic_gb'] > 0


def _fake_rows(monkeypatch, peak_of, calls, message='RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm',
               state_gb=1.0):
  """fit_row replaced by a memory model: peak_of(devices, remat) GB (None: the compiler ran out of memory)."""
  def fake(cfg, target, devices, remat=None, microbatches=1, scan=None):
    calls.append((target.name if target else f'cpu x{devices}', remat, microbatches, scan))
    peak = peak_of(devices, remat)
    if peak is None:
      raise RuntimeError(message)
    return {'name': cfg.name, 'target': target.name if target else f'cpu x{devices}', 'devices': devices,
            'remat': remat, 'scan_layers': scan, 'microbatches': microbatches, 'attention': 'auto', 'peak_gb': peak,
            'analytic_gb': 1.0, 'state_gb': state_gb * 8 / devices, 'compile_s': 1.0, 'compiler': 'fake'}
  monkeypatch.setattr(compile_steps, 'fit_row', fake)


def test_search_finds_the_smallest_target_and_the_cheapest_remat_that_fits(tiny_cfg, monkeypatch):
  """H100 budget 0.9 x 79.1 GiB = 76.4 GB: 8 devices never fit, 16 fit with 'full' and 'moe' but not
  'none'; the search stops at the first size that fits, keeps 'moe' (less recompute than 'full'),
  reports the size below as evidence, and a second search over the same store compiles nothing."""
  peaks = {('full', 8): 90.0, ('full', 16): 50.0, ('moe', 16): 70.0, ('none', 16): 95.0}
  calls, store = [], {}
  _fake_rows(monkeypatch, lambda d, r: peaks[(r, d)], calls)
  cfg = config_lib.validate(tiny_cfg)
  result = compile_steps.search(cfg, 'gpu:h100', 16 * cfg.data.seq_len * 4, 0.9, store)
  assert result['fits']['target'] == 'gpu:h100x8x2' and result['fits']['remat'] == 'moe'
  assert result['fits']['microbatches'] == 4  # 4 x 16 sequences of one per device
  assert result['below']['target'] == 'gpu:h100x8' and not result['below']['fits']
  assert calls == [('gpu:h100x8', 'full', 8, True), ('gpu:h100x8x2', 'full', 4, True),
                   ('gpu:h100x8x2', 'none', 4, True), ('gpu:h100x8x2', 'moe', 4, True)]
  calls.clear()
  again = compile_steps.search(cfg, 'gpu:h100', 16 * cfg.data.seq_len * 4, 0.9, store)
  assert calls == [] and again['fits'] == result['fits']
  assert '| gpu:h100x8x2 (16 devices) | remat moe, scanned, 4 microbatches' in compile_steps.search_row(cfg, 'gpu:h100', 1, again)


def test_a_scanned_setting_fits_only_with_room_for_a_checkpoint_save(tiny_cfg, monkeypatch):
  """A save of a scanned run holds per-layer copies of the stacked leaves beside the state (up to twice the state):
  a step that fits on 8 H100s with 40 GB of state per device does not fit there; with 20 GB on 16 it does."""
  calls = []
  _fake_rows(monkeypatch, lambda d, r: 60.0, calls, state_gb=40.0)
  result = compile_steps.search(config_lib.validate(tiny_cfg), 'gpu:h100', 1, 0.9, {})
  assert result['fits']['target'] == 'gpu:h100x8x2' and not result['below']['fits']


@pytest.mark.parametrize('message', [
    'RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm',
    'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (101.71G) '
    'exceeds available HBM (95.74G).'])  # (both seen from libtpu 0.0.42.1)
def test_search_treats_a_compiler_out_of_memory_as_not_fitting(tiny_cfg, monkeypatch, message):
  calls = []
  _fake_rows(monkeypatch, lambda d, r: None if d < 32 else 10.0, calls, message)
  result = compile_steps.search(config_lib.validate(tiny_cfg), 'tpu:v5p', 1, 0.9, {})
  assert result['fits']['target'] == 'tpu:v5p-64' and result['fits']['remat'] == 'none'
  assert 'out of memory' in compile_steps.search_row(tiny_cfg, 'tpu:v5p', 1, result)


def test_search_does_not_swallow_other_compiler_errors(tiny_cfg, monkeypatch):
  def broken(*a, **k):
    raise ValueError('a real bug')
  monkeypatch.setattr(compile_steps, 'fit_row', broken)
  with pytest.raises(ValueError, match='a real bug'):
    compile_steps.search(config_lib.validate(tiny_cfg), 'gpu:h100', 1, 0.9, {})
  with pytest.raises(Exception, match='not a target family'):
    compile_steps.search(config_lib.validate(tiny_cfg), 'gpu:a100', 1, 0.9, {})


def test_the_compile_cache_key_holds_what_changes_a_compile(tiny_cfg):
  """The resolved attention core ('auto' is splash for a TPU target, blockwise for a deviceless GPU one), the
  scan, remat, microbatches, target and compiler are in the key; a stale entry is never reused for them."""
  from moejax.parallel import targets  # pylint: disable=import-outside-toplevel
  cfg = config_lib.validate(tiny_cfg)
  auto = config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'model.attention': 'auto'}))
  tpu, gpu = targets.parse('tpu:v5p-8'), targets.parse('gpu:h100x8')
  keys = {compile_steps._key(c, t, r, m, 8, scan)  # pylint: disable=protected-access
          for c in (cfg, auto) for t in (tpu, gpu) for r in ('none', 'full') for m in (1, 2) for scan in (False, True)}
  assert len(keys) == 2 * 2 * 2 * 2 * 2
  assert 'attention splash' in compile_steps._key(auto, tpu, 'none', 1, 4)  # pylint: disable=protected-access


def test_a_host_out_of_memory_is_not_cached_as_not_fitting(tiny_cfg, monkeypatch):
  def host_oom(*a, **k):
    raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1234 bytes (host)')
  monkeypatch.setattr(compile_steps, 'fit_row', host_oom)
  store = {}
  with pytest.raises(RuntimeError, match='host'):
    compile_steps.search(config_lib.validate(tiny_cfg), 'gpu:h100', 1, 0.9, store)
  assert store == {}


def test_steps_compile_eval_and_decode_once_at_the_fitting_setting(tiny_cfg, monkeypatch):
  """With steps=True the eval and decode steps are compiled at the row that fits (its devices, remat,
  microbatches and scan), cached beside it (a second search compiles nothing), and a decode step the
  compiler refuses for memory is shown as such, not raised."""
  calls, store, compiled = [], {}, []
  _fake_rows(monkeypatch, lambda d, r: 50.0 if d >= 16 else 90.0, calls)

  def fake_eval(cfg, target):
    compiled.append(('eval', target.name, cfg.mesh.fsdp, cfg.eval.batch_size, cfg.model.remat))
    return {'peak_bytes': 20e9, 'temp_bytes': 5e9, 'compile_s': 3.0, 'compiler': 'fake'}

  def fake_decode(cfg, target, batch):
    compiled.append(('decode', target.name, cfg.mesh.fsdp, batch, cfg.model.remat))
    raise RuntimeError('RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm')
  monkeypatch.setattr(compile_steps, 'compile_eval', fake_eval)
  monkeypatch.setattr(compile_steps, 'compile_decode', fake_decode)
  cfg = config_lib.validate(tiny_cfg)
  result = compile_steps.search(cfg, 'gpu:h100', 1, 0.9, store, steps=True)
  assert result['fits']['target'] == 'gpu:h100x8x2' and result['fits']['remat'] == 'none'
  assert compiled == [('eval', 'gpu:h100x8x2', 16, 16, 'none'), ('decode', 'gpu:h100x8x2', 16, 16, 'none')]
  assert result['steps']['eval']['peak_gb'] == 20.0 and result['steps']['decode']['peak_gb'] is None
  row = compile_steps.steps_row(cfg, result)
  assert '| 20.0 (3 s) | compiler out of memory |' in row
  compiled.clear()
  again = compile_steps.search(cfg, 'gpu:h100', 1, 0.9, store, steps=True)
  assert compiled == [] and again['steps'] == result['steps']
  assert 'steps' not in compile_steps.search(cfg, 'gpu:h100', 1, 0.9, store)


def test_the_decode_cache_is_split_over_the_devices(tiny_cfg):
  """One sequence per device: 4 more sequences on 4 devices add one sequence's KV cache per device (a
  replicated cache would add four)."""
  cfg = compile_steps._fit_cfg(tiny_cfg, 4)  # pylint: disable=protected-access
  m = cfg.model
  sequence = 2 * m.num_kv_heads * cfg.data.seq_len * (m.head_dim or m.model_dim // m.num_heads) * 4 * m.num_layers
  four, eight = (compile_steps.compile_decode(cfg, None, b)['argument_bytes'] for b in (4, 8))
  assert eight - four == pytest.approx(sequence, rel=0.01)


def test_unknown_memory_never_fits_and_undecodable_configs_skip_the_decode_step(tiny_cfg, monkeypatch):
  """A compile without a memory analysis (peak None, no error) is 'no memory analysis', not a fit; an expert-choice
  model (which cannot decode) gets no decode step instead of stopping the search."""
  def no_analysis(cfg, target, devices, remat=None, microbatches=1, scan=None):
    return {'name': cfg.name, 'target': target.name, 'devices': devices, 'remat': remat, 'scan_layers': scan,
            'microbatches': microbatches, 'attention': 'auto', 'peak_gb': None, 'analytic_gb': 1.0, 'compile_s': 1.0,
            'compiler': 'fake'}
  monkeypatch.setattr(compile_steps, 'fit_row', no_analysis)
  cfg = config_lib.validate(tiny_cfg)
  result = compile_steps.search(cfg, 'gpu:h100', 1, 0.9, {})
  assert result['fits'] is None and 'no memory analysis' in compile_steps.search_row(cfg, 'gpu:h100', 1, result)
  ec = config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'moe.routing': 'expert_choice', 'moe.load_balancing': 'none'}))
  assert not compile_steps._decodable(ec) and compile_steps._decodable(cfg)  # pylint: disable=protected-access

"""Training loop: exact resume, NaN stop, SIGTERM, corrupt checkpoints, and eval against a hand computation."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib, data

from moejax.train import run as run_lib
from moejax.train import checkpoint
from moejax.train import evaluate as eval_lib
from moejax.train import evaluate as eval_lib
from moejax.train import loop as loop_lib
from moejax.train import state as state_lib
from moejax.train import step as step_lib
from moejax.errors import Interrupted, NonFiniteLossError, Preempted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def test_resume_is_bitwise_equal_to_uninterrupted_run(tiny_cfg, tmp_path):
  straight = loop_lib.run(tiny_cfg, str(tmp_path / 'a'))
  loop_lib.run(tiny_cfg, str(tmp_path / 'b'), stop_after=3)
  assert sorted(_losses(tmp_path / 'b')) == [1, 2, 3]
  resumed = loop_lib.run(tiny_cfg, str(tmp_path / 'b'))
  assert straight['steps'] == resumed['steps'] == 6
  a, b = _losses(tmp_path / 'a'), _losses(tmp_path / 'b')
  assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # exact float equality
  for x, y in zip(jax.tree.leaves(straight['setup'].state['params']), jax.tree.leaves(resumed['setup'].state['params'])):
    np.testing.assert_array_equal(x, y)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
  make = step_lib.make_train_step

  def poisoned(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def step(state, tokens, seed, lr):
      new_state, out = step_fn(state, tokens, seed, lr)
      if int(new_state['step']) >= 5:  # the 5th step blows up
        new_state['params'] = jax.tree.map(lambda p: p * jnp.nan, new_state['params'])
        out = dict(out, loss=jnp.float32(jnp.nan))
      return new_state, out
    return step

  monkeypatch.setattr(step_lib, 'make_train_step', poisoned)
  monkeypatch.setattr(step_lib, '_STEP_CACHE', step_lib.collections.OrderedDict())
  with pytest.raises(NonFiniteLossError, match='at step 5'):
    loop_lib.run(tiny_cfg, str(tmp_path))
  s = state_lib.setup(tiny_cfg)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  step, state, _ = ckpt.restore_latest(checkpoint.abstract(s.state))
  ckpt.close()
  assert step == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


def test_corrupt_latest_checkpoint_is_moved_aside_and_the_run_finishes(tiny_cfg, tmp_path):
  straight = loop_lib.run(tiny_cfg, str(tmp_path / 'a'))
  ckdir = tmp_path / 'a' / 'checkpoints'
  assert sorted(os.listdir(ckdir)) == ['3', '6']
  for dirpath, _, files in os.walk(ckdir / '6' / 'state'):
    for f in files:
      with open(os.path.join(dirpath, f), 'wb') as fh:
        fh.write(b'garbage')
  # Before the fix the rerun retrained from step 3, then failed on saving step 6 again, forever.
  again = loop_lib.run(tiny_cfg, str(tmp_path / 'a'))
  assert again['steps'] == 6 and sorted(os.listdir(ckdir)) == ['3', '6']
  assert os.listdir(tmp_path / 'a' / 'checkpoints-unreadable') == ['6']
  for x, y in zip(jax.tree.leaves(straight['setup'].state['params']), jax.tree.leaves(again['setup'].state['params'])):
    np.testing.assert_array_equal(x, y)  # steps 4..6 retrained from step 3, bit for bit


def _poison(monkeypatch, at_step, **out_overrides):
  """Makes the train step produce NaN parameters from `at_step` on, with `out_overrides` in its metrics."""
  make = step_lib.make_train_step

  def poisoned(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def step(state, tokens, seed, lr):
      new_state, out = step_fn(state, tokens, seed, lr)
      if int(new_state['step']) >= at_step:
        new_state['params'] = jax.tree.map(lambda p: p * jnp.nan, new_state['params'])
        out = dict(out, **{k: jnp.float32(v) for k, v in out_overrides.items()})
      return new_state, out
    return step

  monkeypatch.setattr(step_lib, 'make_train_step', poisoned)
  monkeypatch.setattr(step_lib, '_STEP_CACHE', step_lib.collections.OrderedDict())


@pytest.mark.parametrize('overrides,message', [({'grad_norm': np.inf}, 'gradient norm is inf at step 3'),
                                               ({}, 'parameters or optimizer state are not finite at step 3')])
def test_nan_parameters_behind_a_finite_loss_are_never_saved(tiny_cfg, tmp_path, monkeypatch, overrides, message):
  # An infinite gradient gives a finite loss and NaN parameters; the checkpoint at step 3 must not hold them.
  _poison(monkeypatch, 3, **overrides)
  with pytest.raises(NonFiniteLossError, match=message):
    loop_lib.run(tiny_cfg, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists() or os.listdir(tmp_path / 'checkpoints') == []


def test_ctrl_c_saves_a_checkpoint_and_a_second_aborts(tiny_cfg, tmp_path, monkeypatch):
  make = step_lib.make_train_step
  presses = {}
  before = signal.getsignal(signal.SIGINT)  # (SIG_IGN when the suite runs as a background job)

  def pressing(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def step(state, tokens, seed, lr):
      new_state, out = step_fn(state, tokens, seed, lr)
      for _ in range(presses.get(int(new_state['step']), 0)):
        os.kill(os.getpid(), signal.SIGINT)
      return new_state, out
    return step

  monkeypatch.setattr(step_lib, 'make_train_step', pressing)
  monkeypatch.setattr(step_lib, '_STEP_CACHE', step_lib.collections.OrderedDict())
  presses[2] = 1
  with pytest.raises(Interrupted, match='Ctrl-C at step 2: checkpoint step 2'):
    loop_lib.run(tiny_cfg, str(tmp_path / 'once'))
  assert os.listdir(tmp_path / 'once' / 'checkpoints') == ['2']
  presses.clear()
  assert loop_lib.run(tiny_cfg, str(tmp_path / 'once'))['steps'] == 6  # resumes
  presses[2] = 2
  with pytest.raises(KeyboardInterrupt):
    loop_lib.run(tiny_cfg, str(tmp_path / 'twice'))
  assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_periodic_heldout_scores_give_a_learning_curve(tiny_cfg, tmp_path):
  cfg = config_lib.apply_overrides(tiny_cfg, {'eval.every_steps': 2})
  record = run_lib.execute(cfg, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  scored = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in scored] == [2, 4]  # the end is scored once, into result.json
  assert [c['step'] for c in record['eval_curve']] == [2, 4] and record['eval_curve'][0]['tokens'] == 2 * 4 * 16
  assert scored[0]['eval_loss'] > scored[1]['eval_loss'] > record['eval']['loss'] - 0.05
  assert all(r['tokens_per_s'] > 0 for r in rows if 'tokens_per_s' in r) and 'tokens_per_s' not in rows[0]


def test_eval_equals_hand_computed_cross_entropy(tiny_cfg):
  cfg = config_lib.apply_overrides(tiny_cfg, {'eval.max_batches': 2})
  s = state_lib.setup(cfg)
  got = eval_lib.evaluate(s)
  model = nnx.merge(s.graphdef, s.state['params'])
  forward = jax.jit(lambda x: model(x)[0])  # the plain model, outside the eval step (eager takes 20 s)
  nats, count, byte_count = 0.0, 0.0, 0.0
  for batch in data.heldout_batches(s.corpus, cfg.data.seq_len, cfg.eval.batch_size, 2):
    logits = np.asarray(forward(jnp.asarray(batch['inputs'])), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
    nats += float((nll * batch['weights']).sum())
    count += float(batch['weights'].sum())
    byte_count += float((batch['weights'] * (batch['targets'] < 256)).sum())
  assert got['tokens'] == count == 2 * 4 * 16
  assert got['loss'] == pytest.approx(nats / count, rel=1e-5)
  assert got['bits_per_byte'] == pytest.approx(nats / np.log(2) / byte_count, rel=1e-5)


def test_sigterm_saves_restorable_checkpoint(corpus_glob, tmp_path):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'moejax.main', f'--config=tests/testdata/tiny.py:{corpus_glob}',
         f'--workdir={workdir}', '--config.train.steps=100000', '--config.checkpoint.every_steps=100000']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 120
  while not (metrics.exists() and metrics.stat().st_size > 0):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143
  assert 'moejax: error: SIGTERM at step' in err
  # Start-up is visible: the corpus, the model, the compile; the MFU note comes once.
  for needle in ('moejax corpus text:', 'moejax model tiny: N_total', 'compiled and ran in'):
    assert needle in err, err
  assert err.count('MFU is not reported') == 1 and 'peak unknown' not in err
  steps = os.listdir(workdir / 'checkpoints')
  assert len(steps) == 1 and int(steps[0]) >= 1
  result = subprocess.run(cmd + ['--mode=eval'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  record = json.loads((workdir / 'result.json').read_text())
  assert record['train']['steps'] == int(steps[0]) and np.isfinite(record['eval']['loss'])


def test_sharded_mesh_training_matches_single_device(tiny_cfg, tmp_path):
  cfg = config_lib.apply_overrides(tiny_cfg, {'train.steps': 3, 'model.num_kv_heads': 2})
  sharded = config_lib.apply_overrides(cfg, {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  one = loop_lib.run(cfg, str(tmp_path / 'one'))
  many = loop_lib.run(sharded, str(tmp_path / 'many'))
  spec = many['setup'].state['params']['blocks'][0]['attn']['wq'].sharding.spec
  assert tuple(spec)[:2] == ('fsdp', 'tensor')  # still sharded after 3 steps
  mu = many['setup'].state['opt_state'][1][0].mu['blocks'][0]['attn']['wq']  # Adam moments shard like params
  assert mu.sharding.spec == spec
  assert step_lib.cached_train_step(many['setup'])._cache_size() == 1  # pylint: disable=protected-access
  a, b = _losses(tmp_path / 'one'), _losses(tmp_path / 'many')
  np.testing.assert_allclose([a[s] for s in (1, 2, 3)], [b[s] for s in (1, 2, 3)], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(one['setup'].state['params']), jax.tree.leaves(many['setup'].state['params'])):
    # Shards sum in another order; Adam's 1/sqrt(v) scaling amplifies that to ~3e-6 after 3 steps,
    # while one update moves weights by ~peak_learning_rate = 2e-3.
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5)


def test_runs_differing_only_in_seed_share_one_compiled_step(tiny_cfg, tmp_path, monkeypatch):
  monkeypatch.setattr(step_lib, '_STEP_CACHE', step_lib.collections.OrderedDict())
  first = loop_lib.run(tiny_cfg, str(tmp_path / 'seed0'))
  step_fn = step_lib.cached_train_step(first["setup"])
  assert step_fn._cache_size() == 1  # pylint: disable=protected-access  (every step of a run: one executable)
  other = config_lib.apply_overrides(tiny_cfg, {'seed': 1, 'name': 'other', 'train.log_every_steps': 2})
  second = loop_lib.run(other, str(tmp_path / 'seed1'))
  assert step_lib.cached_train_step(second['setup']) is step_fn
  assert step_fn._cache_size() == 1  # pylint: disable=protected-access  (the second seed: no new trace)
  assert _losses(tmp_path / 'seed0')[6] != _losses(tmp_path / 'seed1')[6]  # the seed is still used
  # A fresh cache gives bit-identical results: sharing the step leaks nothing between runs.
  monkeypatch.setattr(step_lib, '_STEP_CACHE', step_lib.collections.OrderedDict())
  loop_lib.run(tiny_cfg, str(tmp_path / 'again'))
  assert _losses(tmp_path / 'again') == _losses(tmp_path / 'seed0')
  # A change that alters the step (here the optimizer) compiles a new one.
  changed = config_lib.apply_overrides(tiny_cfg, {'optim.weight_decay': 0.5})
  assert step_lib.step_key(changed) != step_lib.step_key(tiny_cfg) == step_lib.step_key(other)


def _branched(cfg, **extra):
  return config_lib.validate(config_lib.apply_overrides(cfg, {
      'train.steps': 8, 'optim.schedule': 'wsd', 'optim.warmup_fraction': 0.25, 'optim.decay_fraction': 0.25,
      'checkpoint.every_steps': 4, **extra}))


def test_decay_branch_equals_a_separate_shorter_run_and_leaves_the_main_run_alone(tiny_cfg, tmp_path):
  cfg = _branched(tiny_cfg)
  plain = run_lib.execute(cfg, str(tmp_path / 'plain'))
  branched = run_lib.execute(_branched(tiny_cfg, **{'optim.decay_branches': '0.75'}), str(tmp_path / 'branched'))
  # The branch (decay from step 4 to 6) rewinds the data iterator: the main run sees the same batches.
  assert _losses(tmp_path / 'plain') == _losses(tmp_path / 'branched')
  assert branched['eval']['loss'] == plain['eval']['loss']
  # ... and it equals a 6-step WSD run with the same warmup (2 steps) and decay (2 steps).
  short = run_lib.execute(_branched(tiny_cfg, **{'train.steps': 6, 'optim.warmup_fraction': 2 / 6}),
                           str(tmp_path / 'short'))
  curve = branched['decay_curve']
  assert [p['step'] for p in curve] == [6, 8] and plain['decay_curve'] == [
      {'step': 8, 'tokens': 8 * 4 * 16, 'loss': plain['eval']['loss'], 'bits_per_byte': plain['eval']['bits_per_byte']}]
  assert curve[0]['loss'] == pytest.approx(short['eval']['loss'], rel=1e-6)
  assert curve[0]['tokens'] == 6 * 4 * 16 and curve[1]['loss'] == branched['eval']['loss']


def test_decay_branch_interrupted_by_sigterm_reruns_on_resume(tiny_cfg, tmp_path, monkeypatch):
  cfg = _branched(tiny_cfg, **{'optim.decay_branches': '0.75'})
  straight = run_lib.execute(cfg, str(tmp_path / 'a'))
  make, signals = step_lib.make_train_step, {'sent': False}

  def terminating(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def step(state, tokens, seed, lr):
      new_state, out = step_fn(state, tokens, seed, lr)
      if int(new_state['step']) == 5 and not signals['sent']:  # the branch's first step (decay from step 4)
        signals['sent'] = True
        os.kill(os.getpid(), signal.SIGTERM)
      return new_state, out
    return step

  monkeypatch.setattr(step_lib, 'make_train_step', terminating)
  monkeypatch.setattr(step_lib, '_STEP_CACHE', step_lib.collections.OrderedDict())
  with pytest.raises(Preempted, match='at step 4'):  # the branch is abandoned; the main state at 4 is saved
    loop_lib.run(cfg, str(tmp_path / 'b'))
  assert not any('branch_eval_loss' in json.loads(line) for line in open(tmp_path / 'b' / 'metrics.jsonl'))
  resumed = run_lib.execute(cfg, str(tmp_path / 'b'))  # resumes at step 4 and runs the branch first
  assert [p['loss'] for p in resumed['decay_curve']] == [p['loss'] for p in straight['decay_curve']]
  assert _losses(tmp_path / 'b') == _losses(tmp_path / 'a')


def test_learning_rate_sweeps_and_run_lengths_share_one_compiled_step(tiny_cfg):
  other = config_lib.apply_overrides(tiny_cfg, {'optim.peak_learning_rate': 5e-3, 'train.steps': 9,
                                                'optim.schedule': 'wsd', 'optim.decay_branches': '0.5'})
  assert step_lib.step_key(other) == step_lib.step_key(tiny_cfg)

"""Scanned layers, rematerialization and gradient accumulation equal the plain model and step (issue 31)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.model import stack
from moejax.model import transformer as model_lib
from moejax.parallel import mesh as mesh_lib
from moejax.studies import render, results
from moejax.train import accumulate, optim
from moejax.train import loop as loop_lib
from moejax.train import record as record_lib
from moejax.train import restore as restore_lib
from moejax.train import state as state_lib
from moejax.train import step as step_lib


def _mixed(cfg, **overrides):
  """A 5-layer D M D M D pattern (first dense layer, MoE every other layer) with router jitter."""
  cfg = config_lib.apply_overrides(cfg.copy_and_resolve_references(), {
      'model.num_layers': 5, 'moe.first_dense_layers': 1, 'moe.every_n_layers': 2, 'moe.router_jitter': 0.1,
      **overrides})
  return config_lib.validate(cfg)


def test_periods_cover_the_layer_pattern_in_order():
  assert stack.periods(list('DMDMDM')) == [(0, 2, 3)]
  assert stack.periods(list('DDMMM')) == [(0, 1, 2), (2, 1, 3)]
  assert stack.periods(list('DMDMD')) == [(0, 2, 2), (4, 1, 1)]
  assert stack.periods(list('MDM')) == [(0, 1, 1), (1, 1, 1), (2, 1, 1)]


def _loss_and_grads(cfg, tokens_BL):
  graphdef, params, buffers = model_lib.split(model_lib.build(cfg))

  def f(p):
    logits_BLV, aux = nnx.merge(graphdef, p, buffers)(tokens_BL, train=True, rng=jax.random.key(3))
    return jnp.mean(logits_BLV ** 2) + aux['aux_loss'] + aux['z_loss'], (logits_BLV, aux['expert_counts'])

  return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


@pytest.mark.parametrize('scan,remat', [pytest.param(True, 'none', marks=pytest.mark.slow),
                                         pytest.param(False, 'full', marks=pytest.mark.slow), (True, 'moe')])
def test_scanned_and_rematerialized_blocks_give_the_unrolled_logits_and_gradients(tiny_cfg, scan, remat):
  tokens_BL = jax.random.randint(jax.random.key(1), (2, 8), 0, tiny_cfg.model.vocab_size)
  cfg = _mixed(tiny_cfg)
  (loss, (logits, counts)), grads = _loss_and_grads(cfg, tokens_BL)
  (loss2, (logits2, counts2)), grads2 = _loss_and_grads(_mixed(tiny_cfg, **{'model.scan_layers': scan,
                                                                           'model.remat': remat}), tokens_BL)
  np.testing.assert_array_equal(counts, counts2)
  np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  spans = stack.storage_spans(_mixed(tiny_cfg, **{'model.scan_layers': scan}))
  grads, grads2 = nnx.to_pure_dict(grads), stack.to_layers(nnx.to_pure_dict(grads2), spans)  # stored stacked
  assert jax.tree.structure(grads) == jax.tree.structure(grads2)
  for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
    np.testing.assert_allclose(g2, g, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(g))))


def test_scanned_models_store_each_period_stacked_initialized_as_unrolled(tiny_cfg):
  """D M D M D scanned: (D M) x 2 is stored as two blocks of 2 stacked layers, the last D alone; per layer the values
  are the unrolled model's (same initialization), to_stacked inverts to_layers, and the stacked model refuses to
  decode in one line while the unscanned model built from the same config decodes the per-layer tree."""
  cfg, scanned = _mixed(tiny_cfg), _mixed(tiny_cfg, **{'model.scan_layers': True, 'model.remat': 'full'})
  spans = stack.storage_spans(scanned)
  assert spans == ((0, 2, 2), (4, 1, 1)) and stack.storage_spans(cfg) is None
  _, flat, _ = model_lib.split(model_lib.build(cfg))
  _, stored, _ = model_lib.split(model_lib.build(scanned))
  flat, stored = nnx.to_pure_dict(flat), nnx.to_pure_dict(stored)
  assert sorted(stored['blocks']) == [0, 1, 2] and sorted(flat['blocks']) == [0, 1, 2, 3, 4]
  assert stored['blocks'][0]['attn']['wq'].shape == (2,) + flat['blocks'][0]['attn']['wq'].shape
  assert jax.tree.structure(stack.to_layers(stored, spans)) == jax.tree.structure(flat)
  for x, y in zip(jax.tree.leaves(stack.to_layers(stored, spans)), jax.tree.leaves(flat)):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(stack.to_stacked(flat, spans)), jax.tree.leaves(stored)):
    np.testing.assert_array_equal(x, y)
  axes = mesh_lib.logical_axes_tree(model_lib.split(model_lib.build(scanned))[1])
  assert axes['blocks'][0]['attn']['wq'][0] == 'layers' and axes['blocks'][2]['attn']['wq'][0] != 'layers'
  model = model_lib.build(scanned)
  tokens_BL = jax.random.randint(jax.random.key(2), (1, 6), 0, cfg.model.vocab_size)
  full, _ = model(tokens_BL)
  with pytest.raises(ConfigError, match='cannot decode'):
    model(tokens_BL, positions_BL=jnp.arange(6)[None], cache=model.init_cache(1, 8))
  graphdef, _, buffers = model_lib.split(model_lib.build(stack.unscanned(scanned)))
  unrolled = nnx.merge(graphdef, nnx.State(stack.to_layers(stored, spans)), buffers)
  logits, _, _ = unrolled(tokens_BL, positions_BL=jnp.arange(6)[None], cache=unrolled.init_cache(1, 8))
  np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_checkpoint_resumes_across_scan_and_remat(tiny_cfg, tmp_path):
  straight = loop_lib.run(tiny_cfg, str(tmp_path / 'a'))
  loop_lib.run(tiny_cfg, str(tmp_path / 'b'), stop_after=3)
  switched = config_lib.apply_overrides(tiny_cfg.copy_and_resolve_references(),
                                        {'model.scan_layers': True, 'model.remat': 'moe'})
  resumed = loop_lib.run(config_lib.validate(switched), str(tmp_path / 'b'), stop_after=5)  # unrolled -> scanned
  assert resumed['steps'] == 5
  back = loop_lib.run(tiny_cfg, str(tmp_path / 'b'))  # scanned -> unrolled: checkpoints are per layer either way
  assert back['steps'] == 6
  for x, y in zip(jax.tree.leaves(straight['setup'].state['params']), jax.tree.leaves(back['setup'].state['params'])):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


def _one_step(cfg, tokens_BL1, opt=None):
  """One train step from the initial state; plain SGD by default, so the new params are params - lr * grads."""
  graphdef, params, buffers = model_lib.split(model_lib.build(cfg))
  opt = opt or optax.sgd(1.0)
  p = nnx.to_pure_dict(params)
  state = {'params': p, 'buffers': nnx.to_pure_dict(buffers), 'opt_state': opt.init(p), 'step': jnp.int32(0)}
  step = step_lib.make_train_step(graphdef, opt, cfg)
  return step(state, tokens_BL1, jnp.int32(0), jnp.float32(1e-2))


@pytest.mark.parametrize('overrides', [
    {},  # global-batch load balancing: the whole batch's expert fractions
    pytest.param({'moe.load_balancing': 'aux_free', 'moe.aux_free_sequence_coef': 1e-2},  # bias update from summed counts
                 marks=pytest.mark.slow),
    pytest.param({'moe.train_capacity_factor': 1.0, 'moe.capacity_group_tokens': 16},  # drops: one sequence per group
                 marks=pytest.mark.slow),
])
def test_microbatches_give_the_whole_batch_step(tiny_cfg, overrides):
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg.copy_and_resolve_references(),
                                                       {'train.batch_size': 8, 'moe.aux_loss_coef': 1.0, **overrides}))
  tokens_BL1 = jax.random.randint(jax.random.key(5), (8, cfg.data.seq_len + 1), 0, cfg.model.vocab_size)
  whole_state, whole = _one_step(cfg, tokens_BL1)
  micro_cfg = config_lib.validate(config_lib.apply_overrides(cfg.copy_and_resolve_references(),
                                                             {'train.microbatches': 4}))
  micro_state, micro = _one_step(micro_cfg, tokens_BL1)
  for key in ('loss', 'ce', 'aux_loss', 'z_loss', 'grad_norm', 'expert_counts', 'load_max_over_mean', 'dead_experts',
              'drop_fraction', 'router_entropy', 'aux_loss_per_layer', 'z_loss_per_layer', 'bias_abs_mean'):
    np.testing.assert_allclose(micro[key], whole[key], rtol=2e-6, atol=1e-7, err_msg=key)
  for x, y in zip(jax.tree.leaves(whole_state), jax.tree.leaves(micro_state)):  # params - lr * grads, buffers
    np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_a_mean_of_microbatch_balance_losses_is_not_the_global_one(tiny_cfg):
  """The pre-pass matters: per-microbatch fractions give another loss (the approximation peers make)."""
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg.copy_and_resolve_references(), {'train.batch_size': 8}))
  graphdef, params, buffers = model_lib.split(model_lib.build(cfg))
  tokens_BL = jax.random.randint(jax.random.key(5), (8, cfg.data.seq_len), 0, cfg.model.vocab_size)
  model = nnx.merge(graphdef, params, buffers)
  whole = model(tokens_BL)[1]['aux_loss']
  per_micro = jnp.mean(jnp.stack([model(tokens_BL[i:i + 2])[1]['aux_loss'] for i in range(0, 8, 2)]))
  assert abs(float(per_micro) - float(whole)) > 1e-4


def test_the_defaults_take_the_plain_code_path(tiny_cfg, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('not the default path')
  monkeypatch.setattr(accumulate, 'value_and_grad', refuse)
  monkeypatch.setattr(stack, 'run', refuse)
  tokens_BL1 = jax.random.randint(jax.random.key(5), (4, tiny_cfg.data.seq_len + 1), 0, tiny_cfg.model.vocab_size)
  _, out = _one_step(tiny_cfg, tokens_BL1, optim.make(tiny_cfg.optim))
  assert np.isfinite(float(out['loss']))


@pytest.mark.parametrize('overrides,message', [
    ({'train.microbatches': 3}, 'train.microbatches=3 must divide train.batch_size=4'),
    ({'train.microbatches': 2, 'mesh.data': 4}, 'must be divisible by the batch axes'),
    ({'train.microbatches': 2, 'moe.train_capacity_factor': 1.0}, 'needs moe.capacity_group_tokens'),
    ({'train.microbatches': 2, 'moe.dispatch': 'capacity', 'moe.capacity_group_tokens': 64},
     'needs moe.capacity_group_tokens dividing'),
    ({'train.microbatches': 2, 'moe.routing': 'expert_choice', 'moe.load_balancing': 'none'},
     "with moe.routing='expert_choice' would change the update"),
    ({'model.remat': 'some'}, "model.remat='some' must be one of"),
])
def test_bad_scale_keys_are_one_line_errors(tiny_cfg, overrides, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config_lib.apply_overrides(tiny_cfg.copy_and_resolve_references(), overrides))


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f) if 'loss' in r}


@pytest.mark.slow
def test_training_routing_reaches_result_json_and_the_results_table(tiny_cfg, tmp_path):
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg.copy_and_resolve_references(), {
      'train.steps': 20, 'checkpoint.every_steps': 19, 'moe.train_capacity_factor': 1.0}))
  straight = loop_lib.run(cfg, str(tmp_path / 'a'))
  summary = straight['routing']
  assert summary['window'] == [19, 20] and summary['steps'] == 2
  rows = _metrics(tmp_path / 'a')  # the trajectory: every logged step, per layer
  for key in record_lib.TRAIN_ROUTING[:1] + record_lib.TRAIN_ROUTING[2:]:
    expected = np.mean([rows[19][key], rows[20][key]], axis=0)
    np.testing.assert_allclose([layer[key] for layer in summary['layers']], expected, rtol=1e-6, err_msg=key)
  assert summary['mean']['drop_fraction'] > 0  # capacity factor 1: some assignments dropped in training
  loop_lib.run(cfg, str(tmp_path / 'b'), stop_after=19)  # resumed inside the window: the partial sums travel
  assert loop_lib.run(cfg, str(tmp_path / 'b'))['routing'] == summary
  rec = record_lib.result_record(straight['setup'], {'loss': 1.0, 'bits_per_byte': 1.0}, straight, [], str(tmp_path))
  assert rec['train']['routing']['layers'][0]['drop_fraction'] == summary['layers'][0]['drop_fraction']
  rec['_path'] = str(tmp_path)
  (row,), _ = results.table([rec])
  assert row['train_drop_fraction'] == pytest.approx(summary['mean']['drop_fraction'])
  assert 'train dropped' in render.results_markdown([row], [])


@pytest.mark.slow
def test_microbatches_on_a_mesh_give_the_one_device_step(tiny_cfg):
  """Each microbatch is split over the batch axes; the accumulator shards like the parameters."""
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg.copy_and_resolve_references(), {'train.batch_size': 8}))
  tokens_BL1 = jax.random.randint(jax.random.key(5), (8, cfg.data.seq_len + 1), 0, cfg.model.vocab_size)
  _, whole = _one_step(cfg, tokens_BL1, optim.make(cfg.optim))
  meshed = config_lib.validate(config_lib.apply_overrides(cfg.copy_and_resolve_references(), {
      'train.microbatches': 2, 'mesh.data': 2, 'mesh.fsdp': 2}))
  s = state_lib.setup(meshed)
  step = step_lib.make_train_step(s.graphdef, optim.make(meshed.optim, stack.storage_spans(meshed)), meshed,
                                 state_lib.shardings(s.state), s.mesh)
  tokens = jax.device_put(tokens_BL1, mesh_lib.batch_sharding(s.mesh, 2))
  state, out = step(s.state, tokens, jnp.int32(0), jnp.float32(1e-2))
  assert jax.tree.leaves(state['params'])[0].sharding.mesh.shape == s.mesh.shape
  for key in ('loss', 'aux_loss', 'grad_norm', 'expert_counts'):
    np.testing.assert_allclose(out[key], whole[key], rtol=1e-5, err_msg=key)


def _scanned_on_fsdp(tiny_cfg, axis='fsdp'):
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg.copy_and_resolve_references(), {
      'train.batch_size': 4, 'model.num_layers': 3}))
  meshed = config_lib.validate(config_lib.apply_overrides(cfg.copy_and_resolve_references(), {
      'model.scan_layers': True, 'mesh.data': 1, f'mesh.{axis}': 4}))
  return cfg, meshed, state_lib.setup(meshed)


def test_scanned_layers_are_stored_sharded_as_their_layers_with_the_layers_axis_whole(tiny_cfg):
  """A stacked leaf on an fsdp mesh is sharded as its layers are, its leading 'layers' axis unsplit (before the layers
  were stored stacked, a stacked copy made at every call without a constraint was gathered whole under fsdp)."""
  _, _, s = _scanned_on_fsdp(tiny_cfg)
  stacked = s.state['params']['blocks'][0]['ffn']['experts'][0]['w_up']
  layer = stack.to_layers(s.state['params'], stack.storage_spans(s.cfg))['blocks'][0]['ffn']['experts'][0]['w_up']
  assert stacked.shape == (3,) + layer.shape
  assert stacked.sharding.spec[0] is None and tuple(stacked.sharding.spec[1:]) == tuple(layer.sharding.spec)
  assert 'fsdp' in str(stacked.sharding.spec)
  opt = jax.tree.leaves(s.state['opt_state'], is_leaf=lambda x: isinstance(x, dict) and 'blocks' in x)
  assert any(isinstance(t, dict) and t['blocks'][0]['ffn']['experts'][0]['w_up'].shape == stacked.shape for t in opt)  # moments too


@pytest.mark.slow  # three compiles on 4 devices: ~1-3 min on 2 cores
@pytest.mark.parametrize('axis', ['fsdp', 'expert'])  # the stacked expert weights split over the expert axis too
def test_scanned_step_on_an_fsdp_mesh_gives_the_one_device_step(tiny_cfg, axis):
  cfg, meshed, s = _scanned_on_fsdp(tiny_cfg, axis)
  tokens_BL1 = jax.random.randint(jax.random.key(6), (4, cfg.data.seq_len + 1), 0, cfg.model.vocab_size)
  _, whole = _one_step(cfg, tokens_BL1, optim.make(cfg.optim))
  step = step_lib.make_train_step(s.graphdef, optim.make(meshed.optim, stack.storage_spans(meshed)), meshed,
                                 state_lib.shardings(s.state), s.mesh)
  _, out = step(s.state, jax.device_put(tokens_BL1, mesh_lib.batch_sharding(s.mesh, 2)), jnp.int32(0),
                jnp.float32(1e-2))
  for key in ('loss', 'aux_loss', 'grad_norm'):
    np.testing.assert_allclose(out[key], whole[key], rtol=1e-5, err_msg=key)


def test_a_scanned_run_trains_as_the_unrolled_run(tiny_cfg, tmp_path):
  """Stored stacked, every per-layer rule still holds per layer: weight decay on matrices only (a stacked norm scale
  is 2-D: decaying it changed the parameters by 7e-4 in 6 steps) and the aux-free biases updated from each layer's
  counts. Parameters and biases after the run equal the unrolled run's to float32 rounding. The D M D M D pattern
  stores (D M) x 2 stacked and D alone, and the buffer tree holds the MoE blocks only (a dense entry is absent:
  the conversions crashed on it). A scanned --mode=eval restores the per-layer checkpoint into its stacked layout."""
  base = {'train.steps': 4, 'moe.load_balancing': 'aux_free', 'optim.weight_decay': 0.1, 'model.num_layers': 5,
          'moe.first_dense_layers': 1, 'moe.every_n_layers': 2}
  runs = []
  for scan in (False, True):
    cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg.copy_and_resolve_references(),
                                                         {**base, 'model.scan_layers': scan}))
    state = loop_lib.run(cfg, str(tmp_path / str(scan)))['setup'].state
    runs.append(stack.to_layers({'params': state['params'], 'buffers': state['buffers']}, stack.storage_spans(cfg)))
    s = state_lib.setup(cfg)
    _, restored = restore_lib.restore_state(s, str(tmp_path / str(scan)))  # (eval restores into the run's layout)
    for x, y in zip(jax.tree.leaves(restored['params']), jax.tree.leaves(state['params'])):
      np.testing.assert_array_equal(x, y)
  assert jax.tree.structure(runs[0]) == jax.tree.structure(runs[1])
  assert sorted(runs[1]['buffers']['blocks']) == [1, 3]  # the MoE layers' biases only
  assert float(jnp.max(jnp.abs(runs[0]['buffers']['blocks'][1]['ffn']['expert_bias']))) > 0  # the biases moved
  for x, y in zip(jax.tree.leaves(runs[1]), jax.tree.leaves(runs[0])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_weight_decay_skips_norm_scales_and_biases_of_any_rank(tiny_cfg):
  """OLMoE's projection-wide QK-norm scale and Qwen's attention biases are [H, K]: rank 2, yet not weight matrices
  (they were decayed); the matrices are, per layer, stacked or not."""
  for scan in (False, True):
    cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg.copy_and_resolve_references(), {
        'model.use_qk_norm': True, 'model.qk_norm_scope': 'projection', 'model.use_qkv_bias': True,
        'model.scan_layers': scan}))
    params = nnx.to_pure_dict(model_lib.split(model_lib.build(cfg))[1])
    mask = optim.decay_mask(stack.storage_spans(cfg))(params)
    attn = mask['blocks'][0]['attn']
    assert attn['wq'] and attn['wo'] and mask['blocks'][0]['ffn']['w_router']
    assert not attn['q_norm']['scale'] and not attn['bq'] and not attn['bv'] and not mask['blocks'][0]['attn_norm']['scale']


@pytest.mark.slow  # a run, an export and a load: ~10 s idle
def test_a_scanned_runs_checkpoint_exports_and_decodes_per_layer(tiny_cfg, tmp_path):
  """Export (`interop.exporter.restore_params`) and `restore.load_model` (generate, eval) read a scanned run's
  checkpoint per layer: the parameters are the run's, unstacked, and the loaded model decodes."""
  from moejax.interop import exporter  # pylint: disable=import-outside-toplevel
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg.copy_and_resolve_references(), {
      'train.steps': 2, 'model.scan_layers': True}))
  state = loop_lib.run(cfg, str(tmp_path))['setup'].state
  expected = stack.to_layers(jax.device_get(state['params']), stack.storage_spans(cfg))
  exported = exporter.restore_params(cfg, str(tmp_path))
  assert jax.tree.structure(exported) == jax.tree.structure(expected)
  for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(x, y)
  loaded_cfg, _, model = restore_lib.load_model(str(tmp_path))
  assert not loaded_cfg.model.scan_layers and model.spans is None
  tokens_BL = jnp.zeros((1, 4), jnp.int32)
  logits, _, _ = model(tokens_BL, positions_BL=jnp.arange(4)[None], cache=model.init_cache(1, 8))
  assert bool(jnp.all(jnp.isfinite(logits)))


def _live_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays())


def test_scanned_checkpoints_copy_only_stacked_leaves_and_a_resume_holds_one_state(tiny_cfg, tmp_path, monkeypatch):
  """Saving splits only the stacked leaves (the rest goes to Orbax as is); restoring deletes each leaf's per-layer
  rows as soon as it is stacked; a resume drops the fresh state before the checkpoint loads."""
  from moejax.train import checkpoint  # pylint: disable=import-outside-toplevel
  cfg = _mixed(tiny_cfg, **{'model.scan_layers': True})
  workdir = str(tmp_path / 'run')
  loop_lib.run(cfg, workdir, stop_after=2)
  s = state_lib.setup(cfg)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'c'), use_async=False, spans=stack.storage_spans(cfg))
  saved, restored = {}, {}
  save, restore = ckpt._mngr.save, ckpt._mngr.restore  # pylint: disable=protected-access
  monkeypatch.setattr(ckpt._mngr, 'save', lambda step, args=None, **kw: (saved.update(args['state'].item), save(step, args=args, **kw)))  # pylint: disable=protected-access
  monkeypatch.setattr(ckpt._mngr, 'restore', lambda *a, **kw: (out := restore(*a, **kw), restored.update(out['state']))[0])  # pylint: disable=protected-access
  ckpt.save(1, s.state, {})
  assert saved['params']['embed']['table'] is s.state['params']['embed']['table']  # an unstacked leaf: no device copy
  assert saved['step'] is s.state['step']
  leaves = jax.tree.leaves(saved)  # the split rows are freed once Orbax has them; the rest is the state's own
  assert 0 < sum(x.is_deleted() for x in leaves) < len(leaves) and not saved['step'].is_deleted()
  _, back, _ = ckpt.restore_latest(checkpoint.abstract(s.state))
  rows = [x for path, x in jax.tree_util.tree_leaves_with_path(restored) if "['blocks']" in jax.tree_util.keystr(path)]
  stacked_rows = [x for x in rows if x.is_deleted()]
  assert stacked_rows and len(stacked_rows) < len(rows)  # the rows of stacked leaves; layer 4 runs once, kept
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(s.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ckpt.close()

  # An asynchronous save frees its per-layer copies once Orbax holds them on the host (its writer thread would keep
  # them on the device while training goes on), and what it writes restores to the state.
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'a'), use_async=True, spans=stack.storage_spans(cfg))
  split_rows = []
  split = ckpt._split  # pylint: disable=protected-access
  monkeypatch.setattr(ckpt, '_split', lambda x, r, made: (out := split(x, r, made), split_rows.extend(out))[0])
  ckpt.save(1, s.state, {})
  assert split_rows and all(x.is_deleted() for x in split_rows)
  ckpt.wait()
  _, back, _ = ckpt.restore_latest(checkpoint.abstract(s.state))
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(s.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ckpt.close()

  state_bytes = sum(x.nbytes for x in jax.tree.leaves(s.state))
  del s, back, saved, restored, rows, stacked_rows, split_rows
  at_restore, shardings_given = [], []
  restore_latest = checkpoint.Checkpointer.restore_latest
  monkeypatch.setattr(checkpoint.Checkpointer, 'restore_latest',
                      lambda self, *a, **kw: (at_restore.append(_live_bytes()), restore_latest(self, *a, **kw))[1])
  make = step_lib.make_train_step
  monkeypatch.setattr(step_lib, 'make_train_step', lambda *a, **kw: (shardings_given.append(a[3]), make(*a, **kw))[1])
  step_lib._STEP_CACHE.clear()  # pylint: disable=protected-access  (a new process: the resumed run builds its step)
  before = _live_bytes()
  assert loop_lib.run(cfg, workdir, stop_after=3)['steps'] == 3
  assert at_restore[0] - before < state_bytes / 2  # the fresh state was dropped before the checkpoint loaded
  assert shardings_given and all(jax.tree.leaves(g) for g in shardings_given)  # the restored state's shardings

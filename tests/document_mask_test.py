"""data.document_mask: segment ids and positions of packed windows, a packed window equal to its
documents run one by one, routing statistics without padding, and held-out scoring with the mask."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib, data, routing
from moejax.data.corpus import SEPARATOR
from moejax.data.pipeline import Windows
from moejax.model import attention as attention_lib
from moejax.model import transformer as model_lib
from moejax.train import evaluate as eval_lib, state as state_lib
from moejax.train import optim, step as step_lib


def test_document_layout_by_hand():
  S = SEPARATOR
  tokens = np.array([[5, 6, S, 7, 8, 9, S, S, 4],
                     [S, 1, 2, 3, 4, 5, 6, 7, 8]])
  seg, pos = attention_lib.document_layout(tokens, S)
  assert seg.tolist() == [[1, 1, 2, 2, 2, 2, 3, 4, 4], [1] * 9]
  assert pos.tolist() == [[0, 1, 0, 1, 2, 3, 0, 0, 1], list(range(9))]


def test_pipeline_windows_carry_their_documents(corpus_glob):
  """Each training window's segment ids and positions, derived from its tokens, are the documents of the
  corpus stream at that offset; the windows and their order are the unmasked ones (the pipeline is unchanged)."""
  corpus = data.load_corpus(corpus_glob, 4000)
  L = 64
  stream = np.asarray(corpus.train_tokens, np.int64)
  doc_of_token = np.cumsum(stream == SEPARATOR)  # document index of every stream token (its separator starts it)
  last_sep = np.maximum.accumulate(np.where(stream == SEPARATOR, np.arange(stream.size), 0))
  dataset = data.train_dataset(corpus, L, 4, seed=0)
  batches = list(itertools.islice(iter(dataset), 3))
  windows = Windows(corpus.train_tokens, L)
  order = [int(np.flatnonzero([np.array_equal(windows[i], row) for i in range(len(windows))])[0])
           for row in batches[0]]
  for row, i in zip(batches[0], order):
    seg, pos = attention_lib.document_layout(row[None, :-1], SEPARATOR)
    span = np.arange(i * L, i * L + L)
    np.testing.assert_array_equal(seg[0], doc_of_token[span] - doc_of_token[i * L] + 1)
    np.testing.assert_array_equal(pos[0], span - np.maximum(last_sep[span], i * L))
  assert int(seg.max()) >= 1
  # Resume: the iterator state and the batches after it are those of the unmasked pipeline (the same dataset).
  it = iter(data.train_dataset(corpus, L, 4, seed=0))
  next(it)
  state = it.get_state()
  resumed = iter(data.train_dataset(corpus, L, 4, seed=0))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed), batches[1])


def _model(tiny_cfg, impl):
  cfg = config_lib.apply_overrides(tiny_cfg, {'model.attention': impl, 'model.attention_q_block': 8,
                                              'model.attention_kv_block': 8, 'data.document_mask': True})
  graphdef, params, buffers = model_lib.split(model_lib.build(config_lib.validate(cfg)))
  return nnx.merge(graphdef, params, buffers)


@pytest.mark.parametrize('impl', ['xla', pytest.param('blockwise', marks=pytest.mark.slow)])
def test_packed_window_equals_documents_one_by_one(tiny_cfg, impl):
  """The core test: logits of a packed window (a document's tail, two whole documents) with document
  masking equal each document's logits run alone; without masking they do not."""
  rng = np.random.RandomState(1)
  docs = [rng.randint(0, 256, 7), np.concatenate([[SEPARATOR], rng.randint(0, 256, 11)]),
          np.concatenate([[SEPARATOR], rng.randint(0, 256, 5)])]
  window = np.concatenate(docs)[None].astype(np.int32)
  model = _model(tiny_cfg, impl)
  packed = jax.jit(lambda t: model(t, **step_lib.document_kwargs(t, SEPARATOR))[0])(window)
  unmasked = jax.jit(lambda t: model(t)[0])(window)
  start = 0
  for doc in docs:
    alone = jax.jit(lambda t: model(t)[0])(doc[None].astype(np.int32))
    np.testing.assert_allclose(packed[:, start:start + doc.size], alone, atol=2e-5, rtol=1e-5)
    start += doc.size
  assert not np.allclose(unmasked[:, docs[0].size:], packed[:, docs[0].size:], atol=1e-3)


def test_masked_routing_ignores_invalid_tokens():
  """Statistics, losses and capacity with `valid_T` equal those of the valid tokens alone."""
  T, E, K = 24, 4, 2
  logits = jax.random.normal(jax.random.key(0), (T, E))
  probs = jax.nn.softmax(logits)
  experts = jax.lax.top_k(probs, K)[1]
  gates = jnp.take_along_axis(probs, experts, axis=-1)
  valid = jnp.arange(T) % 3 != 1
  idx = jnp.flatnonzero(valid)

  @jax.jit
  def both(logits, probs, experts, gates, valid, idx):
    out = {'stats': (routing.routing_stats(probs, experts, valid), routing.routing_stats(probs[idx], experts[idx])),
           'balance': (routing.load_balancing_loss(probs, experts, None, valid),
                       routing.load_balancing_loss(probs[idx], experts[idx])),
           'z': (routing.router_z_loss(logits, valid), routing.router_z_loss(logits[idx]))}
    for policy in ('position', 'probs'):  # capacity counted for the T tokens: the valid ones queue first
      keep, _ = routing.capacity_keep(experts, gates, E, 0.5, policy, None, valid)
      out[policy] = (keep[idx], routing.capacity_rank(experts[idx], gates[idx], E, policy) < routing.capacity(T, K, E, 0.5))
    return out

  out = both(logits, probs, experts, gates, valid, idx)
  for key in out['stats'][0]:
    np.testing.assert_allclose(out['stats'][0][key], out['stats'][1][key], rtol=1e-6)
  for key in ('balance', 'z'):
    np.testing.assert_allclose(*out[key], rtol=1e-6)
  for policy in ('position', 'probs'):
    np.testing.assert_array_equal(*out[policy])
    assert not bool(jnp.all(out[policy][0]))  # (capacity binds)


@pytest.mark.slow
def test_eval_with_document_mask_scores_the_same_tokens_and_skips_padding(tiny_cfg):
  """Held-out scoring with masking: the same scored tokens and bytes (bits per byte stays exact), and
  routing counts of the weighted tokens only (without masking the padded tail counts too)."""
  cfg = config_lib.apply_overrides(tiny_cfg, {'eval.batch_size': 64, 'eval.max_batches': None,
                                             'data.heldout_bytes': 20000, 'data.heldout_max_fraction': 0.5})
  results = {}
  for mask in (False, True):
    c = config_lib.validate(config_lib.apply_overrides(cfg, {'data.document_mask': mask}))
    s = state_lib.setup(c)  # (larger weights than at init, so that context visibly changes the logits)
    results[mask] = eval_lib.evaluate(s, dict(s.state, params=jax.tree.map(lambda x: 6 * x, s.state['params'])))
  plain, masked = results[False], results[True]
  assert masked['tokens'] == plain['tokens'] and masked['bytes'] == plain['bytes']
  assert np.isfinite(masked['loss']) and masked['loss'] != plain['loss']
  k = cfg.moe.experts_per_token
  windows = -(-plain['tokens'] // cfg.data.seq_len)
  padded = -(-windows // 64) * 64 * cfg.data.seq_len
  for layer_plain, layer_masked in zip(plain['routing']['layers'], masked['routing']['layers']):
    assert sum(layer_plain['tokens_per_expert']) == padded * k
    assert sum(layer_masked['tokens_per_expert']) == masked['tokens'] * k


@pytest.mark.slow
def test_train_step_with_document_mask(tiny_cfg):
  """The train step masks documents (its loss differs from the unmasked step's on the same batch) and all
  training tokens count in its routing statistics (windows have no padding); the default step is unchanged."""
  s = state_lib.setup(tiny_cfg)
  windows = Windows(s.corpus.train_tokens, 16)
  seps = np.flatnonzero(np.asarray(s.corpus.train_tokens[0:16 * len(windows)]) == SEPARATOR)
  tokens = jnp.asarray(np.stack([windows[i] for i in (seps[seps % 16 > 1] // 16)[:4]]))  # windows holding a boundary
  optimizer = step_lib.optim.make(tiny_cfg.optim)
  outs = {}
  for sep in (None, SEPARATOR):
    fn = step_lib.make_train_step(s.graphdef, optimizer, tiny_cfg, document_separator=sep)
    state = jax.tree.map(jnp.copy, s.state)
    outs[sep] = fn(state, tokens, jnp.int32(0), jnp.float32(1e-3))[1]
  assert bool(jnp.any(tokens == SEPARATOR))
  assert float(outs[None]['ce']) != float(outs[SEPARATOR]['ce'])
  np.testing.assert_array_equal(jnp.sum(outs[SEPARATOR]['expert_counts'], axis=-1), 4 * 16 * 2)
  args = (s.state, tokens, jnp.int32(0), jnp.float32(1e-3))
  jaxpr = lambda sep: str(jax.make_jaxpr(step_lib.make_train_step(s.graphdef, optimizer, tiny_cfg,
                                                                  document_separator=sep))(*args))
  assert 'cummax' not in jaxpr(None) and 'cummax' in jaxpr(SEPARATOR)  # (the default derives no segments)


@pytest.mark.slow
def test_scanned_and_rematerialized_models_keep_the_document_mask(tiny_cfg):
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'data.document_mask': True}))
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 200, (2, 16)), jnp.int32)
  segments = jnp.asarray([[1] * 6 + [2] * 10, [1] * 9 + [2] * 7], jnp.int32)
  positions = jnp.asarray([list(range(6)) + list(range(10)), list(range(9)) + list(range(7))], jnp.int32)
  plain = model_lib.build(cfg)
  want, _ = plain(tokens, segment_ids_BL=segments, positions_BL=positions)
  for overrides in ({'model.scan_layers': True}, {'model.remat': 'full'}):
    other = model_lib.build(config_lib.apply_overrides(cfg, overrides))
    got, _ = other(tokens, segment_ids_BL=segments, positions_BL=positions)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_microbatches_keep_the_document_mask(tiny_cfg):
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg, {'data.document_mask': True, 'train.batch_size': 4,
                                                                  'moe.router_jitter': 0.0}))
  tokens = np.random.default_rng(1).integers(1, 200, (4, cfg.data.seq_len + 1)).astype(np.int32)
  tokens[:, 5] = tokens[:, 11] = SEPARATOR  # documents inside every window
  losses = []
  for k in (1, 2):
    c = config_lib.validate(config_lib.apply_overrides(cfg, {'train.microbatches': k}))
    s = state_lib.setup(c, data.corpus_from_config(c.data))
    step = step_lib.make_train_step(s.graphdef, optim.make(c.optim), c, document_separator=SEPARATOR)
    _, out = step(s.state, jnp.asarray(tokens), jnp.int32(0), jnp.float32(1e-3))
    losses.append(float(out['ce']))
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)

"""KV-cache decoding against its reference twin, the full-sequence forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.inference import decode
from moejax.model import transformer as model_lib
from moejax.model import dispatch as dispatch_lib
from moejax.errors import ConfigError
from moejax.model.moe import MoE

DESIGNS = {
    'dense': {'moe.num_experts': 0},
    'moe': {},
    'shared_heterogeneous': {'moe.num_experts': 4, 'moe.expert_size_classes': '2x16,2x48',
                             'moe.num_shared_experts': 1, 'moe.use_shared_expert_gate': True},
    'sigmoid_auxfree_qknorm': {'moe.router_score': 'sigmoid', 'moe.load_balancing': 'aux_free',
                               'model.use_qk_norm': True},
    'qkv_bias_projection_qknorm': {'model.use_qkv_bias': True, 'model.use_qk_norm': True,
                                   'model.qk_norm_scope': 'projection', 'model.num_kv_heads': 2},
}


def _model(tiny_cfg, overrides):
  cfg = config_lib.validate(config_lib.apply_overrides(tiny_cfg, overrides))
  return model_lib.build(cfg), cfg


@pytest.mark.parametrize('design', list(DESIGNS))
def test_prefill_then_decode_equals_the_full_forward_in_logits_and_routing(tiny_cfg, design, monkeypatch):
  model, cfg = _model(tiny_cfg, DESIGNS[design])
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.model.vocab_size, (2, 12)), jnp.int32)
  recorded, route = [], MoE._route  # pylint: disable=protected-access

  def recording(self, x_TD, train, rng):
    out = route(self, x_TD, train, rng)
    recorded.append(out[2])
    return out

  monkeypatch.setattr(MoE, '_route', recording)
  full, _ = model(tokens)  # the reference twin, run eagerly: its routing per MoE layer is recorded
  monkeypatch.setattr(MoE, '_route', route)
  full_routes = [r.reshape(2, 12, -1) for r in recorded]
  assert len(full_routes) == sum(b.use_moe for b in model.blocks)
  lengths = np.array([3, 6])  # prompts of different lengths in one batch, right-padded to 6 for prefill
  cache = model.init_cache(2, 12)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  logits, cache, routes = decode.forward(model, tokens[:, :6], positions, cache, moe_dispatch='model')  # prefill
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(logits[b, :n], full[b, :n], rtol=1e-5, atol=2e-5)
    for got, want in zip(routes, full_routes):
      np.testing.assert_array_equal(got.reshape(2, 6, -1)[b, :n], want[b, :n])
  pos = jnp.asarray(lengths)
  for step in range(12 - 6):  # teacher-forced decode: each row feeds its true next token at its own position
    step_tokens = tokens[jnp.arange(2), pos][:, None]
    dispatch = ('distinct', 'gather')[step % 2]  # both few-token dispatches, on the same cache
    logits, cache, routes = decode.forward(model, step_tokens, pos[:, None], cache, dispatch)
    np.testing.assert_allclose(logits[:, 0], full[jnp.arange(2), pos], rtol=1e-5, atol=2e-5)
    for got, want in zip(routes, full_routes):  # the decode step routes every token as the full forward did
      np.testing.assert_array_equal(got, want[jnp.arange(2), pos])
    pos = pos + 1


def test_a_jitted_donated_decode_step_compiles_once(tiny_cfg):
  model, _ = _model(tiny_cfg, {})
  graphdef, state = nnx.split(model)

  def step(state, cache, tokens_B1, positions_B1):
    return decode.forward(nnx.merge(graphdef, state), tokens_B1, positions_B1, cache)[:2]

  step = jax.jit(step, donate_argnums=1)  # the cache is updated in place
  cache = model.init_cache(2, 8)
  for t in range(8):
    logits, cache = step(state, cache, jnp.full((2, 1), t, jnp.int32), jnp.full((2, 1), t, jnp.int32))
  assert step._cache_size() == 1 and logits.shape == (2, 1, model.embed.table.shape[0])  # pylint: disable=protected-access


def test_decoding_refuses_a_capacity_limited_evaluation(tiny_cfg):
  _, cfg = _model(tiny_cfg, {'moe.eval_capacity_factor': 1.0})
  with pytest.raises(ConfigError, match='dropless evaluation'):
    decode.check_decodable(cfg)


def test_greedy_generation_equals_repeated_full_forwards_and_compiles_once(tiny_cfg):
  model, cfg = _model(tiny_cfg, {})
  prompts = [[5, 9, 13], [7, 1, 2, 3, 4, 8]]
  gen = decode.Generator(model, batch=2, max_len=16)
  got = gen(prompts, max_new_tokens=5)
  full = jax.jit(lambda tokens: model(tokens)[0])  # the full forward, one shape: causal, so right padding is inert
  for prompt, new in zip(prompts, got):  # the slow twin: the whole sequence through the model at every step
    seq = list(prompt)
    for _ in range(5):
      logits = full(jnp.asarray([seq + [0] * (16 - len(seq))], jnp.int32))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert new == seq[len(prompt):]
  again = gen(prompts, max_new_tokens=5, temperature=1.0, top_p=1e-6, seed=3)  # a nucleus of one token is greedy
  assert again == got
  sampled = gen(prompts, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
  assert sampled == gen(prompts, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)  # seeded
  assert gen.compilations == {'step': 1, 'prefill': 1}  # every step of every generation, ahead of time
  for dispatch in ('distinct', 'gather', 'model'):  # every MoE dispatch decodes the same tokens
    assert decode.Generator(model, batch=2, max_len=16, moe_dispatch=dispatch)(prompts, max_new_tokens=5) == got
  with pytest.raises(ConfigError, match='exceeds the context'):
    gen(prompts, max_new_tokens=11)
  with pytest.raises(ConfigError, match='top_p'):
    gen(prompts, max_new_tokens=2, top_p=0.0)


def test_nucleus_sampling_keeps_only_the_top_mass():
  logits = jnp.tile(jnp.asarray([[0.0, 10.0, 9.0, -10.0, -10.0]]), (4000, 1))  # p ~ 0, .73, .27, 0, 0
  keys = jax.random.key(0)
  drawn = np.asarray(decode.sample(logits, keys, jnp.float32(1.0), jnp.float32(0.5)))
  assert set(drawn.tolist()) == {1}  # the top token alone reaches 0.5
  drawn = np.asarray(decode.sample(logits, keys, jnp.float32(1.0), jnp.float32(0.9)))
  assert set(drawn.tolist()) == {1, 2} and 0.65 < np.mean(drawn == 1) < 0.81  # renormalized over the two
  assert np.asarray(decode.sample(logits, keys, jnp.float32(0.0), jnp.float32(0.9))).tolist() == [1] * 4000


def test_generate_from_a_trained_workdir_and_its_bad_inputs(tiny_cfg, tmp_path):
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from moejax import generate  # pylint: disable=import-outside-toplevel
  from moejax.train import run as run_lib
  from moejax.errors import CheckpointError, WorkdirError  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / 'run')
  run_lib.execute(tiny_cfg, workdir)
  texts = generate.generate_text(workdir, ['def ', 'import'], max_new_tokens=6)
  assert len(texts) == 2 and all(isinstance(t, str) and len(t.encode()) <= 6 for t in texts)
  assert texts == generate.generate_text(workdir, ['def ', 'import'], max_new_tokens=6)  # greedy: deterministic
  with pytest.raises(ConfigError, match="exceeds the run's context of 16 tokens"):
    generate.generate_text(workdir, ['x' * 12], max_new_tokens=6)
  with pytest.raises(ConfigError, match='--top_p'):
    generate.generate_text(workdir, ['x'], top_p=2.0)
  with pytest.raises(WorkdirError, match='holds no trained run'):
    generate.generate_text(str(tmp_path / 'empty'), ['x'])
  bare = tmp_path / 'bare'
  bare.mkdir()
  (bare / 'config.json').write_text(open(os.path.join(workdir, 'config.json')).read())
  with pytest.raises(CheckpointError, match='no checkpoint'):
    generate.generate_text(str(bare), ['x'], max_new_tokens=2)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-m', 'moejax.generate', f'--workdir={tmp_path}/empty', '--prompt=x'],
                       cwd=root, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and out.stderr.strip().splitlines()[-1].startswith('moejax: error:')


@pytest.mark.parametrize('dispatch', ['distinct', 'gather'])
@pytest.mark.parametrize('design', ['moe', 'shared_heterogeneous', 'sigmoid_auxfree_qknorm'])
def test_few_token_dispatches_equal_the_layer_and_route_alike(tiny_cfg, design, dispatch):
  model, cfg = _model(tiny_cfg, DESIGNS[design])
  moe = next(b.ffn for b in model.blocks if b.use_moe)
  x = jax.random.normal(jax.random.key(1), (3, 2, cfg.model.model_dim), jnp.float32)
  want, _ = moe(x)
  got, aux = jax.jit(lambda moe, x: moe(x, dispatch=dispatch))(moe, x)
  experts = aux['experts_TK']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  _, _, experts_ref, _ = moe._route(x.reshape(-1, cfg.model.model_dim), False, None)  # pylint: disable=protected-access
  np.testing.assert_array_equal(experts, experts_ref)


def test_a_batch_that_does_not_fit_is_refused_before_the_cache_is_allocated(tiny_cfg):
  model, _ = _model(tiny_cfg, {})
  gen = decode.Generator(model, batch=4, max_len=32)
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(gen.cache_shape))
  assert gen.memory['step'] >= cache_bytes  # the compiler's estimate includes the cache it will need
  with pytest.raises(ConfigError, match=r'needs .* GB .* but .* GB is free'):
    decode.Generator(model, batch=4, max_len=32, memory_limit=cache_bytes // 2)
  with pytest.raises(ConfigError, match='moe_dispatch'):
    decode.Generator(model, batch=4, max_len=32, moe_dispatch='ragged')


def test_auto_dispatch_uses_a_few_token_one_only_while_it_reads_fewer_experts_than_the_model():
  assert dispatch_lib.pick_dispatch('auto', tokens=4, topk=2, num_experts=8, backend='cpu') == 'distinct'
  assert dispatch_lib.pick_dispatch('auto', tokens=4, topk=2, num_experts=8, backend='gpu') == 'gather'
  assert dispatch_lib.pick_dispatch('auto', tokens=5, topk=2, num_experts=8) == 'model'
  assert dispatch_lib.pick_dispatch('model', tokens=1, topk=2, num_experts=8) == 'model'


@pytest.fixture(scope='module')
def trained16(corpus_glob, tmp_path_factory):
  """A run of the tiny model with 16 experts (top-2) trained for 40 steps: a routing with some skew."""
  from testdata import tiny  # pylint: disable=import-outside-toplevel
  from moejax.train import run as run_lib
  cfg = config_lib.validate(config_lib.apply_overrides(tiny.get_config(corpus_glob), {
      'moe.num_experts': 16, 'moe.expert_hidden': 16, 'train.steps': 40, 'checkpoint.every_steps': 40,
      'moe.use_renormalized_gates': True}))
  workdir = str(tmp_path_factory.mktemp('trained16'))
  run_lib.execute(cfg, workdir)
  return workdir


def test_distinct_expert_formulas_against_a_trained_models_routing(trained16):
  from moejax.train import restore as restore_lib
  from moejax.inference import cost as decode_cost  # pylint: disable=import-outside-toplevel
  cfg, corpus, model = restore_lib.load_model(trained16)
  held = np.asarray(corpus.heldout_tokens)[:8 * 16].reshape(8, 16).astype(np.int32)
  _, _, routes = decode.forward(model, jnp.asarray(held), jnp.broadcast_to(jnp.arange(16), (8, 16)),
                                model.init_cache(8, 16), 'model')
  rng = np.random.default_rng(0)
  E, k = 16, 2
  for layer in routes:  # the trained model's routing of 128 held-out tokens, per MoE layer
    pool = np.asarray(layer)
    loads = np.bincount(pool.reshape(-1), minlength=E) / len(pool)  # P(a token selects expert e); sums to k
    assert loads.sum() == pytest.approx(k)
    for B in (1, 4, 16):
      draws = [len(np.unique(pool[rng.integers(0, len(pool), B)])) for _ in range(2000)]
      measured, se = np.mean(draws), np.std(draws) / np.sqrt(len(draws))
      from_loads = decode_cost.expected_distinct_from_loads(loads, B)
      uniform = float(decode_cost.expected_distinct(E, k, B))
      assert abs(measured - from_loads) <= 4 * se + 1e-9, (B, measured, from_loads)  # skew accounted for
      assert measured <= uniform + 4 * se  # skew touches fewer experts than uniform routing
    assert loads.max() > 1.3 * k / E  # (the trained routing is skewed, so the two formulas differ)


def test_the_decode_benchmark_measures_a_trained_run(trained16, monkeypatch):
  from moejax.bench import decode as decode_bench, tables  # pylint: disable=import-outside-toplevel
  from moejax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  rounds = []
  original = decode_bench._Case.round  # pylint: disable=protected-access
  monkeypatch.setattr(decode_bench._Case, 'round',  # pylint: disable=protected-access
                      lambda self, warmup=False: (rounds.append(warmup), original(self, warmup))[1])
  models = decode_bench.load_models(None, [], [trained16], context=8, steps=3)
  result = decode_bench.run(models, batches=[1, 4], context=8, steps=3, rounds=1, copy_mb=4)
  rows = result['rows']
  assert [(r['name'], r['batch']) for r in rows] == [(trained16.rstrip('/').split('/')[-1], b) for b in (1, 4)]
  assert rows[0]['distinct'] == 2.0 and rows[0]['dispatch'] == 'distinct'  # distinct experts at B = 1: exactly k
  assert rows[1]['distinct'] <= 8
  # --rounds=1 times a warm round: every case runs one untimed warm-up round first (the first round was cold)
  assert rounds == [True, True, False, False] and all(r['rounds'] == 1 for r in rows)
  assert all(r['ffn_ms'] is None or r['ffn_ms'] >= 0 for r in rows)
  assert len(decode_bench.render(result)) == 2 + 2 * (2 + len(rows)) + 3
  assert tables.decode_breakdown_table([dict(rows[0], ffn_ms=None)])[2].split('|')[6].strip() == '-'
  with pytest.raises(ConfigError, match='not points of'):
    decode_bench.load_models('experiments/quickstart.py', ['nope'], [])
  with pytest.raises(ConfigError, match=r'--context=1000 \+ --decode_steps=3 exceeds the context of .* 16 tokens'):
    decode_bench.load_models(None, [], [trained16], context=1000, steps=3)


def test_decode_benchmark_ffn_time_below_the_noise_is_not_negative():
  from moejax.bench import decode as decode_bench  # pylint: disable=import-outside-toplevel
  assert decode_bench.ffn_ms(1.5, 0.5) == 1.0
  assert decode_bench.ffn_ms(0.5, 0.6) is None  # (a negative difference of medians is noise, not a time)


def test_decode_benchmark_builds_scanned_points_unscanned():
  """A sweep point with model.scan_layers=True (stored stacked, which refuses a KV cache) is decoded by its
  per-layer twin: the same configuration with the layers one by one."""
  from moejax.bench import decode as decode_bench  # pylint: disable=import-outside-toplevel
  (name, cfg, model, _), = decode_bench.load_models('experiments/bench/scan.py', ['scanned'], [])
  assert name == 'scanned' and not cfg.model.scan_layers and model.spans is None

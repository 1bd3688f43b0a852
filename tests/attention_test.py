"""The attention cores of `model.attention`: equal outputs and gradients to today's XLA call (float32),
causal and segment masks, GQA, lengths that are not a multiple of the blocks, and memory that does not
grow as L^2 for 'blockwise'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import base_config, config as config_lib
from moejax.errors import ConfigError
from moejax.model import attention as attention_lib
from moejax.model import transformer as model_lib


def _qkv(B, L, H, G, K, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (B, L, h, K), jnp.float32).astype(dtype) for key, h in zip(keys, (H, G, G)))


def _segments(B, L, seed=0):
  """Segment ids of random packed windows: separator 0 begins a document (about one in six tokens)."""
  tokens = np.random.RandomState(seed).randint(0, 6, (B, L))
  return attention_lib.document_layout(tokens, 0)[0]


def _loss_and_grads(impl, q, k, v, seg, blocks=(8, 16), interpret=False):
  def loss(q, k, v):
    o = attention_lib.attend(q, k, v, impl, seg, *blocks, interpret=interpret)
    return jnp.sum(jnp.sin(o.astype(jnp.float32))), o
  (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return o, grads


def test_xla_default_is_todays_call():
  q, k, v = _qkv(2, 12, 4, 2, 8)
  today = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  now = lambda q, k, v: attention_lib.attend(q, k, v)
  assert str(jax.make_jaxpr(now)(q, k, v)) == str(jax.make_jaxpr(today)(q, k, v))
  assert np.array_equal(now(q, k, v), today(q, k, v))
  cfg = config_lib.validate(base_config.get_config())
  assert cfg.model.attention == 'xla' and cfg.data.document_mask is False


@pytest.mark.parametrize('L,H,G,blocks,segmented', [
    pytest.param(37, 4, 2, (8, 16), False, marks=pytest.mark.slow),  # GQA, L not a multiple of either block
    (37, 4, 2, (16, 8), True),  # GQA + documents
    pytest.param(32, 2, 2, (8, 8), True, marks=pytest.mark.slow),  # MHA, exact blocks
    pytest.param(5, 4, 1, (8, 16), True, marks=pytest.mark.slow),  # MQA, L shorter than a block
])
def test_blockwise_matches_xla(L, H, G, blocks, segmented):
  q, k, v = _qkv(2, L, H, G, 8, seed=L)
  seg = _segments(2, L) if segmented else None
  o_ref, g_ref = _loss_and_grads('xla', q, k, v, seg)
  o, g = _loss_and_grads('blockwise', q, k, v, seg, blocks)
  np.testing.assert_allclose(o, o_ref, atol=2e-6, rtol=1e-5)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_segments_block_attention_across_documents():
  """Changing an earlier document's keys and values leaves a later document's outputs unchanged."""
  q, k, v = _qkv(1, 24, 2, 1, 8)
  seg = jnp.asarray([[1] * 10 + [2] * 14])
  for impl in ('xla', 'blockwise'):
    o = attention_lib.attend(q, k, v, impl, seg, 8, 8)
    o2 = attention_lib.attend(q, k.at[:, :10].mul(3.0), v.at[:, :10].add(1.0), impl, seg, 8, 8)
    np.testing.assert_allclose(o[:, 10:], o2[:, 10:], atol=1e-6)
    assert not np.allclose(o[:, :10], o2[:, :10])


@pytest.mark.slow
def test_blockwise_bfloat16_close_to_xla():
  q, k, v = _qkv(2, 40, 4, 2, 16, dtype=jnp.bfloat16)
  seg = _segments(2, 40)
  o_ref = attention_lib.attend(q, k, v, 'xla', seg)
  o = attention_lib.attend(q, k, v, 'blockwise', seg, 16, 16)
  assert o.dtype == jnp.bfloat16
  np.testing.assert_allclose(o.astype(jnp.float32), o_ref.astype(jnp.float32), atol=3e-2)


@pytest.mark.slow
def test_splash_kernel_in_interpret_mode_matches_xla():
  """jax's Pallas TPU splash kernel, interpreted on CPU: GQA, documents, L padded to its 128-blocks."""
  q, k, v = _qkv(1, 200, 4, 2, 128, seed=3)
  seg = _segments(1, 200, seed=3)
  o_ref, g_ref = _loss_and_grads('xla', q, k, v, seg)
  o, g = _loss_and_grads('splash', q, k, v, seg, (128, 128), interpret=True)
  np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_model_with_blockwise_attention_equals_xla(tiny_cfg):
  tokens = jax.random.randint(jax.random.key(0), (2, 21), 0, tiny_cfg.model.vocab_size)

  def run(impl):
    cfg = config_lib.apply_overrides(tiny_cfg, {'model.attention': impl, 'model.attention_q_block': 8,
                                                'model.attention_kv_block': 8})
    graphdef, params, buffers = model_lib.split(model_lib.build(cfg))
    logits = lambda p: nnx.merge(graphdef, p, buffers)(tokens)[0]
    grads = jax.jit(jax.grad(lambda p: jnp.sum(jax.nn.logsumexp(logits(p), axis=-1))))(params)
    return jax.jit(logits)(params), grads

  logits_ref, grads_ref = run('xla')
  logits, grads = run('blockwise')
  np.testing.assert_allclose(logits, logits_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def _temp_bytes(impl, L, H=4, K=16):
  q, k, v = (jax.ShapeDtypeStruct((1, L, H, K), jnp.float32) for _ in range(3))
  grad = jax.grad(lambda q, k, v: jnp.sum(attention_lib.attend(q, k, v, impl, None, 128, 128)), argnums=(0, 1, 2))
  return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_blockwise_temporaries_grow_linearly_not_quadratically():
  """By the CPU compiler's memory analysis: doubling L doubles 'blockwise' temporaries (xla: about 4x)."""
  xla = [_temp_bytes('xla', L) for L in (1024, 2048)]
  blockwise = [_temp_bytes('blockwise', L) for L in (1024, 2048)]
  assert xla[1] / xla[0] > 3.5
  assert blockwise[1] / blockwise[0] < 2.5
  assert blockwise[1] < xla[1] / 4


def test_attention_keys_validated(tiny_cfg):
  for overrides, needle in (({'model.attention': 'flash3'}, 'model.attention'),
                            ({'model.attention': 'cudnn'}, 'bfloat16'),
                            ({'model.attention_q_block': 0}, 'attention_q_block'),
                            ({'model.attention': 'splash', 'model.attention_kv_block': 200}, 'multiples of 128'),
                            ({'model.attention': 'cudnn', 'model.compute_dtype': 'bfloat16', 'model.head_dim': 12},
                             'multiple of 8'),
                            ({'data.document_mask': 1}, 'data.document_mask')):
    with pytest.raises(ConfigError, match=needle):
      config_lib.validate(config_lib.apply_overrides(tiny_cfg, overrides))
  assert config_lib.validate(config_lib.apply_overrides(
      tiny_cfg, {'model.attention': 'cudnn', 'model.compute_dtype': 'bfloat16'})).model.attention == 'cudnn'


def test_splash_on_a_multi_device_mesh_runs_per_device():
  """On a mesh the splash kernel runs inside a shard_map (XLA cannot partition a Mosaic call: a real TPU
  compile of the sharded model failed with "Mosaic kernels cannot be automatically partitioned" without it):
  batch over the batch axes B divides, heads over tensor; outputs and gradients equal the unsharded XLA call."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  mesh = jax.make_mesh((2, 2, 1, 2), ('data', 'fsdp', 'expert', 'tensor'), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)  # B = 2: rows over data only, fsdp sees both
  q, k, v = _qkv(2, 130, 4, 2, 128, seed=5)
  seg = _segments(2, 130, seed=5)
  o_ref, g_ref = _loss_and_grads('xla', q, k, v, seg)
  spec = NamedSharding(mesh, P('data', None, 'tensor', None))
  q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
  fn = lambda q, k, v: _loss_and_grads('splash', q, k, v, seg, (128, 128), interpret=True)  # noqa: E731
  with jax.set_mesh(mesh):
    o, g = jax.jit(fn)(q, k, v)
    assert 'shard_map' in str(jax.make_jaxpr(fn)(q, k, v))  # (interpreted, XLA could partition it either way)
  np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_auto_for_a_deviceless_gpu_target_is_blockwise():
  """cuDNN builds its attention at compile time, which a compile for `--target=gpu:...` without a GPU cannot."""
  from moejax import kernels  # pylint: disable=import-outside-toplevel
  with kernels.target('gpu'):
    assert attention_lib.resolve('auto', jnp.bfloat16) == 'blockwise'
    assert attention_lib.resolve('auto', jnp.float32) == 'xla'
  with kernels.target('tpu'):
    assert attention_lib.resolve('auto', jnp.float32) == 'splash'


def test_auto_picks_per_backend():
  assert attention_lib.resolve('auto', jnp.float32, 'cpu') == 'xla'
  assert attention_lib.resolve('auto', jnp.bfloat16, 'gpu') == 'cudnn'
  assert attention_lib.resolve('auto', jnp.float32, 'gpu') == 'xla'  # (cuDNN has no float32 attention)
  assert attention_lib.resolve('auto', jnp.float32, 'tpu') == 'splash'
  assert attention_lib.resolve('blockwise', jnp.float32, 'tpu') == 'blockwise'


def test_auto_on_gpu_leaves_shapes_cudnn_refuses_to_the_blockwise_core():
  """jax's cuDNN attention raises deep in tracing for a head_dim not a multiple of 8 or over 128 (256 needs Hopper),
  and for an odd length with a segment mask: 'auto' takes the blockwise core there instead."""
  assert attention_lib.resolve('auto', jnp.bfloat16, 'gpu', head_dim=128, seq_len=4096, masked=True) == 'cudnn'
  for head_dim, seq_len, masked in ((36, 128, False), (192, 128, False), (64, 127, True)):
    assert attention_lib.resolve('auto', jnp.bfloat16, 'gpu', head_dim, seq_len, masked) == 'blockwise'
  assert attention_lib.resolve('auto', jnp.bfloat16, 'gpu', 64, 127, False) == 'cudnn'


def test_splash_takes_sequences_shorter_than_its_128_row_tiles():
  """'auto' is splash on every TPU run, data.seq_len=64 included: the kernel needs 128-row tiles (it raised
  'bkv_compute=64 must be a multiple of 128'); the sequence runs as one padded, masked tile."""
  q, k, v = _qkv(1, 64, 2, 1, 128, seed=4)
  o_ref, _ = _loss_and_grads('xla', q, k, v, None)
  o, _ = _loss_and_grads('splash', q, k, v, None, (512, 512), interpret=True)
  np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)

"""Kernel tiles for TPU and GPU targets, without their compilers: block rules, on-chip budgets, fallbacks.

The budgets' accounting is checked against the real compilers in tests/accel_compile_test.py
(the Triton shared-memory figure is exactly the formula in `gmm.triton_smem`).
"""

import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import kernels, routing
from moejax.kernels import gmm, permute, router

H100_SMEM, V5P_VMEM, V6E_VMEM = 232448, 16 << 20, 32 << 20
EXPERTS, TOP_K = (8, 16, 32, 64, 128, 256), (1, 2, 3, 4, 6, 8)
TOKENS = (1024, 3000, 4096, 16384, 65536)
DIMS = (512, 768, 1024, 1408, 2048, 4096, 7168, 14336, 16384)


def _blocks():
  """Every block size the MoE layer picks over the grid (auto_block_size), plus the largest a config may set."""
  return sorted({routing.auto_block_size(t * k, e) for t, k, e in itertools.product(TOKENS, TOP_K, EXPERTS)} | {512})


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('budget', [V5P_VMEM, V6E_VMEM])
def test_mosaic_gmm_tiles_obey_the_block_rule_and_fit_vmem(dtype, budget):
  itemsize = jnp.dtype(dtype).itemsize
  for bs, K, N in itertools.product(_blocks(), DIMS, DIMS):
    R, E = bs * 64, 8
    with kernels.target('tpu', budget):
      plan = gmm.tiles(bs, K, N, dtype)
    assert plan is not None, (bs, K, N)  # every realistic shape has a Mosaic tiling
    (tk, tn), (tk2, tn2), (gk, gn) = plan['fwd'], plan['dx'], plan['dw']
    for block, array in [((bs, tk), (R, K)), ((None, tk, tn), (E, K, N)), ((bs, tn), (R, N)),
                         ((bs, tk2), (R, N)), ((None, tk2, tn2), (E, N, K)), ((bs, tn2), (R, K)),
                         ((bs, gk), (R, K)), ((bs, gn), (R, N)), ((None, gk, gn), (E, K, N))]:
      assert kernels.mosaic_block_ok(block, array), (bs, K, N, block, array)
    assert K % tk == 0 and N % tn == 0 and N % tk2 == 0 and K % tn2 == 0 and K % gk == 0 and N % gn == 0
    limit = budget * kernels.MOSAIC_VMEM_SHARE
    assert gmm.mosaic_vmem(bs, tk, tn, itemsize) <= limit
    assert gmm.mosaic_vmem(bs, tk2, tn2, itemsize) <= limit
    assert gmm.mosaic_vmem(bs, gk, gn, itemsize, grad=True) <= limit


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_triton_gmm_tiles_fit_shared_memory(dtype):
  """The Mixtral shape (block 512, K 4096, N 14336) asked 245760 of 232448 bytes before tiles came from the budget."""
  itemsize = jnp.dtype(dtype).itemsize
  for bs, K, N in itertools.product([b for b in _blocks() if b >= 16], DIMS, DIMS):
    with kernels.target('gpu', H100_SMEM):
      plan = gmm.tiles(bs, K, N, dtype)
    if K % 16 or N % 16:
      assert plan is None
      continue
    assert plan is not None, (bs, K, N)
    (rows, tk, tn), (rows2, tk2, tn2), (gr, gk, gn) = plan['fwd'], plan['dx'], plan['dw']
    for t, n in [(tk, K), (tn, N), (tk2, N), (tn2, K), (gk, K), (gn, N), (gr, bs)]:
      assert t >= 16 and t & (t - 1) == 0 and n % t == 0
    assert rows == rows2 == bs
    assert gmm.triton_smem(bs, tk, tn, itemsize) <= H100_SMEM
    assert gmm.triton_smem(bs, tk2, tn2, itemsize) <= H100_SMEM
    assert gmm.triton_smem(gr, gk, gn, itemsize, grad=True) <= H100_SMEM


def test_triton_smem_formula_matches_the_compiler_s_reports():
  """The figures XLA:GPU reported for the old fixed tiles (issue 30): bf16, 3 stages."""
  assert gmm.triton_smem(512, 64, 128, 2) == 245760  # forward, block 512, tk 64, tn 128
  assert gmm.triton_smem(256, 128, 128, 2, grad=True) == 393216  # weight gradient, block 256, 128 x 128 tiles


def test_gmm_without_a_fitting_tiling_falls_back_to_xla_with_one_warning(caplog):
  """A 1 KB budget fits no tile: the XLA path runs (same values), one warning per shape."""
  x = jax.random.normal(jax.random.key(0), (32, 128), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (2, 128, 256), jnp.float32)
  be = jnp.array([0, 0, 1, 1])
  kernels._warned.clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING), kernels.target('cpu', 1024):
    y1 = gmm.block_gmm(x, w, be, 8, 'pallas')
    y2 = gmm.block_gmm(x, w, be, 8, 'pallas')
  np.testing.assert_allclose(y1, gmm.block_gmm_reference(x, w, be, 8), rtol=1e-5)
  np.testing.assert_array_equal(y1, y2)
  assert caplog.text.count('using the XLA path') == 1


def test_counting_sort_over_its_vmem_budget_falls_back_to_the_sort(caplog):
  flat = jax.random.randint(jax.random.key(0), (4096,), 0, 9)
  kernels._warned.clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING), kernels.target('cpu', permute.ranks_onchip_bytes(4096, 9) // 2):
    ranks = permute.expert_ranks(flat, 9, 'pallas')
  np.testing.assert_array_equal(ranks, routing.expert_ranks(flat, 9))
  assert 'stable sort' in caplog.text
  for A, E in itertools.product([1024 * 8, 65536 * 8], [9, 65, 257]):  # the default budget takes the grid's sizes
    assert permute.ranks_onchip_bytes(A, E) <= kernels.MOSAIC_VMEM_SHARE * V5P_VMEM, (A, E)


def _mosaic_lowers(fn, *args):
  """Lowers fn for TPU through jax.export: the Pallas TPU lowering checks every BlockSpec against Mosaic's rule."""
  with kernels.target('tpu'):
    return jax.export.export(jax.jit(fn), platforms=['tpu'], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call('tpu_custom_call')])(*args).mlir_module()


@pytest.mark.parametrize('T,E,k', [(4096, 64, 8), (1000, 16, 2), (300, 128, 1), (7, 8, 3)])
def test_router_kernel_blocks_obey_mosaic_s_rule(T, E, k):
  """The histogram was a (1, E) block of [blocks, E], which Mosaic rejects for more than one block."""
  text = _mosaic_lowers(lambda z: router.route(z, k, impl='pallas'), jax.ShapeDtypeStruct((T, E), jnp.float32))
  assert 'moejax_router' in text


@pytest.mark.parametrize('M,D,dtype', [(37, 256, jnp.float32), (64, 2048, jnp.bfloat16), (5, 96, jnp.bfloat16)])
def test_row_gather_blocks_obey_mosaic_s_rule(M, D, dtype):
  """Row counts off the 8-row step are padded (a (1, D) block of [M, D] broke the rule); bf16 moves as 32-bit words."""
  text = _mosaic_lowers(lambda x, i: permute.gather_rows(x, i, 'pallas'), jax.ShapeDtypeStruct((100, D), dtype),
                        jax.ShapeDtypeStruct((M,), jnp.int32))
  assert 'moejax_gather_rows' in text


def test_gather_kernel_moves_bfloat16_rows_as_words():
  x = jax.random.normal(jax.random.key(0), (37, 6), jnp.bfloat16)
  idx = jnp.array([3, 0, 36, 5, 5, 1, 2, 9, 11, 30, 4])
  np.testing.assert_array_equal(np.asarray(permute.gather_rows(x, idx, 'pallas'), np.float32),
                                np.asarray(x[idx], np.float32))


@pytest.mark.parametrize('platform', ['gpu', 'tpu'])
def test_auto_kernels_stay_xla_on_accelerators(platform):
  """No device has timed the Pallas kernels yet (docs/kernels.md): 'auto' must not pick them."""
  with kernels.target(platform):
    assert kernels.resolve('auto') == 'xla'
    assert kernels.platform() == platform


def test_target_sets_the_on_chip_budget_and_restores_it():
  default = kernels.onchip_bytes()
  with kernels.target('gpu', 1234):
    assert kernels.onchip_bytes() == 1234
    with kernels.target('tpu'):
      assert kernels.onchip_bytes() == kernels.ONCHIP_BYTES['tpu']
  assert kernels.onchip_bytes() == default


def test_mosaic_kernels_outside_a_shard_map_on_a_mesh_take_the_xla_path(caplog):
  """XLA cannot partition a Mosaic call ("Mosaic kernels cannot be automatically partitioned", seen compiling the
  expert-parallel train step for v5p): on a multi-device mesh the router runs the XLA path unless inside shard_map."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  mesh = jax.make_mesh((4,), ('ep',), axis_types=(jax.sharding.AxisType.Auto,))
  route = lambda z: router.route(z, 2, impl='pallas')[1]
  z = jax.ShapeDtypeStruct((64, 16), jnp.float32)
  kernels._warned.clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING), jax.set_mesh(mesh):
    outside = _mosaic_lowers(route, z)
    inside = _mosaic_lowers(jax.shard_map(route, in_specs=P('ep'), out_specs=P('ep')), z)
  assert 'moejax_router' not in outside and 'cannot partition' in caplog.text
  assert 'moejax_router' in inside


def test_row_gather_splits_indices_over_the_smem_budget(monkeypatch):
  """The indices are scalar-prefetched into SMEM (1 MiB on v5p: 524,288 indices overflowed it in a real TPU
  compile); past the budget the gather runs as several calls, with the same rows."""
  monkeypatch.setattr(kernels, 'TPU_SMEM_INDEX_BYTES', 16 * 4)  # 16 indices per call
  x = jax.random.normal(jax.random.key(1), (50, 128), jnp.float32)
  idx = jax.random.randint(jax.random.key(2), (61,), 0, 50)
  jaxpr = str(jax.make_jaxpr(lambda x, i: permute.gather_rows(x, i, 'pallas'))(x, idx))
  assert jaxpr.count('pallas_call') == 4  # 61 rows in calls of 16
  np.testing.assert_array_equal(permute.gather_rows(x, idx, 'pallas'), x[idx])


def test_counting_sort_on_gpu_takes_the_sort_past_its_register_limit(caplog):
  """The Triton kernel keeps all assignments in registers; 64k tokens x k8 never finished compiling (ptxas)."""
  small = jnp.zeros((permute.TRITON_RANK_MAX_ROWS * permute.RANK_CHUNK,), jnp.int32)
  large = jnp.zeros((permute.TRITON_RANK_MAX_ROWS * permute.RANK_CHUNK + 1,), jnp.int32)
  with kernels.target('gpu'), caplog.at_level(logging.WARNING):
    assert 'pallas_call' in str(jax.make_jaxpr(lambda a: permute.expert_ranks(a, 256, 'pallas'))(small))
    assert 'pallas_call' not in str(jax.make_jaxpr(lambda a: permute.expert_ranks(a, 256, 'pallas'))(large))
  assert 'XLA path' in caplog.text


def test_gpu_router_blocks_stay_within_the_register_budget():
  """Triton keeps a block's [rows, E] scores in registers: rows shrink with E (E256 at 256 rows kept ptxas busy
  for minutes in 7.4 GB)."""
  logits = jnp.zeros((4096, 256), jnp.float32)
  with kernels.target('gpu'):
    jaxpr = str(jax.make_jaxpr(lambda z: router.route(z, 8, impl='pallas'))(logits))
  assert 'moejax_router' in jaxpr and f'f32[{router.GPU_BLOCK_ELEMENTS // 256},256]' in jaxpr

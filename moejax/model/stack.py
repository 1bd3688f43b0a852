"""Running the decoder blocks scanned (`model.scan_layers`) and rematerialized (`model.remat`).

The parameters stay per layer (`blocks.0`, `blocks.1`, ...) whatever these keys say, so checkpoints,
exports and decode caches do not depend on them. Scanning finds the repeating periods of the layer
pattern (`periods`): a run of identical blocks is a period of one; an interleaved pattern such as
`moe.every_n_layers=2` (dense, MoE, dense, MoE, ...) is a period of two; first dense layers are a
run of their own. Each period's per-layer parameters are stacked at call time and the period is
one `jax.lax.scan` step, so the program holds one copy of each distinct block whatever the depth
(the price: the stacked copy of the scanned blocks' parameters, one transient buffer, and the
gradients' unstacking). docs/scaling-out.md measures compile time and memory both ways.

`remat` wraps each block (or each scanned period) in `jax.checkpoint` with a policy (`POLICIES`):
'full' keeps only the block inputs; 'moe' keeps the projections that have no batch dimension
(attention q/k/v/o, router logits, dense and shared FFN) and the routing (`router_experts`,
`router_gates`), and recomputes the routed experts' matmuls and the attention scores; 'dots'
keeps every matmul output. Losses and gradients equal the plain model's (tests/scale_train_test.py).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.parallel import mesh as mesh_lib

ROUTING_NAMES = ('router_experts', 'router_gates')


def policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy of a `model.remat` value ('none' -> None: no remat)."""
  cp = jax.checkpoint_policies
  return {'none': None, 'full': cp.nothing_saveable, 'dots': cp.dots_saveable,
          'moe': cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                            cp.save_only_these_names(*ROUTING_NAMES))}[name]


def _kind(block) -> tuple:
  """Blocks of equal kind have equal graphdefs and parameter shapes: they can share one scan body."""
  _, state = nnx.split(block)
  return (block.use_moe, jax.tree.structure(state), tuple((x.shape, x.dtype) for x in jax.tree.leaves(state)))


def periods(kinds: list) -> list[tuple[int, int, int]]:
  """(start, period, repeats) covering the layers in order: at each start the period that repeats
  over the most layers (at least twice; ties to the shorter), else one block alone."""
  out, i, n = [], 0, len(kinds)
  while i < n:
    best = (1, 1)
    for p in range(1, (n - i) // 2 + 1):
      r = 1
      while i + (r + 1) * p <= n and kinds[i + r * p:i + (r + 1) * p] == kinds[i:i + p]:
        r += 1
      if r >= 2 and p * r > best[0] * best[1]:
        best = (p, r)
    out.append((i, *best))
    i += best[0] * best[1]
  return out


def _stacked(states: tuple) -> nnx.State:
  """The layers' states stacked on a new leading axis, each leaf kept sharded as its layers are.

  Without the constraint XLA's sharding propagation is free to pick the stacked copy's sharding,
  and under `mesh.fsdp` it gathered the whole stack: measured on 8 fake CPU devices, 12 dense
  layers (d=256), scanned: 2.3x the temporaries and 2.7x the compile time of the unrolled step;
  with it, docs/scaling-out.md.
  """
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return stacked
  axes = mesh_lib.logical_axes_tree(states[0])
  values = nnx.to_pure_dict(stacked)
  spec = lambda names: mesh_lib.canonical_spec(mesh_lib.logical_to_spec((None,) + tuple(names)), mesh)  # noqa: E731
  constrained = jax.tree.map(lambda x, names: jax.lax.with_sharding_constraint(x, spec(names)), values, axes,
                             is_leaf=lambda x: isinstance(x, tuple))
  nnx.replace_by_pure_dict(stacked, constrained)
  return stacked


def _layer_rng(rng, index):
  return None if rng is None else jax.random.fold_in(rng, index)


def run(blocks, x_BLD: jax.Array, train: bool, rng, positions_BL, scan: bool, remat: str, use_ffn: bool = True,
        **block_kwargs: Any) -> tuple[jax.Array, list[dict]]:
  """(x_BLD after every block, per-MoE-layer aux dicts in layer order), scanned and/or rematerialized."""
  save = policy(remat)
  graphdefs, states = zip(*(nnx.split(b) for b in blocks))

  def apply(graphdef, state, x, index):
    x, aux, _ = nnx.merge(graphdef, state)(x, train, _layer_rng(rng, index), positions_BL, None, None, use_ffn,
                                           **block_kwargs)
    return x, aux

  def period_fn(graphdefs_p):
    def body(x, state_and_index):
      states_p, index_p = state_and_index
      auxes = []
      for j, (g, s) in enumerate(zip(graphdefs_p, states_p)):
        x, aux = apply(g, s, x, index_p[j])
        auxes.append(aux)
      return x, tuple(auxes)
    return body if save is None else jax.checkpoint(body, policy=save, prevent_cse=not scan)

  layer_aux = []
  spans = periods([_kind(b) for b in blocks]) if scan else [(i, 1, 1) for i in range(len(blocks))]
  for start, p, r in spans:
    body = period_fn(graphdefs[start:start + p])
    if r == 1:
      x_BLD, auxes = body(x_BLD, (states[start:start + p], jnp.arange(start, start + p)))
      layer_aux += [a for a in auxes if a is not None]
      continue
    stacked = tuple(_stacked(states[start + j:start + p * r:p]) for j in range(p))
    index_RP = jnp.arange(start, start + p * r).reshape(r, p)
    x_BLD, auxes = jax.lax.scan(body, x_BLD, (stacked, index_RP))
    for q in range(r):
      layer_aux += [jax.tree.map(lambda a, q=q: a[q], a) for a in auxes if a is not None]
  return x_BLD, layer_aux

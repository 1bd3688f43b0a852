"""Running the decoder blocks scanned (`model.scan_layers`) and rematerialized (`model.remat`).

Scanning finds the repeating periods of the layer pattern (`periods`): a run of identical blocks is
a period of one; an interleaved pattern such as `moe.every_n_layers=2` (dense, MoE, dense, MoE, ...)
is a period of two; first dense layers are a run of their own. A scanned model stores each period
position's parameters stacked on a leading 'layers' axis (`stack_blocks`: the blocks of layers
start + j, start + j + p, ... become one block whose every variable has r rows), and each period is
one `jax.lax.scan` step over them, so the program holds one copy of each distinct block and one
optimizer update per stacked leaf whatever the depth. Before, the parameters stayed per layer and
were stacked at every call: on XLA:CPU three quarters of OLMoE-1B-7B's scanned train step (1,347 of
1,709 fusions) were per-layer stacking, unstacking and optimizer updates outside the loops.

Checkpoints, exports and decoding keep the per-layer layout ('blocks.0', 'blocks.1', ...): `to_layers`
and `to_stacked` convert a parameter tree (or any tree holding it, such as the optimizer state)
between the two, and `train.checkpoint.Checkpointer` saves and restores per layer, so a checkpoint
restores across the switch. Decoding builds the model unscanned (`unscanned`).

`remat` wraps each block (or each scanned period) in `jax.checkpoint` with a policy (`POLICIES`):
'full' keeps only the block inputs; 'moe' keeps the projections that have no batch dimension
(attention q/k/v/o, router logits, dense and shared FFN) and the routing (`router_experts`,
`router_gates`), and recomputes the routed experts' matmuls and the attention scores; 'dots'
keeps every matmul output. Losses and gradients equal the plain model's (tests/scale_train_test.py). With the
reference `moe.dispatch='dense'` (every expert on every token), 'moe' keeps its [T, E, F] expert activations too:
that einsum has no batch dimension in jax's sense.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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


def _layer_rng(rng, index):
  return None if rng is None else jax.random.fold_in(rng, index)


def layer_kinds(model_cfg, moe_cfg) -> list[bool]:
  """Whether each layer is an MoE layer: blocks of one kind have equal structure and shapes (`_kind`)."""
  from moejax import config as config_lib  # pylint: disable=import-outside-toplevel
  return [config_lib.is_moe_layer(moe_cfg, i) for i in range(model_cfg.num_layers)]


def storage_spans(cfg) -> tuple | None:
  """The scanned model's (start, period, repeats) spans of `cfg` (None: parameters stored per layer)."""
  return model_spans(cfg.model, cfg.moe)


def model_spans(model_cfg, moe_cfg) -> tuple | None:
  """`storage_spans` from the model and MoE sections (what `Transformer` stores its blocks by)."""
  if not model_cfg.get('scan_layers', False):
    return None
  return tuple(periods(layer_kinds(model_cfg, moe_cfg)))


def unscanned(cfg):
  """`cfg` with the parameters per layer (`model.scan_layers=False`): what decoding, exports and checkpoints use."""
  if not cfg.model.get('scan_layers', False):
    return cfg
  cfg = cfg.copy_and_resolve_references()
  cfg.model.scan_layers = False
  return cfg


def entries(spans) -> list[tuple[int, int, int]]:
  """(first layer, period, repeats) of each stored block in order: one per period position of a scanned span,
  one per layer of a span that runs once."""
  return [(start + j, p, r) for start, p, r in spans for j in range(p)] if spans else []


def stack_blocks(blocks: list, spans) -> list:
  """The stored blocks of a scanned model: per `entries`, layer i's block when it runs once, else layer i's block
  holding the stacked state of layers i, i + p, ..., i + (r - 1) p, every variable with a leading 'layers' axis."""
  out = []
  for first, p, r in entries(spans):
    block = blocks[first]
    if r > 1:
      if len({_kind(blocks[first + q * p]) for q in range(r)}) != 1:
        raise ValueError(f'layers {first}, {first + p}, ... of one period differ in structure or shapes')
      states = [nnx.state(blocks[first + q * p]) for q in range(r)]
      nnx.update(block, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
      for _, var in nnx.iter_graph(block):
        if isinstance(var, nnx.Variable) and getattr(var, 'logical_axes', None) is not None:
          var.set_metadata(logical_axes=('layers',) + tuple(var.logical_axes))
    out.append(block)
  return out


def to_layers(tree, spans, split=None):
  """A tree holding the scanned layout's 'blocks' (entry index -> subtree) with those of the per-layer layout
  (layer index -> subtree); any tree: parameter, buffer and optimizer-state trees, arrays or ShapeDtypeStructs.
  `split(leaf, r)`: the r rows of a stacked leaf (default: indexing); every other leaf is passed through as is."""
  return _convert(tree, spans, functools.partial(_blocks_to_layers, split=split or _split))


def to_stacked(tree, spans, stack=None):
  """The inverse of `to_layers`. `stack(rows)`: one stacked leaf from its rows (default: `jnp.stack`)."""
  return _convert(tree, spans, functools.partial(_blocks_to_stacked, stack=stack or _stack_rows))


def _convert(tree, spans, fn):
  if not spans:
    return tree
  if isinstance(tree, dict):
    return {k: (fn(v, spans) if k == 'blocks' and isinstance(v, dict) else _convert(v, spans, fn))
            for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):  # optax's NamedTuple states
    return type(tree)(*(_convert(v, spans, fn) for v in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_convert(v, spans, fn) for v in tree)
  return tree


def _blocks_to_layers(blocks: dict, spans, split) -> dict:
  out = {}
  for index, (first, p, r) in enumerate(entries(spans)):
    if index not in blocks:  # a tree of some blocks only (buffers: the MoE blocks' aux-free biases)
      continue
    if r == 1:
      out[first] = blocks[index]
      continue
    leaves, treedef = jax.tree.flatten(blocks[index])
    rows = [split(x, r) for x in leaves]
    for q in range(r):
      out[first + q * p] = jax.tree.unflatten(treedef, [x[q] for x in rows])
  return dict(sorted(out.items()))


def _blocks_to_stacked(blocks: dict, spans, stack) -> dict:
  out = {}
  for index, (first, p, r) in enumerate(entries(spans)):
    if first not in blocks:
      continue
    rows = [blocks[first + q * p] for q in range(r)]
    out[index] = rows[0] if r == 1 else jax.tree.map(lambda *xs: stack(xs), *rows)
  return out


def row_sharding(sharding):
  """The sharding of one row of a stacked leaf: its own less the 'layers' axis (any other sharding as is)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
  return sharding


def stacked_sharding(sharding):
  """The sharding of a stacked leaf whose rows have `sharding`: the 'layers' axis whole (any other sharding as is)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *tuple(sharding.spec)))
  return sharding


def _split(x, r):
  """The r rows of a stacked leaf (an abstract leaf's rows keep its sharding less the 'layers' axis)."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return [jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=row_sharding(x.sharding))] * r
  return [x[q] for q in range(r)]


def _stack_rows(xs):
  x = xs[0]
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + x.shape, x.dtype, sharding=stacked_sharding(x.sharding))
  return np.stack(xs) if isinstance(x, np.ndarray) else jnp.stack(xs)  # (host trees stay on the host: upcycling)


def run(blocks, x_BLD: jax.Array, train: bool, rng, positions_BL, spans, remat: str, use_ffn: bool = True,
        **block_kwargs: Any) -> tuple[jax.Array, list[dict]]:
  """(x_BLD after every block, per-MoE-layer aux dicts in layer order), scanned and/or rematerialized.

  `spans` None: `blocks` are the layers, run one by one; else `blocks` are the stored blocks of a scanned model
  (`stack_blocks` over these spans) and each span with repeats runs as one scan."""
  save = policy(remat)
  graphdefs, states = zip(*(nnx.split(b) for b in blocks))

  def apply(graphdef, state, x, index):
    x, aux, _ = nnx.merge(graphdef, state)(x, train, _layer_rng(rng, index), positions_BL, None, None, use_ffn,
                                           **block_kwargs)
    return x, aux

  def period_fn(graphdefs_p, scanned):
    def body(x, state_and_index):
      states_p, index_p = state_and_index
      auxes = []
      for j, (g, s) in enumerate(zip(graphdefs_p, states_p)):
        x, aux = apply(g, s, x, index_p[j])
        auxes.append(aux)
      return x, tuple(auxes)
    return body if save is None else jax.checkpoint(body, policy=save, prevent_cse=not scanned)

  layer_aux, entry = [], 0
  for start, p, r in (spans or [(i, 1, 1) for i in range(len(blocks))]):
    body = period_fn(graphdefs[entry:entry + p], r > 1)
    stored = states[entry:entry + p]
    entry += p
    if r == 1:
      x_BLD, auxes = body(x_BLD, (stored, jnp.arange(start, start + p)))
      layer_aux += [a for a in auxes if a is not None]
      continue
    index_RP = jnp.arange(start, start + p * r).reshape(r, p)
    x_BLD, auxes = jax.lax.scan(body, x_BLD, (stored, index_RP))
    for q in range(r):
      layer_aux += [jax.tree.map(lambda a, q=q: a[q], a) for a in auxes if a is not None]
  return x_BLD, layer_aux

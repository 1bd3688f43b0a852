"""The MoE feed-forward layer: a float32 router, routed SwiGLU experts and optional shared experts.

Routed experts come in size classes (`moe.expert_size_classes`; one class when uniform),
each stored at its exact size as `[E_c, D, F_c]`, all under one router. Dispatch
implementations (`moe.dispatch`) agree on outputs and gradients whenever nothing is dropped:
  'dense'    reference: every expert on every token, masked by the gates (E/k times the work);
  'block'    dropless: assignments sorted by expert, each group padded to a block multiple,
             experts run as block matmuls (`routing.block_plan`);
  'ragged'   assignments sorted by expert, three `jax.lax.ragged_dot` calls;
  'capacity' each expert gets a fixed [slots, D] buffer (C per capacity group; T when dropless).
Token dropping (`moe.train_capacity_factor` / `eval_capacity_factor`) is a routing decision made
before dispatch: a dropped assignment's gate is zeroed, so it contributes nothing, whatever the
dispatch; the token still flows through the residual.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config as config_lib, expert_parallel, kernels as kernels_lib, routing
from moejax.kernels import gmm, permute, router
from moejax.layers import MLP, param, swiglu


class ExpertBias(nnx.Variable):
  """Aux-loss-free routing bias [E]: steers selection only; updated by `update_expert_biases`, never by gradients."""


def dense_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, **_):
  """Reference: all E experts on all T tokens; an out-of-range expert id contributes nothing."""
  y_TED = swiglu(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, 'td,edf->tef;tef,efd->ted')
  combine_TE = jnp.einsum('tk,tke->te', gates_TK, jax.nn.one_hot(experts_TK, w_gate_EDF.shape[0], dtype=gates_TK.dtype))
  return jnp.einsum('te,ted->td', combine_TE.astype(y_TED.dtype), y_TED)


def block_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, block_size: int,
                   kernels: str = 'reference', **_):
  """Dropless block-padded dispatch; expert id E (invalid) rows run on the last block's weights and get gate 0.

  `kernels` picks the row permutation and grouped-matmul implementation (moejax.kernels).
  """
  E = w_gate_EDF.shape[0]
  plan = routing.block_plan(experts_TK, E + 1, block_size,
                            ranks=functools.partial(permute.expert_ranks, impl=kernels))
  be = jnp.minimum(plan.block_expert_N, E - 1)
  x_RD = permute.dispatch_rows(x_TD, plan, kernels)
  h_RF = (jax.nn.silu(gmm.block_gmm(x_RD, w_gate_EDF, be, block_size, kernels))
          * gmm.block_gmm(x_RD, w_up_EDF, be, block_size, kernels))
  y_RD = gmm.block_gmm(h_RF, w_down_EFD, be, block_size, kernels)
  return permute.combine_rows(y_RD, gates_TK, plan, kernels)


def ragged_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, **_):
  """Sort assignments by expert and run `jax.lax.ragged_dot` (invalid id E sorts last, outside every group)."""
  T, K = experts_TK.shape
  E = w_gate_EDF.shape[0]
  flat_A = experts_TK.reshape(-1)
  order_A = jnp.argsort(flat_A, stable=True)
  sizes_E = jnp.bincount(flat_A, length=E + 1)[:E].astype(jnp.int32)
  x_AD = x_TD[order_A // K]
  h = jax.nn.silu(jax.lax.ragged_dot(x_AD, w_gate_EDF, sizes_E)) * jax.lax.ragged_dot(x_AD, w_up_EDF, sizes_E)
  y_AD = jax.lax.ragged_dot(h, w_down_EFD, sizes_E)
  y_AD = jnp.where((flat_A[order_A] < E)[:, None], y_AD, 0)  # rows outside every group: defined as zero
  y_TKD = y_AD[jnp.argsort(order_A)].reshape(T, K, -1)
  return jnp.einsum('tk,tkd->td', gates_TK.astype(y_TKD.dtype), y_TKD)


def capacity_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, rank_TK, group_tokens: int,
                      capacity: int, **_):
  """Each expert owns (T/T_g)*C slots; assignment (t, j) of group g = t // T_g goes to slot g*C + rank."""
  T, K = experts_TK.shape
  D = x_TD.shape[1]
  E = w_gate_EDF.shape[0]
  slots = (T // group_tokens) * capacity
  valid_TK = (experts_TK < E) & (rank_TK < capacity)
  slot_TK = experts_TK * slots + (jnp.arange(T) // group_tokens)[:, None] * capacity + rank_TK
  slot_TK = jnp.where(valid_TK, slot_TK, E * slots)  # invalid -> a spare row past the end
  row_token = jnp.full((E * slots + 1,), T, jnp.int32).at[slot_TK.reshape(-1)].set(
      jnp.repeat(jnp.arange(T, dtype=jnp.int32), K))
  x_pad = jnp.concatenate([x_TD, jnp.zeros((1, D), x_TD.dtype)], axis=0)
  x_ESD = x_pad[row_token[:-1]].reshape(E, slots, D)
  y_ESD = swiglu(x_ESD, w_gate_EDF, w_up_EDF, w_down_EFD, 'esd,edf->esf;esf,efd->esd')
  y_rows = jnp.concatenate([y_ESD.reshape(E * slots, D), jnp.zeros((1, D), y_ESD.dtype)], axis=0)
  return jnp.einsum('tk,tkd->td', gates_TK.astype(y_rows.dtype), y_rows[slot_TK])


DISPATCH = {'dense': dense_dispatch, 'block': block_dispatch, 'ragged': ragged_dispatch, 'capacity': capacity_dispatch}


class Experts(nnx.Module):
  """One size class of routed SwiGLU experts, stored at exact size [E_c, D, F_c]."""

  def __init__(self, count: int, dim: int, hidden: int, std: float, out_std: float, rngs: nnx.Rngs):
    self.w_gate = param(rngs, (count, dim, hidden), ('expert', 'embed', 'expert_mlp'), std)
    self.w_up = param(rngs, (count, dim, hidden), ('expert', 'embed', 'expert_mlp'), std)
    self.w_down = param(rngs, (count, hidden, dim), ('expert', 'expert_mlp', 'embed'), out_std)


def balance_coefficient(moe_cfg) -> float:
  """The weight of the layer's load-balancing loss in the total loss."""
  if moe_cfg.load_balancing == 'none':
    return 0.0
  return moe_cfg.aux_free_sequence_coef if moe_cfg.load_balancing == 'aux_free' else moe_cfg.aux_loss_coef


class MoE(nnx.Module):
  """Router + routed experts (+ shared experts). `__call__(x_BLD, train, rng) -> (y_BLD, aux)`."""

  def __init__(self, model_cfg, moe_cfg, std: float, out_std: float, rngs: nnx.Rngs):
    D, E = model_cfg.model_dim, moe_cfg.num_experts
    self.cfg = moe_cfg
    self.classes = config_lib.size_classes(model_cfg, moe_cfg)
    self.w_router = param(rngs, (D, E), ('embed', 'router_experts'), std)
    self.experts = nnx.List([Experts(c, D, f, std, out_std, rngs) for c, f in self.classes])
    # n_sh shared experts of hidden F_sh are exactly one SwiGLU MLP of hidden n_sh * F_sh.
    shared_hidden = moe_cfg.num_shared_experts * config_lib.shared_hidden(model_cfg, moe_cfg)
    self.shared = MLP(D, shared_hidden, std, out_std, rngs) if shared_hidden else None
    self.w_shared_gate = param(rngs, (D, 1), ('embed', None), std) \
        if moe_cfg.use_shared_expert_gate and shared_hidden else None
    self.expert_bias = ExpertBias(jnp.zeros((E,), jnp.float32), logical_axes=('router_experts',)) \
        if moe_cfg.load_balancing == 'aux_free' else None

  def _route(self, x_TD, train: bool, rng):
    c = self.cfg
    x_router = x_TD.astype(jnp.float32)
    if train and c.router_jitter > 0 and rng is not None:
      x_router = x_router * jax.random.uniform(rng, x_router.shape, jnp.float32, 1 - c.router_jitter,
                                               1 + c.router_jitter)
    logits_TE = jnp.dot(x_router, self.w_router[...])
    bias = None if self.expert_bias is None else jax.lax.stop_gradient(self.expert_bias[...])
    renorm = c.use_renormalized_gates or c.router_score == 'sigmoid'
    scores_TE, experts_TK, gates_TK, _ = router.route(
        logits_TE, c.experts_per_token, c.router_score, bias, renorm, c.routed_scaling_factor,
        impl=kernels_lib.resolve(c.kernels), num_groups=c.num_expert_groups, topk_groups=c.topk_expert_groups)
    return logits_TE, scores_TE, experts_TK, gates_TK

  def __call__(self, x_BLD: jax.Array, train: bool = False, rng: jax.Array | None = None):
    B, L, D = x_BLD.shape
    T, c, dt = B * L, self.cfg, x_BLD.dtype
    x_TD = x_BLD.reshape(T, D)
    logits_TE, scores_TE, experts_TK, gates_TK = self._route(x_TD, train, rng)
    factor = c.train_capacity_factor if train else c.eval_capacity_factor
    group = c.capacity_group_tokens or T
    if factor is None and c.dispatch != 'capacity':  # dropless: no queue ranks needed (saves a sort)
      keep_TK, rank_TK = jnp.ones(experts_TK.shape, jnp.bool_), None
    else:
      keep_TK, rank_TK = routing.capacity_keep(experts_TK, gates_TK, c.num_experts, factor, c.drop_policy, group)
    gates_TK = jnp.where(keep_TK, gates_TK, 0.0)
    capacity = group if factor is None else routing.capacity(group, c.experts_per_token, c.num_experts, factor)
    y_TD = jnp.zeros((T, D), jnp.float32)
    offset, ep_mesh, ep_drops = 0, expert_parallel.active_mesh(), []
    impl = kernels_lib.resolve(c.kernels)
    for (count, _), experts in zip(self.classes, self.experts):
      local_TK = experts_TK - offset
      valid_TK = keep_TK & (local_TK >= 0) & (local_TK < count)
      local_TK = jnp.where(valid_TK, local_TK, count)  # id `count` = not this class's / dropped
      class_gates_TK = jnp.where(valid_TK, gates_TK, 0.0)
      w = (experts.w_gate[...].astype(dt), experts.w_up[...].astype(dt), experts.w_down[...].astype(dt))
      if ep_mesh is not None:  # experts sharded over the mesh's expert axis: shard_map all-to-all
        y_class, drop = expert_parallel.expert_parallel_dispatch(
            x_TD, class_gates_TK, local_TK, *w, mesh=ep_mesh, capacity_factor=c.expert_parallel_capacity_factor,
            block_size=lambda rows, n: c.block_size or routing.auto_block_size(rows, n), kernels=impl,
            dispatch=block_dispatch, exchange=c.expert_parallel_exchange)
        ep_drops.append(drop)
      else:
        bs = c.block_size or routing.auto_block_size(T * c.experts_per_token, count)
        y_class = DISPATCH[c.dispatch](x_TD, class_gates_TK, local_TK, *w, block_size=bs, rank_TK=rank_TK,
                                       group_tokens=group, capacity=capacity, kernels=impl)
      y_TD += y_class.astype(jnp.float32)
      offset += count
    if self.shared is not None:
      y_TD += self.shared_output(x_TD)
    aux = self._aux(logits_TE, scores_TE, experts_TK, keep_TK, L)
    if ep_drops:
      aux['ep_drop_fraction'] = sum(ep_drops) / len(ep_drops)
    return y_TD.reshape(B, L, D).astype(dt), aux

  def shared_output(self, x_TD: jax.Array) -> jax.Array:
    """The shared experts' output [T, D] in float32 (times sigmoid(x . w) with the Qwen2-MoE gate)."""
    shared_TD = self.shared(x_TD).astype(jnp.float32)
    if self.w_shared_gate is not None:
      shared_TD = shared_TD * jax.nn.sigmoid(jnp.dot(x_TD.astype(jnp.float32), self.w_shared_gate[...]))
    return shared_TD

  def _aux(self, logits_TE, scores_TE, experts_TK, keep_TK, seq_len: int) -> dict[str, jax.Array]:
    c = self.cfg
    group = {'global_batch': None, 'micro_batch': c.balance_group_sequences * seq_len}.get(c.load_balancing, seq_len)
    aux = {'aux_loss': routing.load_balancing_loss(scores_TE, experts_TK, group),
           'z_loss': routing.router_z_loss(logits_TE),
           'drop_fraction': 1.0 - jnp.mean(keep_TK.astype(jnp.float32))}
    aux.update(routing.routing_stats(routing.normalized_scores(scores_TE), experts_TK))
    aux['bias_abs_mean'] = jnp.zeros(()) if self.expert_bias is None else jnp.mean(jnp.abs(self.expert_bias[...]))
    return aux


def update_expert_biases(buffers: dict, counts_ME: jax.Array, rate: float) -> dict:
  """Aux-free update after a step: b <- b + rate * sign(mean(c) - c) for each MoE layer, in layer order."""
  blocks = dict(buffers.get('blocks', {}))
  layers = sorted(i for i, b in blocks.items() if 'expert_bias' in b.get('ffn', {}))
  for j, i in enumerate(layers):
    counts = counts_ME[j].astype(jnp.float32)
    bias = blocks[i]['ffn']['expert_bias']
    blocks[i] = dict(blocks[i], ffn=dict(blocks[i]['ffn'], expert_bias=bias + rate * jnp.sign(jnp.mean(counts) - counts)))
  return dict(buffers, blocks=blocks)

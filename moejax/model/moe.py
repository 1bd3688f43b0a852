"""The MoE feed-forward layer: a float32 router, routed SwiGLU experts and optional shared experts.

Routed experts come in size classes (`moe.expert_size_classes`; one class when uniform),
each stored at its exact size as `[E_c, D, F_c]`, all under one router. The dispatch that
brings tokens to experts is chosen per call: the configured many-token `moe.dispatch`
(training, scoring, prefill) or a few-token one for decode steps (`moejax.model.dispatch`).
Token dropping (`moe.train_capacity_factor` / `eval_capacity_factor`) is a routing decision made
before dispatch: a dropped assignment's gate is zeroed, so it contributes nothing, whatever the
dispatch; the token still flows through the residual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax import config as config_lib, kernels as kernels_lib, routing
from moejax.parallel import expert as expert_parallel
from moejax.kernels import router
from moejax.model import dispatch as dispatch_lib
from moejax.model.layers import MLP, param


class ExpertBias(nnx.Variable):
  """Aux-loss-free routing bias [E]: steers selection only; updated by `update_expert_biases`, never by gradients."""




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
    # Named for model.remat='moe', which keeps the routing and recomputes the experts (moejax/model/stack.py).
    experts_TK, gates_TK = checkpoint_name(experts_TK, 'router_experts'), checkpoint_name(gates_TK, 'router_gates')
    return logits_TE, scores_TE, experts_TK, gates_TK

  def __call__(self, x_BLD: jax.Array, train: bool = False, rng: jax.Array | None = None,
               dispatch: str | None = None, valid_BL: jax.Array | None = None):
    """(y_BLD, aux). `dispatch`: None or 'model' for the configured `moe.dispatch`, 'distinct' or
    'gather' for a few-token dispatch (decode steps; dropless, evaluation routing). With a dispatch
    named, aux also holds the routing, 'experts_TK'. `valid_BL` (document masking): only those tokens
    count in the losses and statistics, and the others queue last for capacity (token choice only)."""
    if self.cfg.routing == 'expert_choice':
      return self._expert_choice(x_BLD, train, rng, dispatch, valid_BL)
    B, L, D = x_BLD.shape
    T, c, dt = B * L, self.cfg, x_BLD.dtype
    x_TD = x_BLD.reshape(T, D)
    valid_T = None if valid_BL is None else valid_BL.reshape(T)
    logits_TE, scores_TE, experts_TK, gates_TK = self._route(x_TD, train, rng)
    if dispatch in dispatch_lib.FEW_TOKEN:
      return self._few_tokens(x_TD, experts_TK, gates_TK, dispatch_lib.FEW_TOKEN[dispatch]).reshape(B, L, D).astype(
          dt), {'experts_TK': experts_TK}
    factor = c.train_capacity_factor if train else c.eval_capacity_factor
    group = c.capacity_group_tokens or T
    if factor is None and c.dispatch != 'capacity':  # dropless: no queue ranks needed (saves a sort)
      keep_TK, rank_TK = jnp.ones(experts_TK.shape, jnp.bool_), None
    else:
      keep_TK, rank_TK = routing.capacity_keep(experts_TK, gates_TK, c.num_experts, factor, c.drop_policy, group,
                                               valid_T)
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
            dispatch=dispatch_lib.block_dispatch, exchange=c.expert_parallel_exchange)
        ep_drops.append(drop)
      else:
        bs = c.block_size or routing.auto_block_size(T * c.experts_per_token, count)
        y_class = dispatch_lib.MANY_TOKEN[c.dispatch](x_TD, class_gates_TK, local_TK, *w, block_size=bs, rank_TK=rank_TK,
                                       group_tokens=group, capacity=capacity, kernels=impl)
      y_TD += y_class.astype(jnp.float32)
      offset += count
    if self.shared is not None:
      y_TD += self.shared_output(x_TD)
    aux = self._aux(logits_TE, scores_TE, experts_TK, keep_TK, L, valid_T)
    if ep_drops:
      aux['ep_drop_fraction'] = sum(ep_drops) / len(ep_drops)
    if dispatch is not None:
      aux = {'experts_TK': experts_TK}
    return y_TD.reshape(B, L, D).astype(dt), aux

  def _expert_choice(self, x_BLD, train: bool, rng, dispatch, valid_BL=None):
    """Expert-choice routing over groups of the batch's B tokens at one position (docs/studies.md).

    Grouping by position keeps routing causal: a token competes only with tokens at its own
    position in other sequences, never with a later token of its own sequence. With a
    dispatch named (analysis), aux['experts_TK'] is [T, E]: e where expert e took the token, else E.
    """
    B, L, D = x_BLD.shape
    c, dt, E = self.cfg, x_BLD.dtype, self.cfg.num_experts
    x_LBD = jnp.swapaxes(x_BLD, 0, 1)
    x_router = x_LBD.astype(jnp.float32)
    if train and c.router_jitter > 0 and rng is not None:
      x_router = x_router * jax.random.uniform(rng, x_router.shape, jnp.float32, 1 - c.router_jitter,
                                               1 + c.router_jitter)
    logits_LBE = jnp.einsum('lbd,de->lbe', x_router, self.w_router[...])
    scores_LBE = routing.router_scores(logits_LBE, c.router_score)
    valid_LB = None if valid_BL is None else jnp.swapaxes(valid_BL, 0, 1)
    # Padding (document masking's segment 0) goes last: an expert takes it only when its position has fewer valid
    # tokens than the capacity, with gate 0 (scores are >= 0: softmax or sigmoid).
    choose_LBE = scores_LBE if valid_LB is None else jnp.where(valid_LB[..., None], scores_LBE, -1.0)
    tokens_LEC, gates_LEC = routing.expert_choice(choose_LBE, routing.expert_choice_capacity(B, c.experts_per_token, E))
    gates_LEC = jnp.maximum(gates_LEC, 0.0) * c.routed_scaling_factor
    y_LBD, offset = jnp.zeros((L, B, D), jnp.float32), 0
    for (count, _), experts in zip(self.classes, self.experts):
      w = (experts.w_gate[...].astype(dt), experts.w_up[...].astype(dt), experts.w_down[...].astype(dt))
      y_LBD += dispatch_lib.expert_choice_dispatch(x_LBD, tokens_LEC[:, offset:offset + count],
                                                   gates_LEC[:, offset:offset + count], *w)
      offset += count
    y_TD = jnp.swapaxes(y_LBD, 0, 1).reshape(B * L, D)
    if self.shared is not None:
      y_TD += self.shared_output(x_BLD.reshape(B * L, D))
    if dispatch is not None:
      taken_LBE = jnp.zeros((L, B, E), jnp.bool_).at[jnp.arange(L)[:, None, None], tokens_LEC,
                                                     jnp.arange(E)[None, :, None]].set(True)
      experts_TE = jnp.where(jnp.swapaxes(taken_LBE, 0, 1), jnp.arange(E), E).reshape(B * L, E).astype(jnp.int32)
      return y_TD.reshape(B, L, D).astype(dt), {'experts_TK': experts_TE}
    aux = {'aux_loss': jnp.zeros((), jnp.float32), 'z_loss': routing.router_z_loss(logits_LBE.reshape(-1, E)),
           **routing.expert_choice_stats(scores_LBE, tokens_LEC, valid_LB), 'bias_abs_mean': jnp.zeros((), jnp.float32)}
    return y_TD.reshape(B, L, D).astype(dt), aux

  def _few_tokens(self, x_TD, experts_TK, gates_TK, routed) -> jax.Array:
    """Dropless y_TD (float32) through a few-token dispatch, per size class, plus the shared experts."""
    y_TD = jnp.zeros(x_TD.shape, jnp.float32)
    offset = 0
    for (count, _), experts in zip(self.classes, self.experts):
      local_TK = experts_TK - offset
      valid_TK = (local_TK >= 0) & (local_TK < count)
      y_TD += routed(x_TD, experts, jnp.where(valid_TK, local_TK, count), jnp.where(valid_TK, gates_TK, 0.0), count)
      offset += count
    if self.shared is not None:
      y_TD += self.shared_output(x_TD)
    return y_TD

  def shared_output(self, x_TD: jax.Array) -> jax.Array:
    """The shared experts' output [T, D] in float32 (times sigmoid(x . w) with the Qwen2-MoE gate)."""
    shared_TD = self.shared(x_TD).astype(jnp.float32)
    if self.w_shared_gate is not None:
      shared_TD = shared_TD * jax.nn.sigmoid(jnp.dot(x_TD.astype(jnp.float32), self.w_shared_gate[...]))
    return shared_TD

  def _aux(self, logits_TE, scores_TE, experts_TK, keep_TK, seq_len: int, valid_T=None) -> dict[str, jax.Array]:
    c = self.cfg
    group = {'global_batch': None, 'micro_batch': c.balance_group_sequences * seq_len}.get(c.load_balancing, seq_len)
    if valid_T is None:
      aux = {'aux_loss': routing.load_balancing_loss(scores_TE, experts_TK, group),
             'z_loss': routing.router_z_loss(logits_TE),
             'drop_fraction': 1.0 - jnp.mean(keep_TK.astype(jnp.float32)),
             # P_i of the global-batch loss, for gradient accumulation's exact whole-batch loss (moejax/train/accumulate.py)
             'balance_scores': jnp.mean(routing.normalized_scores(scores_TE), axis=0)}
    else:
      w_T = valid_T.astype(jnp.float32)
      aux = {'aux_loss': routing.load_balancing_loss(scores_TE, experts_TK, group, valid_T),
             'z_loss': routing.router_z_loss(logits_TE, valid_T),
             'drop_fraction': 1.0 - routing.masked_mean(jnp.mean(keep_TK.astype(jnp.float32), axis=1), valid_T),
             'balance_scores': (jnp.sum(routing.normalized_scores(scores_TE) * w_T[:, None], axis=0)
                                / jnp.maximum(jnp.sum(w_T), 1.0))}
    aux.update(routing.routing_stats(routing.normalized_scores(scores_TE), experts_TK, valid_T))
    aux['bias_abs_mean'] = jnp.zeros(()) if self.expert_bias is None else jnp.mean(jnp.abs(self.expert_bias[...]))
    return aux


def update_expert_biases(buffers: dict, counts_ME: jax.Array, rate: float, spans=None) -> dict:
  """Aux-free update after a step: b <- b + rate * sign(mean(c) - c) for each MoE layer, in layer order (`spans`: a
  scanned model's stored layout, `model.stack`: its stacked biases are updated per layer)."""
  from moejax.model import stack  # pylint: disable=import-outside-toplevel
  if spans:
    return stack.to_stacked(update_expert_biases(stack.to_layers(buffers, spans), counts_ME, rate), spans)
  blocks = dict(buffers.get('blocks', {}))
  layers = sorted(i for i, b in blocks.items() if 'expert_bias' in b.get('ffn', {}))
  for j, i in enumerate(layers):
    counts = counts_ME[j].astype(jnp.float32)
    bias = blocks[i]['ffn']['expert_bias']
    blocks[i] = dict(blocks[i], ffn=dict(blocks[i]['ffn'], expert_bias=bias + rate * jnp.sign(jnp.mean(counts) - counts)))
  return dict(buffers, blocks=blocks)

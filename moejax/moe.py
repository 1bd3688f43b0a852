"""The MoE feed-forward layer: a float32 softmax top-k router and SwiGLU experts [E, D, F].

Dispatch implementations (config `moe.dispatch`), equal on outputs and gradients:
  'block' -- dropless: sort the T*k assignments by expert, pad each expert's group to a
             multiple of the block size, and run the experts as block matmuls over
             gathered rows (fast on CPU; compute ~ T*k rows plus at most E*(bs-1) padding).
  'dense' -- the slow reference: every expert on every token, then mask with the gates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import routing
from moejax.layers import param, swiglu


def dense_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Reference: run all E experts on all T tokens and combine with the top-k gates."""
  y_TED = swiglu(x_TD, w_gate_EDF, w_up_EDF, w_down_EFD, 'td,edf->tef;tef,efd->ted')
  combine_TE = jnp.einsum('tk,tke->te', gates_TK, jax.nn.one_hot(experts_TK, w_gate_EDF.shape[0], dtype=gates_TK.dtype))
  return jnp.einsum('te,ted->td', combine_TE.astype(y_TED.dtype), y_TED)


def block_dispatch(x_TD, gates_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD, block_size: int):
  """Dropless block-padded dispatch (see `routing.block_plan`)."""
  T, D = x_TD.shape
  plan = routing.block_plan(experts_TK, w_gate_EDF.shape[0], block_size)
  x_pad = jnp.concatenate([x_TD, jnp.zeros((1, D), x_TD.dtype)], axis=0)  # row T = zero padding input
  x_NBD = x_pad[plan.row_token_R].reshape(-1, block_size, D)
  be = plan.block_expert_N
  y_NBD = swiglu(x_NBD, w_gate_EDF[be], w_up_EDF[be], w_down_EFD[be], 'nbd,ndf->nbf;nbf,nfd->nbd')
  y_TKD = y_NBD.reshape(-1, D)[plan.assign_row_TK]
  return jnp.einsum('tk,tkd->td', gates_TK.astype(y_TKD.dtype), y_TKD)


class MoE(nnx.Module):
  """Router + routed SwiGLU experts; returns (y_BLD, aux) where aux holds losses and routing stats."""

  def __init__(self, dim: int, moe_cfg, hidden: int, std: float, out_std: float, rngs: nnx.Rngs):
    E = moe_cfg.num_experts
    self.num_experts, self.k = E, moe_cfg.experts_per_token
    self.renormalize = moe_cfg.use_renormalized_gates
    self.dispatch, self.block_size = moe_cfg.dispatch, moe_cfg.block_size
    self.w_router = param(rngs, (dim, E), ('embed', 'router_experts'), std)
    self.w_gate = param(rngs, (E, dim, hidden), ('expert', 'embed', 'expert_mlp'), std)
    self.w_up = param(rngs, (E, dim, hidden), ('expert', 'embed', 'expert_mlp'), std)
    self.w_down = param(rngs, (E, hidden, dim), ('expert', 'expert_mlp', 'embed'), out_std)

  def __call__(self, x_BLD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    B, L, D = x_BLD.shape
    dt = x_BLD.dtype
    x_TD = x_BLD.reshape(B * L, D)
    logits_TE = jnp.dot(x_TD.astype(jnp.float32), self.w_router[...])
    probs_TE = routing.router_probs(logits_TE)
    gates_TK, experts_TK = routing.top_k_gates(probs_TE, self.k, self.renormalize)
    weights = (self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt))
    if self.dispatch == 'dense':
      y_TD = dense_dispatch(x_TD, gates_TK, experts_TK, *weights)
    else:
      bs = self.block_size or routing.auto_block_size(B * L * self.k, self.num_experts)
      y_TD = block_dispatch(x_TD, gates_TK, experts_TK, *weights, block_size=bs)
    aux = {'aux_loss': routing.switch_aux_loss(probs_TE, experts_TK), 'z_loss': routing.router_z_loss(logits_TE)}
    aux.update(routing.routing_stats(probs_TE, experts_TK))
    return y_TD.reshape(B, L, D).astype(dt), aux

"""Parameter, FLOP and memory accounting from a config alone (docs/moe.md, "Accounting").

Conventions:
- N_total counts every parameter (all experts); N_active counts only the k routed
  experts a token uses (the router is active for every token). "nonembed" drops the
  input embedding and the output projection (tied or not); the final norm stays.
- Memory budgets use totals with embeddings; scaling-law fits use non-embedding counts.
- flops_per_token is the *training* cost, 3x the forward: forward = 2 * N_active_matmul
  + 4 * L * H * d_head * n_ctx (QK^T and AV over every position: the attention computes the
  masked blocks too, so the causal mask halves nothing; docs/moe.md), where
  N_active_matmul is the active non-embedding matmul weights (router included) plus the
  output projection V*D. Input-embedding lookups and norms are not FLOPs here.
"""

from __future__ import annotations

import math
from typing import Any

from moejax import config as config_lib


def _attention_params(m) -> int:
  hd = config_lib.head_dim(m)
  return m.model_dim * m.num_heads * hd * 2 + 2 * m.model_dim * m.num_kv_heads * hd + _qkv_bias_params(m)


def _qkv_bias_params(m) -> int:
  """Query, key and value biases per layer (`model.use_qkv_bias`): counted as parameters, not as matmul FLOPs."""
  return (m.num_heads + 2 * m.num_kv_heads) * config_lib.head_dim(m) if m.use_qkv_bias else 0


def _qk_norm_params(m) -> int:
  """QK-norm scales per layer: 2 * d_h per head, or (H + H_kv) * d_h over the whole projections."""
  if not m.use_qk_norm:
    return 0
  hd = config_lib.head_dim(m)
  return 2 * hd if m.qk_norm_scope == 'head' else (m.num_heads + m.num_kv_heads) * hd


def _exact(x: float) -> int | float:
  return int(round(x)) if abs(x - round(x)) < 1e-6 else x


def routed_expert_sizes(cfg) -> list[int]:
  """Parameters of each routed expert [E] (3 * D * F_i for SwiGLU), in router order."""
  return [3 * cfg.model.model_dim * hidden for count, hidden in config_lib.size_classes(cfg.model, cfg.moe)
          for _ in range(count)]


def experts_per_token(cfg) -> int | float:
  """Routed experts a token uses: k for token choice; for expert choice the mean E*C/B over a training group of
  B tokens (C = ceil(k*B/E), `routing.expert_choice_capacity`), which exceeds k when k*B/E is not whole."""
  e, k = cfg.moe, cfg.moe.experts_per_token
  if e.routing != 'expert_choice':
    return k
  B = cfg.train.batch_size
  return _exact(min(B, math.ceil(k * B / e.num_experts)) * e.num_experts / B)


def count(cfg) -> dict[str, Any]:
  """Returns the accounting record for a validated config.

  Counts are exact integers, except N_active with heterogeneous experts: there it is the
  expectation under uniform routing (k/E of all routed-expert parameters); `measured_active`
  gives the value under the routing a trained model actually produced.
  """
  m, e = cfg.model, cfg.moe
  D, V = m.model_dim, config_lib.vocab_size(cfg)
  n_moe = len(config_lib.moe_layers(m, e))
  n_dense = m.num_layers - n_moe
  attn = _attention_params(m)
  norms = 2 * D + _qk_norm_params(m)
  dense_ffn = 3 * D * m.ffn_hidden
  E = e.num_experts
  k = experts_per_token(cfg) if E else 0
  routed = sum(routed_expert_sizes(cfg)) if E else 0
  shared = (e.num_shared_experts * 3 * D * config_lib.shared_hidden(m, e) + (D if e.use_shared_expert_gate and
                                                                             e.num_shared_experts else 0)) if E else 0
  always = D * E + shared  # router (active for every token) and shared experts
  embed = V * D * (1 if m.use_tied_embeddings else 2)
  base = m.num_layers * (attn + norms) + n_dense * dense_ffn
  total_nonembed = base + n_moe * (always + routed) + D  # + final norm
  active_nonembed = _exact(base + n_moe * (always + (routed * k / E if E else 0)) + D)
  active_matmul = active_nonembed - D - m.num_layers * (norms + _qkv_bias_params(m)) + V * D
  attn_flops = 4 * m.num_layers * m.num_heads * config_lib.head_dim(m) * cfg.data.seq_len
  forward = _exact(2 * active_matmul + attn_flops)
  classes = config_lib.size_classes(m, e) if E else []
  return {
      'n_total': total_nonembed + embed,
      'n_active': _exact(active_nonembed + embed),
      'n_total_nonembed': total_nonembed,
      'n_active_nonembed': active_nonembed,
      'n_embed': embed,
      'num_moe_layers': n_moe,
      'num_experts': E,
      'routing': e.routing if E else 'none',
      'experts_per_token': k,
      'expert_hidden': (config_lib.expert_hidden(m, e) if len(classes) == 1 else
                        _exact(sum(c * f for c, f in classes) / E)) if E else 0,
      'expert_size_classes': [list(c) for c in classes],
      'num_shared_experts': e.num_shared_experts if E else 0,
      'sparsity': E / k if E else 1.0,
      'active_expert_ratio': E / k if E else 1.0,  # under uniform routing; see measured_active
      'granularity': D * E / sum(c * f for c, f in classes) if E else 0.0,
      'flops_per_token_forward': forward,
      'flops_per_token': _exact(3 * forward),
      'param_bytes_float32': 4 * (total_nonembed + embed),
      'param_bytes_bfloat16': 2 * (total_nonembed + embed),
      'buffer_floats': n_moe * E if e.load_balancing == 'aux_free' and E else 0,  # aux-free biases, not parameters
  }


def measured_active(cfg, counts_ME) -> dict[str, float]:
  """N_active and the active-expert ratio under measured routing: counts_ME[l, i] = assignments to expert i.

  Per MoE layer the routed parameters a token uses are k * sum_i (c_i / sum_j c_j) * P_i.
  """
  acc = count(cfg)
  if not acc['num_experts']:
    return {'n_active_measured': acc['n_active'], 'active_expert_ratio_measured': 1.0}
  sizes = routed_expert_sizes(cfg)
  k = acc['experts_per_token']
  uniform = k * sum(sizes) / len(sizes)
  used = [k * sum(c * p for c, p in zip(row, sizes)) / max(sum(row), 1e-9) for row in counts_ME]
  return {'n_active_measured': acc['n_active'] + sum(u - uniform for u in used),
          'active_expert_ratio_measured': sum(sizes) / (sum(used) / len(used))}


def human(n: float) -> str:
  """12_345_678 -> '12.35M'."""
  for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= scale:
      return f'{n / scale:.2f}{unit}'
  return f'{n:g}'


def param_count_tree(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  import jax  # pylint: disable=import-outside-toplevel  (the study tools import this module without jax)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))

"""Parameter, FLOP and memory accounting from a config alone (SCIENCE.md §1).

Conventions:
- N_total counts every parameter (all experts); N_active counts only the k routed
  experts a token uses (the router is active for every token). "nonembed" drops the
  input embedding and the output projection (tied or not); the final norm stays.
- Memory budgets use totals with embeddings; scaling-law fits use non-embedding counts.
- flops_per_token is the *training* cost, 3x the forward: forward = 2 * N_active_matmul
  + 2 * L * H * d_head * n_ctx (causal QK^T and AV, halved for the mask), where
  N_active_matmul is the active non-embedding matmul weights (router included) plus the
  output projection V*D. Input-embedding lookups and norms are not FLOPs here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
from absl import app, flags

from moejax import config as config_lib


def _attention_params(m) -> int:
  hd = config_lib.head_dim(m)
  return m.model_dim * m.num_heads * hd * 2 + 2 * m.model_dim * m.num_kv_heads * hd


def count(cfg) -> dict[str, Any]:
  """Returns the accounting record for a validated config (all counts are exact integers)."""
  m, e = cfg.model, cfg.moe
  D, V = m.model_dim, m.vocab_size
  n_moe = len(config_lib.moe_layers(m, e))
  n_dense = m.num_layers - n_moe
  attn = _attention_params(m)
  norms = 2 * D
  dense_ffn = 3 * D * m.ffn_hidden
  E, k = e.num_experts, e.experts_per_token if e.num_experts else 1
  F_e = config_lib.expert_hidden(m, e)
  expert = 3 * D * F_e
  router = D * E
  embed = V * D * (1 if m.use_tied_embeddings else 2)
  layers_total = m.num_layers * (attn + norms) + n_dense * dense_ffn + n_moe * (router + E * expert)
  layers_active = m.num_layers * (attn + norms) + n_dense * dense_ffn + n_moe * (router + k * expert)
  total_nonembed = layers_total + D  # + final norm
  active_nonembed = layers_active + D
  active_matmul = layers_active - m.num_layers * norms + V * D
  attn_flops = 2 * m.num_layers * m.num_heads * config_lib.head_dim(m) * cfg.data.seq_len
  forward = 2 * active_matmul + attn_flops
  return {
      'n_total': total_nonembed + embed,
      'n_active': active_nonembed + embed,
      'n_total_nonembed': total_nonembed,
      'n_active_nonembed': active_nonembed,
      'n_embed': embed,
      'num_moe_layers': n_moe,
      'num_experts': E,
      'experts_per_token': k if E else 0,
      'expert_hidden': F_e if E else 0,
      'sparsity': E / k if E else 1.0,
      'granularity': D / F_e if E else 0.0,
      'flops_per_token_forward': forward,
      'flops_per_token': 3 * forward,
      'param_bytes_float32': 4 * (total_nonembed + embed),
      'param_bytes_bfloat16': 2 * (total_nonembed + embed),
  }


def human(n: float) -> str:
  """12_345_678 -> '12.35M'."""
  for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= scale:
      return f'{n / scale:.2f}{unit}'
  return f'{n:g}'


def param_count_tree(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _main(argv):
  del argv
  if flags.FLAGS.config is None:
    raise app.UsageError('--config is required')
  cfg = config_lib.validate(flags.FLAGS.config)
  record = count(cfg)
  if flags.FLAGS.json:
    print(json.dumps(record, indent=2))
    return
  for key, value in record.items():
    print(f'{key:>24}: {value:,}' if isinstance(value, int) else f'{key:>24}: {value:.4g}')


if __name__ == '__main__':
  from moejax import main as main_lib  # pylint: disable=import-outside-toplevel
  main_lib.define_config_flag()
  flags.DEFINE_bool('json', False, 'Print the record as JSON.')
  main_lib.cli(_main)

"""The bandwidth model of a decode step: bytes read per step, and the time they take at a memory bandwidth.

At decode a step runs B tokens (one per sequence) through the model. With so few tokens a step
is bound by memory traffic, not FLOPs, and it reads:
  - every non-expert weight once (attention, norms, routers, shared experts, dense FFNs, the
    output projection; of an untied input embedding only the B rows looked up);
  - every routed expert that at least one of the B tokens selected, once;
  - the KV cache each sequence attends over: 2 * L * B * n_ctx * H_kv * d_head elements (and B new
    entries written).
Under uniform routing each token selects expert i with probability k/E, so a layer touches
  E * (1 - (1 - k/E)^B)
distinct experts in expectation (`expected_distinct`); with measured selection probabilities p_i
(sum k) it is sum_i 1 - (1 - p_i)^B (`expected_distinct_from_loads`). For tokens routed
independently the uniform value is the largest (1 - (1 - p)^B is concave in p), so skew lowers it.
At a fixed sparsity s = E/k the touched fraction 1 - (1 - 1/s)^B depends on s and B only: the
routed bytes a step reads are N_routed * (1 - (1 - 1/s)^B).

`step_bytes` prices a config; `moejax.design` prices its grid with the same formula
(`design.decode_bytes`, checked equal in tests); `python -m moejax.bench decode` measures it.
No jax here: the study tools import this module.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moejax import config as config_lib
from moejax.model import accounting


def expected_distinct(num_experts, topk, batch):
  """Expected distinct experts per layer touched by `batch` tokens routed uniformly (numpy-broadcastable)."""
  E = np.asarray(num_experts, dtype=np.float64)
  return E * (1.0 - (1.0 - np.asarray(topk, np.float64) / E) ** np.asarray(batch, np.float64))


def expected_distinct_from_loads(probs_E: Sequence[float], batch: int) -> float:
  """Expected distinct experts when token i selects expert e with probability probs_E[e] (sum k), independently."""
  p = np.clip(np.asarray(probs_E, np.float64), 0.0, 1.0)
  return float(np.sum(1.0 - (1.0 - p) ** batch))


def kv_bytes(layers, kv_heads, head_dim, batch, context, kv_bytes_per_element):
  """KV-cache bytes a decode step reads (keys and values of `context` positions for `batch` sequences)."""
  return 2.0 * layers * kv_heads * head_dim * batch * context * kv_bytes_per_element


def step_bytes(cfg, batch: int, context: int, param_bytes: float, kv_bytes_per_element: float,
               touched_expert_params: Sequence[float] | None = None) -> dict[str, float]:
  """Bytes one decode step of `batch` tokens reads from memory, with the cache holding `context` positions.

  touched_expert_params: routed-expert parameters read per MoE layer (measured); default the uniform
  expectation sum_i P_i * (1 - (1 - k/E)^B). Returns weights_nonexpert, weights_experts, kv and total
  bytes, and the expected distinct experts per layer under uniform routing.
  """
  acc = accounting.count(cfg)
  m = cfg.model
  D, V = m.model_dim, config_lib.vocab_size(cfg)
  n_moe, E, k = acc['num_moe_layers'], acc['num_experts'], acc['experts_per_token']
  sizes = accounting.routed_expert_sizes(cfg) if E else []
  routed_total = n_moe * sum(sizes)
  nonexpert = acc['n_total'] - routed_total
  if not m.use_tied_embeddings:  # only the looked-up rows of the input table are read
    nonexpert -= V * D - min(batch, V) * D
  if touched_expert_params is None:
    touched = n_moe * sum(sizes) * (1.0 - (1.0 - k / E) ** batch) if E else 0.0
  else:
    if len(touched_expert_params) != n_moe:
      raise ValueError(f'{len(touched_expert_params)} touched-expert counts for {n_moe} MoE layers')
    touched = float(sum(touched_expert_params))
  kv = kv_bytes(m.num_layers, m.num_kv_heads, config_lib.head_dim(m), batch, context, kv_bytes_per_element)
  kv += 2.0 * m.num_layers * m.num_kv_heads * config_lib.head_dim(m) * batch * kv_bytes_per_element  # the write
  out = {'weights_nonexpert': nonexpert * param_bytes, 'weights_experts': touched * param_bytes, 'kv': kv,
         'distinct_experts_uniform': float(expected_distinct(E, k, batch)) if E else 0.0}
  out['total'] = out['weights_nonexpert'] + out['weights_experts'] + out['kv']
  return out


def step_flops(cfg, batch: int, context: int) -> float:
  """Matmul FLOPs of one decode step of `batch` tokens attending over `context` positions (the compute side of
  the roofline): per token, 2 x active matmul parameters (k experts per MoE layer, the output projection) plus
  4 * layers * heads * head_dim * context for the scores and the weighted values."""
  m = cfg.model
  acc = accounting.count(cfg)
  attention_per_position = 4 * m.num_layers * m.num_heads * config_lib.head_dim(m)
  per_token = acc['flops_per_token_forward'] - attention_per_position * cfg.data.seq_len
  return float(batch) * (per_token + attention_per_position * context)

"""KV-cache decoding: prefill a batch of prompts, then one jitted, donated step per token.

The cache is preallocated per attention layer: keys and values [B, H_kv, T_max, K] in the
compute dtype, written at each row's own positions (prompts of different lengths share a
batch). Prefill runs the prompts right-padded to one length and writes every position; a row's
padding is overwritten by its generated tokens before any query can attend to it, because a
query at position p attends to keys at positions <= p only. Rotary embeddings use absolute
positions, so a decoded token gets exactly the rotation the full-sequence forward gives it.

The FFN of each block is the model's own module (dense SwiGLU or `moejax.moe.MoE`, every routed
design): routing is per token, so at decode it sees the B new tokens as a batch of B. It runs
with the evaluation settings (`moe.eval_capacity_factor`); with a capacity factor the routing
of a token would depend on the other tokens of its step, so decoding requires dropless
evaluation (checked).

The reference twin is the full-sequence forward (`Transformer.__call__`): per-position logits
from prefill + decode equal it (tests/decode_test.py).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.layers import Attention, rotary, swiglu
from moejax.model import Transformer
from moejax.moe import MoE


class Cache(NamedTuple):
  """Keys and values per attention layer, [B, H_kv, T_max, K] each.

  Heads before positions: the attention's batched matmuls (batch dims b, h) then read the cache in
  place; with [B, T, H, K] XLA:CPU transposed the whole cache every step and rewrote it in the
  scatter's loop fusion (docs/inference.md).
  """
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]


def check_decodable(cfg) -> None:
  """Decoding needs dropless evaluation: a capacity factor makes a token's routing depend on its batch."""
  if cfg.moe.num_experts and cfg.moe.eval_capacity_factor is not None:
    raise ConfigError(f'moe.eval_capacity_factor={cfg.moe.eval_capacity_factor}: decoding needs dropless evaluation '
                      '(a capacity limit would make a token\'s experts depend on the other tokens of its step); '
                      'set it to None')


def init_cache(model: Transformer, batch: int, max_len: int) -> Cache:
  """A zeroed cache for `batch` sequences of at most `max_len` tokens."""
  shapes = []
  for block in model.blocks:
    attn = block.attn
    kv_heads, head_dim = attn.wk.shape[1], attn.wk.shape[2]
    shapes.append((batch, kv_heads, max_len, head_dim))
  zeros = tuple(jnp.zeros(s, model.dtype) for s in shapes)
  return Cache(zeros, tuple(jnp.zeros(s, model.dtype) for s in shapes))


def _attention(attn: Attention, x_BLD, keys_BGTK, values_BGTK, positions_BL):
  """Attention of L new tokens at `positions_BL` over the cache; returns (output, keys, values) with theirs written."""
  dt = x_BLD.dtype
  q, k, v = attn.project(x_BLD)  # (biases and QK-norm, per head or per projection, as in `Attention`)
  q, k = rotary(q, attn.rope_base, positions_BL), rotary(k, attn.rope_base, positions_BL)
  rows = jnp.arange(x_BLD.shape[0])[:, None]
  # (advanced indices split by a slice: the indexed block is [B, L, H_kv, K], the layout of k and v)
  keys_BGTK = keys_BGTK.at[rows, :, positions_BL].set(k.astype(keys_BGTK.dtype))
  values_BGTK = values_BGTK.at[rows, :, positions_BL].set(v.astype(values_BGTK.dtype))
  B, L, H, K = q.shape
  Hkv = keys_BGTK.shape[1]
  q_BLGRK = q.reshape(B, L, Hkv, H // Hkv, K)  # query heads grouped over their kv head (GQA)
  scores = jnp.einsum('blgrk,bgtk->bgrlt', q_BLGRK, keys_BGTK.astype(dt)).astype(jnp.float32) / jnp.sqrt(
      jnp.float32(K))
  visible_BLT = jnp.arange(keys_BGTK.shape[2])[None, None, :] <= positions_BL[:, :, None]
  scores = jnp.where(visible_BLT[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  o = jnp.einsum('bgrlt,bgtk->blgrk', probs, values_BGTK.astype(dt)).reshape(B, L, H, K)
  return jnp.einsum('blhk,hkd->bld', o, attn.wo[...].astype(dt)), keys_BGTK, values_BGTK


def _few_token_moe(moe: MoE, x_BLD: jax.Array, routed) -> tuple[jax.Array, jax.Array]:
  """The MoE layer for a few tokens: `MoE._route`'s routing, then per size class
  routed(x_TD, experts, local_TK, g_TK, count) -> float32 [T, D], where local_TK holds the class's local expert
  ids (`count` for slots routed to another class) and g_TK their gates (zero there); plus the shared experts.
  Returns (y_BLD, experts_TK)."""
  B, L, D = x_BLD.shape
  x_TD = x_BLD.reshape(B * L, D)
  _, _, experts_TK, gates_TK = moe._route(x_TD, False, None)  # pylint: disable=protected-access
  y_TD = jnp.zeros((B * L, D), jnp.float32)
  offset = 0
  for (count, _), experts in zip(moe.classes, moe.experts):
    local_TK = experts_TK - offset
    valid_TK = (local_TK >= 0) & (local_TK < count)
    y_TD += routed(x_TD, experts, jnp.where(valid_TK, local_TK, count), jnp.where(valid_TK, gates_TK, 0.0), count)
    offset += count
  if moe.shared is not None:
    y_TD += moe.shared_output(x_TD)
  return y_TD.reshape(B, L, D).astype(x_BLD.dtype), experts_TK


def moe_gather(moe: MoE, x_BLD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The MoE layer for a few tokens: gathers the selected experts' weights ([T, k, D, F] per size class).

  Reads the T*k selected experts (with repeats) and nothing else: the weights are gathered in
  their stored dtype and cast afterwards. The gather materializes a copy (a read and a write of
  T*k experts) before the matmuls read it again, which on a CPU costs several times the read
  alone (docs/inference.md); `moe_distinct` avoids it. Same routing (`MoE._route`), gates and
  shared experts as `MoE.__call__` (dropless). Returns (y_BLD, experts_TK).
  """
  dt = x_BLD.dtype

  def routed(x_TD, experts, local_TK, g_TK, count):
    idx_TK = jnp.minimum(local_TK, count - 1)
    w_gate, w_up, w_down = (w[...][idx_TK].astype(dt) for w in (experts.w_gate, experts.w_up, experts.w_down))
    out_TKD = swiglu(x_TD, w_gate, w_up, w_down, 'td,tkdf->tkf;tkf,tkfd->tkd').astype(jnp.float32)
    return jnp.sum(g_TK[..., None] * out_TKD, axis=1)

  return _few_token_moe(moe, x_BLD, routed)


def moe_distinct(moe: MoE, x_BLD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The MoE layer for a few tokens, reading each distinct selected expert once and copying nothing.

  A loop over the step's distinct experts (`jnp.unique` with a static bound of min(E, T*k)
  slots; the trip count is the number actually touched): each iteration indexes one expert's
  weights in place (a dynamic index on the leading axis, no gather copy), applies them to all
  T tokens and adds the result weighted by each token's gate for that expert (zero for tokens
  that did not pick it). Weight traffic is exactly the bandwidth model's (`decode_cost`:
  distinct experts x expert bytes); compute is T x distinct experts, so it suits T*k <= E.
  Same routing, gates and shared experts as `MoE.__call__` (dropless). Returns (y_BLD, experts_TK).
  """
  dt = x_BLD.dtype

  def routed(x_TD, experts, local_TK, g_TK, count):
    distinct = jnp.unique(local_TK.reshape(-1), size=min(count + 1, local_TK.size), fill_value=count)  # sorted
    weights = (experts.w_gate[...], experts.w_up[...], experts.w_down[...])

    def body(i, y_TD):
      e = distinct[i]
      g_T = jnp.sum(jnp.where(local_TK == e, g_TK, 0.0), axis=1)
      w_gate, w_up, w_down = (jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False).astype(dt) for w in weights)
      out_TD = swiglu(x_TD, w_gate, w_up, w_down, 'td,df->tf;tf,fd->td').astype(jnp.float32)
      return y_TD + g_T[:, None] * out_TD

    zeros = jnp.zeros((x_TD.shape[0], x_TD.shape[1]), jnp.float32)
    return jax.lax.fori_loop(0, jnp.sum(distinct < count), body, zeros)  # (`count` fills the unused slots)

  return _few_token_moe(moe, x_BLD, routed)


DISPATCHES = ('auto', 'distinct', 'gather', 'model')
FEW_TOKEN_DISPATCHES = {'distinct': moe_distinct, 'gather': moe_gather}


def pick_dispatch(moe_dispatch: str, tokens: int, topk: int, num_experts: int, backend: str | None = None) -> str:
  """'auto': a few-token dispatch while tokens * k <= E (it then reads no more expert weights than the model's
  dispatch, which reads every expert once), else the model's own dispatch (`moe.dispatch`). The few-token one is
  'distinct' on CPU (measured: docs/inference.md) and 'gather' on accelerators, where a loop of small matmuls
  pays a launch per expert (not yet measured there)."""
  if moe_dispatch not in DISPATCHES:
    raise ConfigError(f'moe_dispatch={moe_dispatch!r} must be one of {DISPATCHES}')
  if moe_dispatch != 'auto':
    return moe_dispatch
  if tokens * topk > num_experts:
    return 'model'
  return 'distinct' if (backend or jax.default_backend()) == 'cpu' else 'gather'


def forward(model: Transformer, tokens_BL: jax.Array, positions_BL: jax.Array, cache: Cache,
            moe_dispatch: str = 'auto', ffn: bool = True) -> tuple[jax.Array, Cache, tuple[jax.Array, ...]]:
  """Logits [B, L, V] (float32) of `tokens_BL` at `positions_BL` (prefill: L prompt tokens; decode: L = 1), the
  cache with their keys and values written, and each MoE layer's routing: experts [B*L, k] (int32), in layer order.

  moe_dispatch 'distinct' or 'gather' runs MoE layers with `moe_distinct` or `moe_gather` (few tokens: decode
  steps); 'model' with the model's own dispatch (`moe.dispatch`: many tokens, prefill); 'auto' chooses by
  `pick_dispatch`.
  ffn=False skips every FFN (dense and MoE): an ablation for `moejax.bench decode`'s time breakdown only.
  """
  x = model.embed(tokens_BL, model.dtype)
  keys, values, routes = list(cache.keys), list(cache.values), []
  T = tokens_BL.shape[0] * tokens_BL.shape[1]
  for i, block in enumerate(model.blocks):
    y, keys[i], values[i] = _attention(block.attn, block.attn_norm(x), keys[i], values[i], positions_BL)
    x = x + y
    h = block.ffn_norm(x)
    if not ffn:
      continue
    if not block.use_moe:
      f = block.ffn(h)
    elif (dispatch := pick_dispatch(moe_dispatch, T, block.ffn.cfg.experts_per_token,
                                    block.ffn.cfg.num_experts)) in FEW_TOKEN_DISPATCHES:
      f, experts = FEW_TOKEN_DISPATCHES[dispatch](block.ffn, h)
      routes.append(experts)
    else:
      f, _ = block.ffn(h)
      routes.append(block.ffn._route(h.reshape(T, -1), False, None)[2])  # pylint: disable=protected-access  (CSE'd)
    x = x + f
  x = model.final_norm(x)
  if model.unembed is None:
    logits = model.embed.attend(x)
  else:
    logits = jnp.einsum('bld,dv->blv', x, model.unembed[...].astype(model.dtype))
  return logits.astype(jnp.float32), Cache(tuple(keys), tuple(values)), tuple(routes)


def sample(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """Next tokens [B]: greedy when temperature == 0, else a draw from softmax(logits / temperature) restricted to
  the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
  logits_BV = logits_BV.astype(jnp.float32)
  greedy = jnp.argmax(logits_BV, axis=-1)
  scaled = logits_BV / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-scaled, axis=-1)
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly ahead of each token
  kept = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # (the most likely token is always kept)
  drawn = jnp.take_along_axis(order, jax.random.categorical(key, kept)[:, None], axis=-1)[:, 0]
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def free_memory_bytes() -> int | None:
  """Bytes the first device can still allocate: the accelerator's limit minus what is in use, or the host's
  available physical memory on CPU; None when unknown."""
  stats = getattr(jax.devices()[0], 'memory_stats', lambda: None)() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
  if jax.default_backend() == 'cpu':
    try:
      return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError):
      return None
  return None


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Generator:
  """Compiled prefill and decode step for one model and batch shape; `__call__` generates for a batch of prompts.

  The decode step is compiled once, ahead of time, from the shapes alone (the cache is donated and
  updated in place) and serves every step of every generation of this shape: temperature, top-p
  and the random key are traced. Before any cache is allocated, the compiler's memory analysis of
  the step (and of each prefill length) is checked against the device's free memory
  (`memory_limit`, default `free_memory_bytes()`): a batch or cache that does not fit is a
  ConfigError, not an out-of-memory crash. `compilations` counts what was compiled.
  """

  def __init__(self, model: Transformer, batch: int, max_len: int, moe_dispatch: str = 'auto',
               memory_limit: int | None = None):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    if batch < 1 or max_len < 2:
      raise ConfigError(f'batch={batch} must be >= 1 and the context max_len={max_len} >= 2')
    pick_dispatch(moe_dispatch, 1, 1, 1)  # (validates the name)
    self.graphdef, self.state = nnx.split(model)
    self.model, self.batch, self.max_len, self.moe_dispatch = model, batch, max_len, moe_dispatch
    self.memory_limit = free_memory_bytes() if memory_limit is None else memory_limit
    self.state_bytes = _tree_bytes(self.state)
    self.compilations = {'step': 0, 'prefill': 0}
    self.memory = {}

    def prefill(state, cache, tokens_BL, lengths_B, key, temperature, top_p):
      positions = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
      logits, cache, routes = forward(nnx.merge(self.graphdef, state), tokens_BL, positions, cache, 'model')
      last = logits[jnp.arange(tokens_BL.shape[0]), lengths_B - 1]
      return sample(last, key, temperature, top_p), cache, routes

    def step(state, cache, tokens_B, positions_B, key, temperature, top_p):
      logits, cache, routes = forward(nnx.merge(self.graphdef, state), tokens_B[:, None], positions_B[:, None],
                                      cache, moe_dispatch)
      return sample(logits[:, 0], key, temperature, top_p), cache, routes

    self._prefill_fn = jax.jit(prefill, donate_argnums=1)
    self._prefills = {}
    self.cache_shape = jax.eval_shape(lambda: init_cache(model, batch, max_len))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    vector = jax.ShapeDtypeStruct((batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    self.step = self._compile(jax.jit(step, donate_argnums=1), 'step', vector, vector, key, scalar, scalar)

  def _compile(self, fn, what: str, *args):
    """Lowers and compiles fn(state, cache, *args) from shapes; refuses it if it would not fit in memory."""
    compiled = fn.lower(self.state, self.cache_shape, *args).compile()
    self.compilations[what] += 1
    m = compiled.memory_analysis()
    if m is not None:
      # The state is already resident; the cache, the outputs that do not reuse a donated buffer and the
      # temporaries are new.
      need = (m.argument_size_in_bytes - self.state_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
              + m.temp_size_in_bytes)
      self.memory[what] = need
      if self.memory_limit is not None and need > self.memory_limit:
        raise ConfigError(f'the {what} for batch {self.batch} and a context of {self.max_len} tokens needs '
                          f'{need / 1e9:.3g} GB (cache {_tree_bytes(self.cache_shape) / 1e9:.3g} GB, compiler memory '
                          f'analysis) but {self.memory_limit / 1e9:.3g} GB is free: use a smaller batch or context')
    return compiled

  def prefill_for(self, tokens_BL, lengths_B, key, temperature, top_p):
    """The compiled prefill for this padded prompt length (compiled, and memory-checked, on first use)."""
    L = tokens_BL.shape[1]
    if L not in self._prefills:
      spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
      self._prefills[L] = self._compile(self._prefill_fn, 'prefill', *(spec(x) for x in (tokens_BL, lengths_B, key,
                                                                                          temperature, top_p)))
    return self._prefills[L]

  def check(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float) -> None:
    """ConfigError for a batch of prompts this generator cannot serve."""
    if len(prompts) != self.batch:
      raise ConfigError(f'{len(prompts)} prompts for a generator of batch {self.batch}')
    if not all(prompts):
      raise ConfigError('every prompt needs at least one token')
    longest = max(len(p) for p in prompts)
    if max_new_tokens < 1:
      raise ConfigError(f'max_new_tokens={max_new_tokens} must be >= 1')
    if longest + max_new_tokens > self.max_len:
      raise ConfigError(f'a prompt of {longest} tokens plus {max_new_tokens} new ones exceeds the context of '
                        f'{self.max_len} tokens')
    if temperature < 0 or not 0 < top_p <= 1:
      raise ConfigError(f'temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]')

  def __call__(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, routes: list | None = None) -> list[list[int]]:
    """The `max_new_tokens` tokens generated after each prompt (token ids). If `routes` is a list, each decode
    step's routing (a tuple over MoE layers of experts [B, k]) is appended to it."""
    self.check(prompts, max_new_tokens, temperature, top_p)
    longest = max(len(p) for p in prompts)
    padded = jnp.asarray([p + [0] * (longest - len(p)) for p in prompts], jnp.int32)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    t, p = jnp.float32(temperature), jnp.float32(top_p)
    prefill = self.prefill_for(padded, lengths, keys[0], t, p)  # (before the cache is allocated)
    cache = init_cache(self.model, self.batch, self.max_len)
    token, cache, _ = prefill(self.state, cache, padded, lengths, keys[0], t, p)
    out, positions = [token], lengths
    for i in range(1, max_new_tokens):
      token, cache, step_routes = self.step(self.state, cache, token, positions, keys[i], t, p)
      if routes is not None:
        routes.append(step_routes)
      out.append(token)
      positions = positions + 1
    return jax.device_get(jnp.stack(out, axis=1)).tolist()

"""KV-cache decoding: prefill a batch of prompts, then one jitted, donated step per token.

The cache is preallocated per attention layer: keys and values [B, H_kv, T_max, K] in the
compute dtype, written at each row's own positions (prompts of different lengths share a
batch). Prefill runs the prompts right-padded to one length and writes every position; a row's
padding is overwritten by its generated tokens before any query can attend to it, because a
query at position p attends to keys at positions <= p only. Rotary embeddings use absolute
positions, so a decoded token gets exactly the rotation the full-sequence forward gives it.

The FFN of each block is the model's own module (dense SwiGLU or `moejax.model.moe.MoE`, every routed
design): routing is per token, so at decode it sees the B new tokens as a batch of B. It runs
with the evaluation settings (`moe.eval_capacity_factor`); with a capacity factor the routing
of a token would depend on the other tokens of its step, so decoding requires dropless
evaluation (checked).

The reference twin is the full-sequence forward (`Transformer.__call__`): per-position logits
from prefill + decode equal it (tests/decode_test.py).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from moejax.errors import ConfigError
from moejax.model.dispatch import pick_dispatch
from moejax.model.transformer import Cache, Transformer


def check_decodable(cfg) -> None:
  """Decoding needs dropless evaluation: a capacity factor makes a token's routing depend on its batch."""
  if cfg.moe.num_experts and cfg.moe.routing == 'expert_choice':
    raise ConfigError("moe.routing='expert_choice' cannot decode: each expert picks tokens among the batch's "
                      'tokens at one position, so a generated token\'s experts depend on the other sequences decoded '
                      'with it (docs/studies.md, "Expert-choice routing")')
  if cfg.moe.num_experts and cfg.moe.eval_capacity_factor is not None:
    raise ConfigError(f'moe.eval_capacity_factor={cfg.moe.eval_capacity_factor}: decoding needs dropless evaluation '
                      '(a capacity limit would make a token\'s experts depend on the other tokens of its step); '
                      'set it to None')


def forward(model: Transformer, tokens_BL: jax.Array, positions_BL: jax.Array, cache: Cache,
            moe_dispatch: str = 'auto', ffn: bool = True) -> tuple[jax.Array, Cache, tuple[jax.Array, ...]]:
  """(logits [B, L, V] float32, the cache with the new keys and values written, each MoE layer's experts
  [B*L, k]) of `tokens_BL` at `positions_BL`: the model's own forward pass with a cache
  (`Transformer.__call__`); prefill passes L prompt tokens with moe_dispatch='model', a decode step L = 1
  with 'auto' (`dispatch.pick_dispatch`). ffn=False is the decode benchmark's FFN-less ablation."""
  logits_BLV, aux, cache = model(tokens_BL, positions_BL=positions_BL, cache=cache, moe_dispatch=moe_dispatch,
                                 use_ffn=ffn)
  return logits_BLV, cache, aux['routes']


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
    self.cache_shape = jax.eval_shape(lambda: model.init_cache(batch, max_len))
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
    cache = self.model.init_cache(self.batch, self.max_len)
    token, cache, _ = prefill(self.state, cache, padded, lengths, keys[0], t, p)
    out, positions = [token], lengths
    for i in range(1, max_new_tokens):
      token, cache, step_routes = self.step(self.state, cache, token, positions, keys[i], t, p)
      if routes is not None:
        routes.append(step_routes)
      out.append(token)
      positions = positions + 1
    return jax.device_get(jnp.stack(out, axis=1)).tolist()

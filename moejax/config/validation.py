"""Cross-field validation: every rule raises `ConfigError` with one line naming the key and the rule,
before any model is built or compiled."""

from __future__ import annotations

from typing import Sequence

import ml_collections

from moejax.config.shapes import expert_hidden, is_moe_layer, moe_layers, shared_hidden, size_classes, vocab_size, head_dim
from moejax.errors import ConfigError

COMPUTE_DTYPES = ('float32', 'bfloat16')
ATTENTION_IMPLEMENTATIONS = ('xla', 'blockwise', 'cudnn', 'splash', 'auto')  # model.attention (moejax/model/attention.py)
DISPATCHES = ('block', 'ragged', 'capacity', 'dense')
KERNELS = ('auto', 'reference', 'xla', 'pallas')
LOAD_BALANCING = ('none', 'global_batch', 'micro_batch', 'sequence', 'aux_free')
ROUTER_SCORES = ('softmax', 'sigmoid')
DROP_POLICIES = ('position', 'probs')
SOURCE_KINDS = ('stdlib', 'text:', 'jsonl:', 'parquet:', 'tfds:', 'store:')
BINARY_DOCUMENTS = ('error', 'skip', 'keep')
VERIFY_STORE = ('full', 'size')
SCHEDULES = ('cosine', 'wsd')
QK_NORM_SCOPES = ('head', 'projection')
WANDB_MODES = ('disabled', 'offline', 'online')  # wandb.mode (moejax/train/tracking.py)


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _positive(cfg, section: str, keys: Sequence[str]) -> None:
  for key in keys:
    value = cfg[section][key]
    _require(isinstance(value, (int, float)) and value > 0, f'{section}.{key}={value!r} must be > 0')


def _validate_data(cfg) -> None:
  """The data section; also fills an unset `model.vocab_size` from the tokenizer (reading a file or manifest if it must)."""
  d, m = cfg.data, cfg.model
  _require(isinstance(d.source, str) and d.source.startswith(SOURCE_KINDS) and
           (d.source == 'stdlib' or len(d.source.split(':', 1)[1]) > 0),
           f"data.source={d.source!r} must be 'stdlib', 'text:GLOB', 'jsonl:GLOB', 'parquet:GLOB', 'tfds:NAME' or "
           "'store:DIR'")
  from moejax.data import tokenizers  # pylint: disable=import-outside-toplevel  (light: numpy only)
  if d.source.startswith('store:') and d.tokenizer == 'bytes':  # left at the default: the store's manifest names it
    from moejax import data  # pylint: disable=import-outside-toplevel
    d.tokenizer, d.separator_token = data.store_tokenizer_spec(d)
  try:
    tokenizers.parse_spec(d.tokenizer)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(d.seq_len >= 2, f'data.seq_len={d.seq_len} must be >= 2')
  _positive(cfg, 'data', ('heldout_bytes', 'tokenizer_train_bytes', 'read_threads', 'prefetch_batches'))
  _require(0 < d.heldout_max_fraction <= 0.5, f'data.heldout_max_fraction={d.heldout_max_fraction} must be in (0, 0.5]')
  _require(d.binary_documents in BINARY_DOCUMENTS,
           f'data.binary_documents={d.binary_documents!r} must be one of {BINARY_DOCUMENTS}')
  _require(d.verify_store in VERIFY_STORE, f'data.verify_store={d.verify_store!r} must be one of {VERIFY_STORE}')
  m.vocab_size = vocab_size(cfg)


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every cross-field rule; raises ConfigError naming the key and the rule."""
  m, e, d, o, t = cfg.model, cfg.moe, cfg.data, cfg.optim, cfg.train
  _validate_data(cfg)
  _positive(cfg, 'model', ('vocab_size', 'model_dim', 'num_layers', 'num_heads', 'num_kv_heads', 'ffn_hidden',
                           'rope_base', 'norm_eps', 'init_std'))
  if m.head_dim is None:
    _require(m.model_dim % m.num_heads == 0,
             f'model.model_dim={m.model_dim} must be divisible by model.num_heads={m.num_heads} '
             '(or set model.head_dim)')
  else:
    _require(m.head_dim > 0, f'model.head_dim={m.head_dim} must be > 0')
  _require(head_dim(m) % 2 == 0, f'head dim {head_dim(m)} must be even for rotary embeddings (model.head_dim)')
  _require(m.num_heads % m.num_kv_heads == 0,
           f'model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads}')
  _require(m.qk_norm_scope in QK_NORM_SCOPES, f'model.qk_norm_scope={m.qk_norm_scope!r} must be one of {QK_NORM_SCOPES}')
  _require(m.compute_dtype in COMPUTE_DTYPES, f'model.compute_dtype={m.compute_dtype!r} must be one of {COMPUTE_DTYPES}')
  _require(m.remat in ('none', 'full', 'moe', 'dots'), f"model.remat={m.remat!r} must be one of 'none', 'full', 'moe', 'dots'")
  _require(m.attention in ATTENTION_IMPLEMENTATIONS,
           f'model.attention={m.attention!r} must be one of {ATTENTION_IMPLEMENTATIONS}')
  _require(m.attention != 'cudnn' or m.compute_dtype == 'bfloat16',
           "model.attention='cudnn' needs model.compute_dtype='bfloat16' (cuDNN's fused attention has no float32)")
  _positive(cfg, 'model', ('attention_q_block', 'attention_kv_block'))
  _require(m.attention != 'splash' or (m.attention_q_block % 128 == 0 and m.attention_kv_block % 128 == 0),
           f"model.attention='splash' needs model.attention_q_block and attention_kv_block multiples of 128 (the "
           f'kernel\'s tiles), not {m.attention_q_block} and {m.attention_kv_block}')
  hd = m.head_dim or m.model_dim // m.num_heads
  _require(m.attention != 'cudnn' or (hd % 8 == 0 and hd <= 256),
           f"model.attention='cudnn' needs a head_dim that is a multiple of 8 and at most 256, not {hd}")
  _require(m.attention != 'cudnn' or not cfg.data.document_mask or cfg.data.seq_len % 2 == 0,
           f"model.attention='cudnn' with data.document_mask needs an even data.seq_len, not {cfg.data.seq_len}")
  _require(isinstance(cfg.data.document_mask, bool), f'data.document_mask={cfg.data.document_mask!r} must be True or False')

  _require(e.num_experts >= 0, f'moe.num_experts={e.num_experts} must be >= 0 (0 = dense model)')
  _validate_moe_values(cfg)  # the same for dense configs: a bad value is never silently ignored
  if e.num_experts > 0:
    _require(1 <= e.experts_per_token <= e.num_experts,
             f'moe.experts_per_token={e.experts_per_token} must be in [1, moe.num_experts={e.num_experts}]')
    _require(bool(moe_layers(m, e)),
             f'moe.first_dense_layers={e.first_dense_layers} with model.num_layers={m.num_layers} leaves no MoE '
             'layer (set moe.num_experts=0 for a dense model)')
    if cfg.mesh.expert > 1:  # (-1 is checked against the resolved mesh when parameters are sharded)
      _require(e.num_experts % cfg.mesh.expert == 0,
               f'moe.num_experts={e.num_experts} must be divisible by mesh.expert={cfg.mesh.expert}')
      counts = [c for c, _ in size_classes(m, e)]
      _require(all(c % cfg.mesh.expert == 0 for c in counts),
               f'moe.expert_size_classes={e.expert_size_classes!r}: every class count must be divisible by '
               f'mesh.expert={cfg.mesh.expert} (each device holds a slice of every class)')
    _validate_routing(cfg)
  _positive(cfg, 'optim', ('peak_learning_rate', 'adam_eps'))
  _require(0 <= o.warmup_fraction < 1, f'optim.warmup_fraction={o.warmup_fraction} must be in [0, 1)')
  _require(0 <= o.final_lr_fraction <= 1, f'optim.final_lr_fraction={o.final_lr_fraction} must be in [0, 1]')
  _require(o.schedule in SCHEDULES, f'optim.schedule={o.schedule!r} must be one of {SCHEDULES}')
  _require(0 < o.decay_fraction <= 1 - o.warmup_fraction,
           f'optim.decay_fraction={o.decay_fraction} must be in (0, 1 - optim.warmup_fraction]')
  _validate_branches(cfg)
  _require(0 <= o.adam_b1 < 1 and 0 <= o.adam_b2 < 1, 'optim.adam_b1 and optim.adam_b2 must be in [0, 1)')
  _require(o.weight_decay >= 0 and o.grad_clip_norm >= 0,
           'optim.weight_decay and optim.grad_clip_norm must be >= 0')

  _positive(cfg, 'train', ('steps', 'batch_size', 'log_every_steps', 'microbatches'))
  _validate_microbatches(cfg)
  _positive(cfg, 'checkpoint', ('every_steps', 'max_to_keep'))
  _validate_study_axes(cfg)
  _positive(cfg, 'eval', ('batch_size',))
  _require(cfg.eval.max_batches is None or cfg.eval.max_batches > 0,
           f'eval.max_batches={cfg.eval.max_batches} must be > 0 (or None for all)')
  _require(cfg.eval.every_steps is None or cfg.eval.every_steps > 0,
           f'eval.every_steps={cfg.eval.every_steps} must be > 0 (or None: held-out loss at the end only)')
  _require(cfg.distributed.mode in ('auto', 'multi', 'single'),
           f"distributed.mode={cfg.distributed.mode!r} must be 'auto', 'multi' or 'single'")
  _positive(cfg, 'distributed', ('initialization_timeout_s',))
  _require(cfg.wandb.mode in WANDB_MODES, f'wandb.mode={cfg.wandb.mode!r} must be one of {WANDB_MODES}')
  sizes = {a: cfg.mesh[a] for a in ('data', 'fsdp', 'expert', 'tensor')}
  _require(all(n >= 1 or n == -1 for n in sizes.values()) and list(sizes.values()).count(-1) <= 1,
           f'mesh sizes must be >= 1, with at most one -1 (all remaining devices): {sizes}')
  if -1 not in sizes.values():  # with a -1 axis the mesh (and these checks) resolve against the devices
    ways = sizes['data'] * sizes['fsdp'] * sizes['expert']
    for key, value in (('train.batch_size', t.batch_size), ('eval.batch_size', cfg.eval.batch_size)):
      _require(value % ways == 0,
               f'{key}={value} must be divisible by the batch axes mesh.data*mesh.fsdp*mesh.expert={ways}')
  return cfg


def _validate_microbatches(cfg) -> None:  # equal microbatches, split over the batch axes, the batch's routing groups
  t, e, k = cfg.train, cfg.moe, cfg.train.microbatches
  rows, ways, moe = t.batch_size // k, cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.expert, e.num_experts > 0
  _require(t.batch_size % k == 0, f'train.microbatches={k} must divide train.batch_size={t.batch_size}')
  _require(k == 1 or ways < 0 or rows % ways == 0, f'train.batch_size/train.microbatches={rows} must be divisible by '
           f'the batch axes mesh.data*mesh.fsdp*mesh.expert={ways}')
  _require(k == 1 or not moe or e.load_balancing != 'micro_batch' or rows % e.balance_group_sequences == 0,
           f'moe.balance_group_sequences={e.balance_group_sequences} must divide the microbatch rows {rows}')
  grouped = e.train_capacity_factor is not None or e.dispatch == 'capacity'  # (capacity dispatch ranks in groups)
  _require(k == 1 or not moe or not grouped or (e.capacity_group_tokens is not None and rows
           * cfg.data.seq_len % e.capacity_group_tokens == 0), f'train.microbatches={k} with moe.train_capacity_factor'
           f" or moe.dispatch='capacity' needs moe.capacity_group_tokens dividing the microbatch tokens "
           f'{rows * cfg.data.seq_len}')
  _require(k == 1 or not moe or e.routing != 'expert_choice', f"train.microbatches={k} with moe.routing="
           "'expert_choice' would change the update: each expert picks among the tokens of its position in the "
           'batch, so microbatches of B/k rows give other choices and capacities; use train.microbatches=1')


def _validate_branches(cfg) -> None:
  """optim.decay_branches: fractions of train.steps in (0, 1), WSD only, each decaying after warmup ends."""
  o = cfg.optim
  text = str(o.decay_branches or '').strip()
  if not text:
    return
  _require(o.schedule == 'wsd', f'optim.decay_branches={text!r} needs optim.schedule=wsd (branches leave its stable phase)')
  try:
    fractions = [float(f) for f in text.split(',')]
  except ValueError:
    raise ConfigError(f"optim.decay_branches={text!r} must be comma-separated fractions of train.steps, e.g. '0.25,0.5'") from None
  warmup = int(round(o.warmup_fraction * cfg.train.steps))
  for f in fractions:
    _require(0 < f < 1, f'optim.decay_branches: {f} must be in (0, 1) (a fraction of train.steps)')
    end = int(round(f * cfg.train.steps))
    start = end - int(round(o.decay_fraction * end))
    _require(start > warmup, f'optim.decay_branches: the branch ending at step {end} would decay from step {start}, '
             f'before warmup ends at step {warmup}; use a larger fraction')
    _require(start < end, f'optim.decay_branches: the branch ending at step {end} has no decay steps '
             '(optim.decay_fraction * its length rounds to 0); use a larger fraction')


def _validate_moe_values(cfg) -> None:
  """Rules on single MoE values (enums, ranges): checked for dense configs too."""
  m, e = cfg.model, cfg.moe
  _require(isinstance(e.experts_per_token, int) and e.experts_per_token >= 1,
           f'moe.experts_per_token={e.experts_per_token} must be >= 1')
  _require(expert_hidden(m, e) > 0, f'moe.expert_hidden={e.expert_hidden} must be > 0')
  _require(e.every_n_layers >= 1, f'moe.every_n_layers={e.every_n_layers} must be >= 1')
  _require(0 <= e.first_dense_layers, f'moe.first_dense_layers={e.first_dense_layers} must be >= 0')
  size_classes(m, e)  # the spec's syntax
  _require(e.dispatch in DISPATCHES, f'moe.dispatch={e.dispatch!r} must be one of {DISPATCHES}')
  _require(e.kernels in KERNELS, f'moe.kernels={e.kernels!r} must be one of {KERNELS}')
  _require(e.expert_parallel_exchange in ('auto', 'all_to_all', 'ragged'),
           f"moe.expert_parallel_exchange={e.expert_parallel_exchange!r} must be 'auto', 'all_to_all' or 'ragged'")
  _require(e.expert_parallel_capacity_factor is None or e.expert_parallel_capacity_factor > 0,
           f'moe.expert_parallel_capacity_factor={e.expert_parallel_capacity_factor} must be > 0 (or None)')
  _require(e.block_size is None or (e.block_size > 0 and e.block_size % 8 == 0),
           f'moe.block_size={e.block_size} must be a positive multiple of 8 (or None for automatic)')
  _require(e.aux_loss_coef >= 0 and e.z_loss_coef >= 0 and e.aux_free_sequence_coef >= 0,
           'moe.aux_loss_coef, moe.z_loss_coef and moe.aux_free_sequence_coef must be >= 0')
  _require(e.router_score in ROUTER_SCORES, f'moe.router_score={e.router_score!r} must be one of {ROUTER_SCORES}')
  _require(e.routing in ('token_choice', 'expert_choice'), f"moe.routing={e.routing!r}: 'token_choice' or 'expert_choice'")
  _require(e.routed_scaling_factor > 0, f'moe.routed_scaling_factor={e.routed_scaling_factor} must be > 0')
  _require(e.num_expert_groups >= 1, f'moe.num_expert_groups={e.num_expert_groups} must be >= 1')
  _require(e.topk_expert_groups >= 1, f'moe.topk_expert_groups={e.topk_expert_groups} must be >= 1')
  _require(0 <= e.router_jitter < 1, f'moe.router_jitter={e.router_jitter} must be in [0, 1)')
  _require(e.load_balancing in LOAD_BALANCING, f'moe.load_balancing={e.load_balancing!r} must be one of {LOAD_BALANCING}')
  _require(e.balance_group_sequences >= 1, f'moe.balance_group_sequences={e.balance_group_sequences} must be >= 1')
  _require(e.bias_update_rate >= 0, f'moe.bias_update_rate={e.bias_update_rate} must be >= 0')
  for key in ('train_capacity_factor', 'eval_capacity_factor'):
    _require(e[key] is None or e[key] > 0, f'moe.{key}={e[key]} must be > 0 (or None for dropless)')
  _require(e.drop_policy in DROP_POLICIES, f'moe.drop_policy={e.drop_policy!r} must be one of {DROP_POLICIES}')
  _require(e.capacity_group_tokens is None or e.capacity_group_tokens > 0,
           f'moe.capacity_group_tokens={e.capacity_group_tokens} must be > 0 (or None)')
  _require(e.num_shared_experts >= 0, f'moe.num_shared_experts={e.num_shared_experts} must be >= 0')
  _require(shared_hidden(m, e) > 0, f'moe.shared_expert_hidden={e.shared_expert_hidden} must be > 0')


def _validate_study_axes(cfg) -> None:
  """Kept checkpoints, upcycling (train.init_from*) and expert-choice routing (docs/studies.md)."""
  e, t, keep = cfg.moe, cfg.train, cfg.checkpoint.keep_every_steps
  _require(keep is None or (keep > 0 and keep % cfg.checkpoint.every_steps == 0), f'checkpoint.keep_every_steps={keep} '
           f'must be a positive multiple of checkpoint.every_steps={cfg.checkpoint.every_steps} (or None)')
  _require(t.init_from_router_std >= 0 and t.init_from_noise >= 0 and (not t.init_from or e.num_experts > 0),
           'train.init_from_router_std and _noise must be >= 0, and train.init_from needs an MoE (moe.num_experts > 0)')
  plain = (e.load_balancing, e.train_capacity_factor, e.eval_capacity_factor, e.num_expert_groups,
           e.use_renormalized_gates, cfg.mesh.expert) == ('none', None, None, 1, False, 1)
  _require(not e.num_experts or e.routing != 'expert_choice' or plain, "moe.routing='expert_choice' needs moe.load_balancing="
           "'none', no capacity factors (C comes from moe.experts_per_token), one expert group, no renormalization, mesh.expert=1")


def _validate_routing(cfg) -> None:
  """Cross-field rules of the router, load balancing, capacity and expert shapes (MoE configs)."""
  m, e = cfg.model, cfg.moe
  classes = size_classes(m, e)
  _require(sum(c for c, _ in classes) == e.num_experts,
           f'moe.expert_size_classes={e.expert_size_classes!r} has {sum(c for c, _ in classes)} experts '
           f'but moe.num_experts={e.num_experts}')
  _require(e.num_experts % e.num_expert_groups == 0,
           f'moe.num_expert_groups={e.num_expert_groups} must divide moe.num_experts={e.num_experts}')
  _require(e.topk_expert_groups <= e.num_expert_groups,
           f'moe.topk_expert_groups={e.topk_expert_groups} must be in [1, moe.num_expert_groups={e.num_expert_groups}]')
  _require(e.topk_expert_groups * (e.num_experts // e.num_expert_groups) >= e.experts_per_token,
           f'moe.topk_expert_groups={e.topk_expert_groups} groups of {e.num_experts // e.num_expert_groups} experts '
           f'cannot supply moe.experts_per_token={e.experts_per_token}')
  for batch_key in ('train', 'eval'):
    _require(cfg[batch_key].batch_size % e.balance_group_sequences == 0,
             f'moe.balance_group_sequences={e.balance_group_sequences} must divide '
             f'{batch_key}.batch_size={cfg[batch_key].batch_size}')
  for batch_key in ('train.batch_size', 'eval.batch_size'):
    tokens = cfg[batch_key.split('.')[0]].batch_size * cfg.data.seq_len
    _require(e.capacity_group_tokens is None or tokens % e.capacity_group_tokens == 0,
             f'moe.capacity_group_tokens={e.capacity_group_tokens} must divide {batch_key} * data.seq_len = {tokens}')

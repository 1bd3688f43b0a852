"""Model shapes derived from a config: head width, expert widths and size classes, the layer pattern."""

from __future__ import annotations

from moejax.errors import ConfigError


def vocab_size(cfg) -> int:
  """`model.vocab_size`, or (unset, before `validate`) the vocabulary of the config's tokenizer."""
  if cfg.model.vocab_size is not None:
    return cfg.model.vocab_size
  from moejax import data  # pylint: disable=import-outside-toplevel
  return data.vocab_size(cfg.data)


def head_dim(model_cfg) -> int:
  """The per-head width: `model.head_dim`, or model_dim // num_heads when unset."""
  return model_cfg.head_dim if model_cfg.head_dim is not None else model_cfg.model_dim // model_cfg.num_heads


def expert_hidden(model_cfg, moe_cfg) -> int:
  """The routed-expert hidden size: `moe.expert_hidden`, or the dense `model.ffn_hidden` when unset."""
  return moe_cfg.expert_hidden if moe_cfg.expert_hidden is not None else model_cfg.ffn_hidden


def size_classes(model_cfg, moe_cfg) -> list[tuple[int, int]]:
  """[(count, hidden), ...] of the routed experts; one class unless `moe.expert_size_classes` is set."""
  spec = moe_cfg.expert_size_classes.strip()
  if not spec:
    return [(moe_cfg.num_experts, expert_hidden(model_cfg, moe_cfg))]
  classes = []
  for part in spec.split(','):
    count, sep, hidden = part.strip().partition('x')
    if not (sep and count.isdigit() and hidden.isdigit() and int(count) > 0 and int(hidden) > 0):
      raise ConfigError(f"moe.expert_size_classes={spec!r} must look like '32x64,32x192' (count x hidden)")
    classes.append((int(count), int(hidden)))
  return classes


def shared_hidden(model_cfg, moe_cfg) -> int:
  """Hidden size of each shared expert: `moe.shared_expert_hidden`, else the routed expert hidden."""
  return moe_cfg.shared_expert_hidden if moe_cfg.shared_expert_hidden is not None else expert_hidden(model_cfg, moe_cfg)


def is_moe_layer(moe_cfg, layer: int) -> bool:
  """Whether decoder block `layer` uses the MoE FFN (the layer pattern)."""
  if moe_cfg.num_experts == 0 or layer < moe_cfg.first_dense_layers:
    return False
  return (layer - moe_cfg.first_dense_layers) % moe_cfg.every_n_layers == 0


def moe_layers(model_cfg, moe_cfg) -> list[int]:
  """Indices of the MoE blocks."""
  return [i for i in range(model_cfg.num_layers) if is_moe_layer(moe_cfg, i)]

"""Configs: loading experiment files, dotted overrides, the config hash, derived model shapes,
cross-field validation and sweep helpers.

| module | owns |
|---|---|
| `loading.py` | importing experiment files (errors name file and line), `:arg` variants, `flatten`, `apply_overrides` |
| `keys.py` | `config_hash` and the documented key lists (run-neutral, seed, step-neutral keys) |
| `shapes.py` | head width, expert widths, size classes, the dense/MoE layer pattern, the vocabulary |
| `validation.py` | `validate`: every cross-field rule, one line per violation |
| `sweeps.py` | `sweep`, `product`, `zip` for experiment files' `get_sweep()` |

Everything is importable from `moejax.config` itself (`from moejax import config as config_lib`).
"""

from moejax.config.loading import (load_module, error_line, check_arg, check_experiment_file, config_flag, add_experiment_root, flatten, apply_overrides)
from moejax.config.keys import (RUN_NEUTRAL_KEYS, SEED_KEYS, LAUNCH_KEYS, STEP_NEUTRAL_KEYS, key_in, config_hash)
from moejax.config.shapes import (vocab_size, head_dim, expert_hidden, size_classes, shared_hidden, is_moe_layer, moe_layers)
from moejax.config.validation import (ATTENTION_IMPLEMENTATIONS, COMPUTE_DTYPES, DISPATCHES, KERNELS, LOAD_BALANCING, ROUTER_SCORES, DROP_POLICIES, SOURCE_KINDS, BINARY_DOCUMENTS, VERIFY_STORE, SCHEDULES, QK_NORM_SCOPES, validate)
from moejax.config.sweeps import (product, zip, sweep)

__all__ = ['ATTENTION_IMPLEMENTATIONS', 'load_module', 'error_line', 'check_arg', 'check_experiment_file', 'config_flag', 'add_experiment_root', 'flatten', 'apply_overrides', 'RUN_NEUTRAL_KEYS', 'SEED_KEYS', 'LAUNCH_KEYS', 'STEP_NEUTRAL_KEYS', 'key_in', 'config_hash', 'vocab_size', 'head_dim', 'expert_hidden', 'size_classes', 'shared_hidden', 'is_moe_layer', 'moe_layers', 'COMPUTE_DTYPES', 'DISPATCHES', 'KERNELS', 'LOAD_BALANCING', 'ROUTER_SCORES', 'DROP_POLICIES', 'SOURCE_KINDS', 'BINARY_DOCUMENTS', 'VERIFY_STORE', 'SCHEDULES', 'QK_NORM_SCOPES', 'validate', 'product', 'zip', 'sweep']

"""The train, eval and decode steps compiled from abstract shapes, locally or for a compile target.

  compile_all(cfg, target, decode_batch=8) -> {'train': report, 'eval': report, 'decode': report}

`target` is a `moejax.parallel.targets.Target` (None: the local devices). Each report has the
compiler, compile seconds and per-device memory figures (`moejax.parallel.aot.memory_figures`).
The train step is `train.state.compile_step`; the eval step is `train.evaluate.make_eval_step` on an eval batch;
the decode step is one token of `decode.forward` for `decode_batch` sequences against a cache
of the config's context (the prefill is the eval step's forward pass). Nothing is allocated.

  python -m moejax.bench fit --config=experiments/published/olmoe_1b_7b.py --target=tpu:v5p-8 [--cpu]

prints the memory-table row of each config on each target (and, with --cpu, the CPU compiler's
figure for the same mesh over fake CPU devices);

  python -m moejax.bench fit --config=experiments/published/olmoe_1b_7b.py --search=gpu:h100 \
      [--global_tokens=4194304] [--set=model.attention=auto] [--out=fit.json] [--cpu --cpu_devices=64]

finds the smallest node count or slice of a family that holds the train step (`search`): the
docs/scaling-out.md "does it fit" table; with --steps it also compiles the eval and decode steps at
the setting that fits (`step_rows`), a second table.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from moejax import cli, config as config_lib
from moejax.bench import common, step as step_bench
from moejax.errors import ConfigError
from moejax.model import dispatch as dispatch_lib, stack
from moejax.train import evaluate as eval_lib, state as state_lib
from moejax.inference import decode
from moejax.parallel import mesh as mesh_lib
from moejax.model import transformer as model_lib
from moejax.parallel import aot


def _abstract_state(cfg, mesh, target):
  with aot.kernel_context(target):
    graphdef, param_state, buffer_state = model_lib.split(nnx.eval_shape(lambda: model_lib.build(cfg)))
  return graphdef, state_lib._placed(cfg, mesh, param_state, buffer_state, abstract=True)  # pylint: disable=protected-access


def compile_eval(cfg, target=None) -> dict:
  """The eval step (forward pass, summed token nats and routing statistics) on one eval batch."""
  mesh = state_lib._make_mesh(cfg, None if target is None else target.devices())  # pylint: disable=protected-access
  graphdef, state = _abstract_state(cfg, mesh, target)
  B, L = cfg.eval.batch_size, cfg.data.seq_len
  sharding = mesh_lib.batch_sharding(mesh, 2)
  batch = {'inputs': jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=sharding),
           'targets': jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=sharding),
           'weights': jax.ShapeDtypeStruct((B, L), jnp.float32, sharding=sharding)}
  step = eval_lib.make_eval_step(graphdef, mesh)
  c = aot.compile_for(target, None, state['params'], state['buffers'], batch, jitted=step)
  return {'compiler': c.compiler, 'compile_s': c.compile_s, **c.memory}


def compile_decode(cfg, target=None, batch: int = 8) -> dict:
  """One decode step (a token per sequence, `moe_dispatch='auto'`) against a cache of `cfg.data.seq_len`."""
  decode.check_decodable(cfg)
  cfg = stack.unscanned(cfg)  # (decoding runs the layers one by one)
  mesh = state_lib._make_mesh(cfg, None if target is None else target.devices())  # pylint: disable=protected-access
  graphdef, state = _abstract_state(cfg, mesh, target)
  # The cache and the tokens are split over the batch axes when the batch divides them (a sharded server's
  # layout: a published model's 32k-token cache does not fit one device), else replicated.
  split = batch % mesh_lib.batch_shards(mesh) == 0
  row_sharding = lambda ndim: mesh_lib.batch_sharding(mesh, ndim) if split else mesh_lib.replicated(mesh)  # noqa: E731
  with aot.kernel_context(target):
    model = nnx.eval_shape(lambda: model_lib.build(cfg))
  cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=row_sharding(x.ndim)),
                       jax.eval_shape(lambda: model.init_cache(batch, cfg.data.seq_len)))
  vector = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=row_sharding(1))
  dispatch = dispatch_lib.pick_dispatch('auto', batch, cfg.moe.experts_per_token, max(cfg.moe.num_experts, 1),
                                  backend=None if target is None else target.platform)

  def step(params, buffers, cache, tokens_B, positions_B):
    logits, cache, _ = decode.forward(nnx.merge(graphdef, params, buffers), tokens_B[:, None], positions_B[:, None],
                                      cache, dispatch)
    return jnp.argmax(logits[:, 0], axis=-1), cache

  jitted = mesh_lib.under_mesh(jax.jit(step, donate_argnums=2), mesh)
  c = aot.compile_for(target, None, state['params'], state['buffers'], cache, vector, vector, jitted=jitted)
  return {'compiler': c.compiler, 'compile_s': c.compile_s, 'dispatch': dispatch, **c.memory}


def _decodable(cfg) -> bool:
  try:
    decode.check_decodable(cfg)
  except ConfigError:
    return False
  return True


def compile_all(cfg, target=None, decode_batch: int = 8) -> dict:
  """{'train', 'eval', 'decode'}: each step's compile report for `target` (decode only for a decodable config:
  dropless token-choice evaluation)."""
  out = {'train': state_lib.compile_step(cfg, target), 'eval': compile_eval(cfg, target)}
  if _decodable(cfg):
    out['decode'] = compile_decode(cfg, target, decode_batch)
  return out


def _gb(nbytes) -> float | None:
  """GB, or None where the compiler gave no memory analysis (unknown never counts as fitting)."""
  return None if nbytes is None else nbytes / 1e9


def _fit_cfg(cfg, devices: int, remat: str | None = None, microbatches: int = 1, scan: bool | None = None):
  """`cfg` on `devices` devices: fsdp over all, one sequence each per microbatch (and per eval batch)."""
  overrides = {'mesh.fsdp': devices, 'mesh.expert': 1, 'mesh.data': 1, 'mesh.tensor': 1,
               'train.batch_size': devices * microbatches, 'train.microbatches': microbatches,
               'eval.batch_size': devices}
  if remat is not None:
    overrides['model.remat'] = remat
  if scan is not None:
    overrides['model.scan_layers'] = scan
  return config_lib.validate(config_lib.apply_overrides(cfg, overrides))


def fit_row(cfg, target, devices: int, remat: str | None = None, microbatches: int = 1, scan: bool | None = None) -> dict:
  """One table row: `cfg` on `devices` devices (fsdp over all, one sequence each per microbatch), compiled for
  `target` (None: this machine's CPU compiler over as many fake devices), with the analytic state estimate."""
  from moejax.model import accounting  # pylint: disable=import-outside-toplevel
  cfg = _fit_cfg(cfg, devices, remat, microbatches, scan)
  r = state_lib.compile_step(cfg, target)
  n_total = accounting.count(cfg)['n_total']
  return {'name': cfg.name, 'target': _label(target, devices),
          'compiler': r['compiler'], 'devices': devices, 'seq_len': cfg.data.seq_len, 'remat': cfg.model.remat,
          'microbatches': microbatches, 'attention': _attention_core(cfg, target), 'scan_layers': cfg.model.scan_layers,
          'peak_gb': _gb(r.get('peak_bytes')), 'temp_gb': _gb(r.get('temp_bytes')),
          'state_gb': (r['params_bytes'] + r['optimizer_bytes']) / 1e9,
          'analytic_gb': n_total * 16 / devices / 1e9, 'compile_s': r['compile_s']}


# ----- the smallest target a design fits on -----

# Targets of one family in increasing size: GPU nodes of 8, TPU slices (v5p names count TensorCores: 2 per chip).
FAMILIES = {
    'gpu:h100': [f'gpu:h100x8x{n}' if n > 1 else 'gpu:h100x8' for n in (1, 2, 4, 8, 16)],
    'gpu:h200': [f'gpu:h200x8x{n}' if n > 1 else 'gpu:h200x8' for n in (1, 2, 4, 8, 16)],
    'tpu:v5p': [f'tpu:v5p-{n}' for n in (8, 16, 32, 64, 128, 256)],
    'tpu:v6e': [f'tpu:v6e-{n}' for n in (8, 16, 32, 64, 128, 256)],
}
# (remat, scan_layers), least memory first: when 'full' does not fit, nothing at that size does; when it fits,
# 'none' (no recompute) is tried next, and 'moe' (recompute only the expert matmuls) only when 'none' does not
# fit. All scanned: measured on OLMoE-1B-7B for 8 H100s (XLA:GPU, one sequence per device, layers stored
# stacked), the scan cuts the compile time 170 -> 31 s and the temporaries 50.3 -> 26.7 GB without remat, and with
# remat 'full' to 10.4 GB (29.2 GB unrolled: unrolled, XLA keeps what remat would drop). docs/scaling-out.md.
REMAT_LADDER = (('full', True), ('none', True), ('moe', True))
# The compiler's own device-memory refusals (XLA:TPU: "Ran out of memory in memory space hbm" from the
# scheduler, "Ran out of memory on HBM, the total memory required for HLO temporaries ..." from the final check);
# any other error, the compiling machine's RAM included, propagates and is not cached.
OUT_OF_MEMORY = ('memory space hbm', 'memory on HBM')
# Raised whenever the model, parallel or kernel code changes what a compile produces: entries of other versions
# are not reused (the key also holds the config hash, resolved attention core, target, setting and compiler).
FIT_CACHE_VERSION = 3  # 3: scanned models store their layers stacked (model/stack.py)


def _microbatches(global_tokens: int, seq_len: int, devices: int) -> int:
  """Microbatches of one sequence per device that make at least `global_tokens` per optimizer step."""
  return max(1, -(-global_tokens // (seq_len * devices)))


def search(cfg, family: str, global_tokens: int, headroom: float, store: dict, save=lambda: None,
           cpu: bool = False, steps: bool = False) -> dict:
  """The smallest target of `family` whose device memory (x `headroom`) holds the train step of `cfg` at
  `global_tokens` per step, one sequence per device per microbatch, fsdp over every device.

  At each size (in order, starting at the first whose analytic state fits) 'full' remat (least memory)
  is compiled first; if it fits, 'none' (no recompute), and if that does not, 'moe', all with scanned
  layers (`REMAT_LADDER`): the row names the setting with the least recompute that fits. A compile is cached in `store` under its key (`save()` after
  each: an interrupted search resumes). Returns {'fits': row or None, 'below': the best row of the size
  before it (the evidence that it does not fit), 'tried': [rows]}, and with `steps` the eval and decode steps
  compiled at the fitting setting ('steps': `step_rows`).
  """
  from moejax.model import accounting  # pylint: disable=import-outside-toplevel
  from moejax.parallel import targets  # pylint: disable=import-outside-toplevel
  if family not in FAMILIES:
    raise ConfigError(f'--search={family!r} is not a target family; use one of {sorted(FAMILIES)}')
  n_total, tried, below = accounting.count(cfg)['n_total'], [], None
  for name in FAMILIES[family]:
    t = targets.parse(name)
    budget = t.device_memory_bytes * headroom / 1e9
    if n_total * 16 / t.num_devices / 1e9 > budget:
      continue
    mb, best = _microbatches(global_tokens, cfg.data.seq_len, t.num_devices), None
    for remat, scan in REMAT_LADDER:
      row = _cached(store, save, cfg, t, remat, mb, scan=scan)
      # A scanned run's checkpoint save holds per-layer copies of its stacked leaves beside the state: at most
      # twice the state, outside the step (train.checkpoint).
      row['fits'] = (row.get('peak_gb') is not None and row['peak_gb'] <= budget
                     and (not row.get('scan_layers') or 2 * row['state_gb'] <= budget))
      row['budget_gb'] = budget
      tried.append(row)
      if remat == 'full' and not row['fits']:
        break
      if row['fits']:
        best = row
        if remat == 'none':
          break
    if best is not None:
      cpu_key = _key(cfg, None, best['remat'], mb, t.num_devices, best['scan_layers'])
      if cpu and cpu_key not in store and jax.device_count() >= t.num_devices:
        _cached(store, save, cfg, None, best['remat'], mb, t.num_devices, best['scan_layers'])
      if cpu_key in store:  # (shown whenever it was compiled once)
        best = dict(best, cpu_peak_gb=store[cpu_key]['peak_gb'])
      out = {'fits': best, 'below': below, 'tried': tried}
      if steps:
        out['steps'] = step_rows(store, save, cfg, t, best)
      return out
    below = tried[-1]
  return {'fits': None, 'below': below, 'tried': tried}


def _label(target, devices: int) -> str:
  """The row's target: the compile target's name, or 'cpu xN' for this machine's CPU compiler."""
  return target.name if target is not None else f'cpu x{devices}'


def _attention_core(cfg, target) -> str:
  """The attention core the step compiles with ('auto' resolved for the target, as the model does)."""
  from moejax.model import attention  # pylint: disable=import-outside-toplevel
  with aot.kernel_context(target):
    return attention.resolve(cfg.model.attention, jnp.dtype(cfg.model.compute_dtype),
                             head_dim=config_lib.head_dim(cfg.model), seq_len=cfg.data.seq_len,
                             masked=bool(cfg.data.get('document_mask', False)))


def _key(cfg, target, remat: str, microbatches: int, devices: int, scan: bool = False) -> str:
  compiler = target.compiler if target is not None else 'XLA:CPU'
  return '|'.join(map(str, (cfg.name, config_lib.config_hash(cfg), _label(target, devices),
                            remat, microbatches, f'{compiler}, jax {jax.__version__}',
                            f'attention {_attention_core(cfg, target)}',
                            f'v{FIT_CACHE_VERSION}') + (('scan',) if scan else ())))


def _cached(store: dict, save, cfg, target, remat: str, microbatches: int, devices: int | None = None,
            scan: bool = False) -> dict:
  devices = devices or target.num_devices
  compiler = target.compiler if target is not None else f'XLA:CPU (jax {jax.__version__})'
  failed = {'name': cfg.name, 'target': _label(target, devices), 'remat': remat, 'scan_layers': scan,
            'microbatches': microbatches, 'peak_gb': None, 'compiler': compiler}
  return _compiled(store, save, _key(cfg, target, remat, microbatches, devices, scan),
                   lambda: fit_row(cfg, target, devices, remat, microbatches, scan), failed)


def _compiled(store: dict, save, key: str, compile_row, failed: dict) -> dict:
  """store[key], compiled by `compile_row()` when missing; the compiler's device-memory refusal is cached as
  `failed` with its first line (peak_gb None), any other error propagates."""
  if key not in store:
    try:
      store[key] = compile_row()
    except Exception as e:  # pylint: disable=broad-except
      text = str(e)
      if not any(m in text for m in OUT_OF_MEMORY):
        raise
      store[key] = dict(failed, error=(text.strip().splitlines() or ['out of memory'])[0][:200])
    save()
  return dict(store[key])


def step_rows(store: dict, save, cfg, target, row: dict) -> dict:
  """The eval step (one sequence per device) and one decode step (one sequence per device against a cache of
  the context, split over the devices) of a fitting row's setting, compiled for its target and cached like
  the train step: {'eval': row, 'decode': row} (no 'decode' for a config that cannot decode: `decode.check_decodable`)."""
  fit_cfg = _fit_cfg(cfg, row['devices'], row['remat'], row['microbatches'], row['scan_layers'])
  key = _key(cfg, target, row['remat'], row['microbatches'], row['devices'], row['scan_layers'])
  steps = {'eval': lambda: compile_eval(fit_cfg, target)}
  if _decodable(cfg):
    steps['decode'] = lambda: compile_decode(fit_cfg, target, row['devices'])

  def compile_row(step):
    r = steps[step]()
    return {'peak_gb': _gb(r.get('peak_bytes')), 'temp_gb': _gb(r.get('temp_bytes')),
            'compile_s': r['compile_s'], 'compiler': r['compiler'], 'batch': row['devices'],
            'seq_len': cfg.data.seq_len}
  return {step: _compiled(store, save, f'{key}|{step} step', lambda step=step: compile_row(step),
                          {'peak_gb': None, 'compiler': row['compiler']})
          for step in steps}


def steps_row(cfg, result: dict) -> str:
  """The docs/scaling-out.md row of the three steps at a search's fitting setting."""
  f, s = result['fits'], result.get('steps', {})
  def cell(step):
    r = s.get(step)
    if r is None:
      return '-'
    if r['peak_gb'] is None:
      return 'compiler out of memory' if r.get('error') else 'no memory analysis'
    return f'{r["peak_gb"]:.1f} ({r["compile_s"]:.0f} s)'
  return (f'| {cfg.name} | {f["target"]} | remat {f["remat"]}, {f["microbatches"]} microbatches | '
          f'{f["peak_gb"]:.1f} ({f["compile_s"]:.0f} s) | {cell("eval")} | {cell("decode")} | {f["budget_gb"]:.0f} |')


STEPS_HEADER = ('| config | target | train setting | train peak GB (compile) | eval peak GB (compile), one '
                'sequence per device | decode peak GB (compile), one sequence per device, cache of the context | '
                'budget GB |\n|---|---|---|---:|---:|---:|---:|')


def search_row(cfg, family: str, global_tokens: int, result: dict) -> str:
  """The docs/scaling-out.md row of one search."""
  f, b = result['fits'], result['below']
  below = '-' if b is None else (f'{b["target"]}: {b["peak_gb"]:.1f} GB ({b["remat"]})' if b.get('peak_gb') is not None
                                 else f'{b["target"]}: ' + ('compiler out of memory' if b.get('error')
                                                            else 'no memory analysis'))
  if f is None:
    return (f'| {cfg.name} | {cfg.data.seq_len} | {global_tokens / 1e6:.2f}M | {family} | does not fit up to '
            f'{FAMILIES[family][-1]} | | | | | | | {below} |')
  cpu = f'{f["cpu_peak_gb"]:.1f}' if f.get('cpu_peak_gb') is not None else '-'
  return (f'| {cfg.name} | {cfg.data.seq_len} | {global_tokens / 1e6:.2f}M | {family} | {f["target"]} '
          f'({f["devices"]} devices) | remat {f["remat"]}{", scanned" if f.get("scan_layers") else ""}, '
          f'{f["microbatches"]} microbatches, {f["attention"]} attention '
          f'| {f["peak_gb"]:.1f} / {f["budget_gb"]:.0f} | {cpu} | {f["analytic_gb"]:.1f} | {f["compile_s"]:.0f} '
          f'| {below} |')


SEARCH_HEADER = ('| config | seq | tokens/step | family | smallest target | setting that fits | peak GB / budget '
                 '(real compiler) | CPU compiler GB | analytic state GB | compile s | next smaller |\n'
                 '|---|---:|---:|---|---|---|---:|---:|---:|---:|---|')


def define_flags() -> None:
  """This benchmark's flags (defined only when it runs as a command)."""
  flags.DEFINE_multi_string('config', None, 'Experiment file[:arg] (repeatable).', required=True)
  flags.DEFINE_multi_string('target', [], 'A compile target, e.g. tpu:v5p-8 or gpu:h100x8 (repeatable).')
  flags.DEFINE_multi_string('search', [], f'Find the smallest target of a family: {", ".join(FAMILIES)} '
                            '(repeatable).')
  flags.DEFINE_float('global_tokens', 1024 * 4096, 'Tokens per optimizer step for --search (OLMoE: 1024 x 4096).')
  flags.DEFINE_float('headroom', 0.9, "Fraction of a device's memory a fitting step may use (--search).")
  flags.DEFINE_string('out', None, '--search: JSON file caching every compile (an interrupted search resumes).')
  flags.DEFINE_bool('steps', False, '--search: also compile the eval and decode steps where the train step fits.')
  flags.DEFINE_bool('cpu', False, "Also the CPU compiler's figure for the same mesh over as many fake devices.")
  flags.DEFINE_integer('cpu_devices', 0, 'Fake this many CPU devices (for --cpu; the search skips the CPU figure '
                       'of a target with more devices).')
  flags.DEFINE_bool('cpu_only', False, "Only the CPU compiler's figure (each --target sets the mesh).")
  flags.DEFINE_multi_string('set', [], 'A config override KEY=VALUE, e.g. model.attention=auto (repeatable).')


def check_flags(F) -> dict:
  """One ConfigError line for flags that cannot be used (`F`: the parsed flags), before any compile; returns the
  config overrides (`--set`, bfloat16 compute)."""
  if not F.target and not F.search:
    raise ConfigError('give --target=NAME (one row per target) or --search=FAMILY (the smallest that fits)')
  if not 0 < F.headroom <= 1:
    raise ConfigError(f'--headroom={F.headroom} must be in (0, 1]')
  overrides = {'model.compute_dtype': 'bfloat16'}
  for item in F.set:
    if '=' not in item:
      raise ConfigError(f'--set={item!r} must be KEY=VALUE')
    key, value = step_bench.parse_override(item)  # Python literals (3e-4, False, None), else strings
    overrides[key] = value
  if not math.isfinite(F.global_tokens) or F.global_tokens <= 0:
    raise ConfigError(f'--global_tokens={F.global_tokens} must be a positive number')
  if (F.steps or F.global_tokens != 1024 * 4096) and not F.search:
    raise ConfigError('--steps and --global_tokens apply to --search=FAMILY')
  if F.cpu_only and not F.target:
    raise ConfigError('--cpu_only applies to --target=NAME')
  if F.out:
    parent = os.path.dirname(os.path.abspath(F.out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
      raise ConfigError(f'--out={F.out}: the directory {parent} does not exist or is not writable')
  return overrides


def _main(argv) -> None:
  from moejax import files  # pylint: disable=import-outside-toplevel
  from moejax.parallel import targets  # pylint: disable=import-outside-toplevel
  F = flags.FLAGS
  overrides = check_flags(F)
  unknown = [f for f in F.search if f not in FAMILIES]
  if unknown:
    raise ConfigError(f'--search={unknown[0]!r} is not a target family; use one of {sorted(FAMILIES)}')
  named = [targets.parse(name) for name in F.target]  # (bad names fail before any compile)
  targets.prepare_environment({t.platform for t in named} | {f.split(':')[0] for f in F.search})
  store = files.read_json(F.out, '--out') if F.out and os.path.exists(F.out) else {}

  def save():  # merged with the file as it is now: a second search writing the same cache loses nothing
    if F.out:
      on_disk = files.read_json(F.out, '--out') if os.path.exists(F.out) else {}
      store.update({k: v for k, v in on_disk.items() if k not in store})
      files.atomic_write_json(F.out, store)
  print(common.device_line(), flush=True)
  header_printed, fitted = False, []
  for cfg_path in F.config:
    path, _, arg = cfg_path.partition(':')
    cfg = config_lib.validate(config_lib.apply_overrides(config_lib.load_module(path).get_config(arg or None),
                                                         overrides))
    for family in F.search:
      if not header_printed:
        print(SEARCH_HEADER, flush=True)
        header_printed = True
      result = search(cfg, family, int(F.global_tokens), F.headroom, store, save, F.cpu, F.steps)
      print(search_row(cfg, family, int(F.global_tokens), result), flush=True)
      if F.steps and result['fits'] is not None:
        fitted.append((cfg, result))
    for name in F.target:
      t = targets.parse(name)
      for target in ([] if F.cpu_only else [t]) + ([None] if F.cpu or F.cpu_only else []):
        if target is None and jax.device_count() < t.num_devices:
          raise ConfigError(f'--cpu needs {t.num_devices} CPU devices: add --cpu_devices={t.num_devices}')
        r = fit_row(cfg, target, t.num_devices)
        fmt = lambda x: '-' if x is None else f'{x:.3g}'  # noqa: E731  (no memory analysis)
        print(f'| {r["name"]} | {t.name if target else t.name + " (CPU compiler)"} | {r["compiler"]} | '
              f'{fmt(r["peak_gb"])} | {fmt(r["temp_gb"])} | {r["state_gb"]:.3g} | {r["analytic_gb"]:.3g} | '
              f'{r["compile_s"]:.0f} |', flush=True)
  if fitted:
    print('\n' + STEPS_HEADER, flush=True)
    for cfg, result in fitted:
      print(steps_row(cfg, result), flush=True)


def main() -> None:
  define_flags()
  cli.cli(common.command(_main))


if __name__ == '__main__':
  main()

"""The train, eval and decode steps compiled from abstract shapes, locally or for a compile target.

  compile_all(cfg, target, decode_batch=8) -> {'train': report, 'eval': report, 'decode': report}

`target` is a `moejax.parallel.targets.Target` (None: the local devices). Each report has the
compiler, compile seconds and per-device memory figures (`moejax.parallel.aot.memory_figures`).
The train step is `train.state.compile_step`; the eval step is `train.evaluate.make_eval_step` on an eval batch;
the decode step is one token of `decode.forward` for `decode_batch` sequences against a cache
of the config's context (the prefill is the eval step's forward pass). Nothing is allocated.

  python -m moejax.bench fit --config=experiments/published/olmoe_1b_7b.py --target=tpu:v5p-8 [--cpu]

prints the docs/scaling-out.md memory-table row of each config on each target (and, with
--cpu, the CPU compiler's figure for the same mesh over fake CPU devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config as config_lib
from moejax.model import dispatch as dispatch_lib
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
  mesh = state_lib._make_mesh(cfg, None if target is None else target.devices())  # pylint: disable=protected-access
  graphdef, state = _abstract_state(cfg, mesh, target)
  replicated = mesh_lib.replicated(mesh)
  with aot.kernel_context(target):
    model = nnx.eval_shape(lambda: model_lib.build(cfg))
  cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       jax.eval_shape(lambda: model.init_cache(batch, cfg.data.seq_len)))
  vector = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated)
  dispatch = dispatch_lib.pick_dispatch('auto', batch, cfg.moe.experts_per_token, max(cfg.moe.num_experts, 1),
                                  backend=None if target is None else target.platform)

  def step(params, buffers, cache, tokens_B, positions_B):
    logits, cache, _ = decode.forward(nnx.merge(graphdef, params, buffers), tokens_B[:, None], positions_B[:, None],
                                      cache, dispatch)
    return jnp.argmax(logits[:, 0], axis=-1), cache

  jitted = mesh_lib.under_mesh(jax.jit(step, donate_argnums=2), mesh)
  c = aot.compile_for(target, None, state['params'], state['buffers'], cache, vector, vector, jitted=jitted)
  return {'compiler': c.compiler, 'compile_s': c.compile_s, 'dispatch': dispatch, **c.memory}


def compile_all(cfg, target=None, decode_batch: int = 8) -> dict:
  """{'train', 'eval', 'decode'}: each step's compile report for `target` (decode only for dropless eval)."""
  out = {'train': state_lib.compile_step(cfg, target), 'eval': compile_eval(cfg, target)}
  if not (cfg.moe.num_experts and cfg.moe.eval_capacity_factor is not None):
    out['decode'] = compile_decode(cfg, target, decode_batch)
  return out


def fit_row(cfg, target, devices: int) -> dict:
  """One table row: `cfg` on `devices` devices (fsdp over all, one sequence each), compiled for `target`
  (None: this machine's CPU compiler over as many fake devices), with the analytic state estimate."""
  from moejax.model import accounting  # pylint: disable=import-outside-toplevel
  cfg = config_lib.apply_overrides(cfg, {'mesh.fsdp': devices, 'mesh.expert': 1, 'mesh.data': 1, 'mesh.tensor': 1,
                                         'train.batch_size': devices, 'eval.batch_size': devices})
  config_lib.validate(cfg)
  r = state_lib.compile_step(cfg, target)
  n_total = accounting.count(cfg)['n_total']
  return {'name': cfg.name, 'target': target.name if target is not None else f'cpu x{devices}',
          'compiler': r['compiler'], 'devices': devices, 'peak_gb': r.get('peak_bytes', 0) / 1e9,
          'temp_gb': r.get('temp_bytes', 0) / 1e9, 'state_gb': (r['params_bytes'] + r['optimizer_bytes']) / 1e9,
          'analytic_gb': n_total * 16 / devices / 1e9, 'compile_s': r['compile_s']}


def main(argv=None) -> int:
  """python -m moejax.bench fit --config=experiments/published/olmoe_1b_7b.py --target=tpu:v5p-8 [--cpu]:
  one Markdown row per (config, target) for docs/scaling-out.md (train step, bfloat16 compute)."""
  import argparse  # pylint: disable=import-outside-toplevel
  from moejax.parallel import targets  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(prog='python -m moejax.bench fit')
  p.add_argument('--config', action='append', required=True)
  p.add_argument('--target', action='append', required=True)
  p.add_argument('--cpu', action='store_true', help="also the CPU compiler's figure over as many fake devices")
  p.add_argument('--cpu_only', action='store_true', help="only the CPU compiler's figure (the target sets the mesh)")
  p.add_argument('--set', action='append', default=[], help='a config override, e.g. moe.num_experts=16')
  a = p.parse_args(argv)
  overrides = {'model.compute_dtype': 'bfloat16'}
  for item in a.set:
    key, _, value = item.partition('=')
    overrides[key] = int(value) if value.lstrip('-').isdigit() else value
  for cfg_path in a.config:
    path, _, arg = cfg_path.partition(':')
    cfg = config_lib.load_module(path).get_config(arg or None)
    cfg = config_lib.apply_overrides(cfg, overrides)
    for name in a.target:
      t = targets.parse(name)
      runs = ([] if a.cpu_only else [t]) + ([None] if a.cpu or a.cpu_only else [])
      for target in runs:
        if target is None and jax.device_count() < t.num_devices:
          print(f'| (skipped: run with XLA_FLAGS=--xla_force_host_platform_device_count={t.num_devices}) |')
          continue
        r = fit_row(cfg, target, t.num_devices)
        print(f'| {r["name"]} | {t.name if target else t.name + " (CPU compiler)"} | {r["compiler"]} | '
              f'{r["peak_gb"]:.3g} | {r["temp_gb"]:.3g} | {r["state_gb"]:.3g} | {r["analytic_gb"]:.3g} | '
              f'{r["compile_s"]:.0f} |', flush=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())

"""The train state of a config: mesh, model, sharded parameters and optimizer state, built or abstract."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax import data
from moejax.model import accounting
from moejax.model import transformer as model_lib
from moejax.parallel import mesh as mesh_lib
from moejax.train import optim
from moejax.train.step import make_train_step

log = logging.getLogger(__name__)


def shardings(tree: Any) -> Any:
  """The sharding of every array leaf."""
  return jax.tree.map(lambda x: x.sharding, tree)


@dataclasses.dataclass
class Setup:
  """Everything a run builds from its config before the first step."""
  cfg: Any
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  state: dict
  corpus: data.Corpus
  accounting: dict


def _placed(cfg, mesh, param_state, buffer_state, abstract: bool = False) -> dict:
  """The sharded train state: arrays on their devices, or (abstract) ShapeDtypeStructs carrying the shardings."""
  put = _abstract if abstract else jax.device_put
  param_sh = mesh_lib.param_shardings(param_state, mesh)
  replicated = mesh_lib.replicated(mesh)
  params = put(nnx.to_pure_dict(param_state), param_sh)
  buffers = put(nnx.to_pure_dict(buffer_state), mesh_lib.param_shardings(buffer_state, mesh))
  optimizer = optim.for_run(cfg)
  # Adam moments shard like their parameters; counters are replicated.
  opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, jax.eval_shape(optimizer.init, params), param_sh,
                                 transform_non_params=lambda _: replicated)
  opt_state = (put(jax.eval_shape(optimizer.init, params), opt_sh) if abstract
               else jax.jit(optimizer.init, out_shardings=opt_sh)(params))
  return {'params': params, 'buffers': buffers, 'opt_state': opt_state,
          'step': put(jnp.zeros((), jnp.int32), replicated)}


def abstract_state(cfg) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, train state as ShapeDtypeStructs with shardings) of cfg, allocating nothing: a restore target."""
  mesh = _make_mesh(cfg)
  graphdef, param_state, buffer_state = model_lib.split(nnx.eval_shape(lambda: model_lib.build(cfg)))
  return graphdef, _placed(cfg, mesh, param_state, buffer_state, abstract=True)


def _make_mesh(cfg, devices=None):
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  mesh_lib.check_batch(cfg.train.batch_size, mesh, 'train.batch_size')  # (a -1 mesh axis resolves only here)
  mesh_lib.check_batch(cfg.eval.batch_size, mesh, 'eval.batch_size')
  return mesh


def setup(cfg, corpus: data.Corpus | None = None) -> Setup:
  """Builds mesh, model, sharded params and optimizer state for a validated config."""
  corpus = corpus or data.corpus_from_config(cfg.data)
  data.check_vocab(cfg, corpus)
  mesh = _make_mesh(cfg)
  t0 = time.time()
  graphdef, param_state, buffer_state = model_lib.split(model_lib.build(cfg))
  state = _placed(cfg, mesh, param_state, buffer_state)
  acc = accounting.count(cfg)
  log.info('model %s: N_total %s, N_active %s, built on mesh %s in %.1f s', cfg.name, accounting.human(acc['n_total']),
           accounting.human(acc['n_active']), dict(mesh.shape), time.time() - t0)
  return Setup(cfg, mesh, graphdef, state, corpus, acc)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def compile_step(cfg, target=None) -> dict:
  """Lowers and compiles the train step for cfg's mesh without allocating the model or reading data.

  `target` (a `moejax.parallel.targets.Target`) builds the mesh over that TPU slice's or GPU
  node's devices and compiles with its real compiler on this machine; None: the local devices.
  Returns the per-device memory analysis in bytes: state (arguments), temporaries, and the
  peak estimate arguments + outputs - donated aliases + temporaries; plus compile time and
  the compiler that made the figures.
  """
  from moejax.parallel import aot  # pylint: disable=import-outside-toplevel
  mesh = _make_mesh(cfg, None if target is None else target.devices())
  with aot.kernel_context(target):  # the model's kernel and exchange choices follow the target's platform
    graphdef, param_state, buffer_state = model_lib.split(nnx.eval_shape(lambda: model_lib.build(cfg)))
    state = _placed(cfg, mesh, param_state, buffer_state, abstract=True)
    step = make_train_step(graphdef, optim.for_run(cfg), cfg, shardings(state), mesh,
                           0 if cfg.data.get('document_mask', False) else None)  # (any id: the program is the same)
  tokens = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32,
                                sharding=mesh_lib.batch_sharding(mesh, 2))
  c = aot.compile_for(target, None, state, tokens, jax.ShapeDtypeStruct((), jnp.int32),
                      jax.ShapeDtypeStruct((), jnp.float32), jitted=step)
  per_device = lambda tree: sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                                for x in jax.tree.leaves(tree))
  report = {'mesh': dict(mesh.shape), 'devices': mesh.size,
            'platform': jax.default_backend() if target is None else target.platform, 'compiler': c.compiler,
            'compile_s': c.compile_s, 'params_bytes': per_device(state['params']),
            'optimizer_bytes': per_device(state['opt_state'])}
  report.update(c.memory)
  return report

"""The real TPU (XLA:TPU + Mosaic) and H100 (XLA:GPU + Triton) compilers, run on this CPU machine.

Marked `accel_compile`: not in the default run; `make test-accel` installs libtpu and the CUDA
plugin into .venv-accel and runs these. Each test is skipped when its compiler is missing.
Compiling is not running: these catch block-rule, VMEM and shared-memory failures and give
memory figures, not speed (docs/kernels.md).
"""

import pytest

from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.parallel import aot, targets

pytestmark = pytest.mark.accel_compile


def _target(name):
  t = targets.parse(name)
  try:
    targets.check_installed(t.platform)
  except ConfigError as e:
    pytest.skip(str(e))
  return t


CASES = {c.name: c for c in aot.kernel_cases()}
KERNEL_RUNS = ([('tpu:v5p-8', case, ways) for case in CASES for ways in (1, 4)]
               + [('gpu:h100x8', case, ways) for case in CASES for ways in (1, 8)])


@pytest.mark.parametrize('target,case,ways', KERNEL_RUNS)
def test_every_pallas_kernel_compiles_over_the_shape_grid(target, case, ways):
  """Router, counting sort, row dispatch and combine, grouped matmul forward, dx and dw, with gradients;
  alone and per device inside shard_map. A shape a kernel cannot tile runs the XLA path (a warning), never fails."""
  t = _target(target)
  c = aot.compile_kernels(t, CASES[case], ways)
  assert c.compile_s > 0 and c.compiler == t.compiler


def _quickstart_moe(expert_ways, **overrides):
  module = config_lib.load_module('experiments/quickstart.py')
  cfg = config_lib.apply_overrides(module.get_config(), {
      'moe.num_experts': 16, 'mesh.expert': expert_ways, 'mesh.fsdp': 1, 'train.batch_size': 16,
      'eval.batch_size': 16, **overrides})
  return config_lib.validate(cfg)


STEP_CHOICES = [{'moe.dispatch': 'block', 'moe.kernels': 'xla'}, {'moe.dispatch': 'block', 'moe.kernels': 'pallas'},
                {'moe.dispatch': 'ragged'}, {'moe.dispatch': 'capacity'}]


@pytest.mark.parametrize('target,ways', [('tpu:v5p-8', 4), ('tpu:v5p-16', 8), ('gpu:h100x4', 4), ('gpu:h100x8', 8)])
@pytest.mark.parametrize('choice', STEP_CHOICES, ids=lambda c: '-'.join(map(str, c.values())))
def test_train_eval_decode_steps_compile_with_expert_parallelism(target, ways, choice):
  from moejax.bench import fit as compile_steps  # pylint: disable=import-outside-toplevel
  t = _target(target)
  reports = compile_steps.compile_all(_quickstart_moe(ways, **choice), t)
  assert set(reports) == {'train', 'eval', 'decode'}
  for r in reports.values():
    assert r['compiler'] == t.compiler and r['peak_bytes'] > 0
  assert reports['train']['devices'] == ways and reports['train']['platform'] == t.platform

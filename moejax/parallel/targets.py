"""Compile targets: a TPU slice or GPU node, compiled for by its real compiler on a CPU machine.

  parse('tpu:v5p-8')      4 v5p chips (TPU names count TensorCores for v5p, chips for v5e/v6e)
  parse('tpu:v5p-16x2')   two v5p-16 slices (16 chips)
  parse('gpu:h100x8')     one node of 8 H100s;  'gpu:h100x8x2': two such nodes
  target.devices()        devices from `jax.experimental.topologies.get_topology_desc`: build a
                          Mesh over them, give inputs ShapeDtypeStructs with NamedShardings and
                          `jax.jit(f).lower(...).compile()` runs XLA:TPU (with Mosaic) or XLA:GPU
                          (with Triton) without the hardware (STACK.md section 3b).

TPU needs libtpu (`pip install 'moejax[tpu-compile]'`, i.e. the libtpu that jax[tpu] pins),
GPU the jax-cuda12-plugin and -pjrt wheels of the installed jax (`moejax[gpu-compile]`,
installed with --no-deps: compiling needs no CUDA libraries). GPU devices are described by
the text GpuTargetConfigs in `gpu_specs/` (each names its source). Any bad name, missing or
mismatched package is one ConfigError line. `onchip_bytes` is what a kernel tile may use:
the default scoped VMEM of the TPU generation (measured with libtpu 0.0.42.1: a kernel over
16 MiB fails with CompileTimeScopedVmemOom on v5p and v5e, over 32 MiB on v6e), or the
opt-in shared memory per block of the GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
from pathlib import Path

from moejax.errors import ConfigError

MiB, GiB = 1 << 20, 1 << 30


@dataclasses.dataclass(frozen=True)
class _Tpu:
  cores_per_chip_in_name: int  # v5p-8 is 8 TensorCores = 4 chips; v5e-8 is 8 chips
  dims: int  # torus dimensions (3: x, y, z; 2: x, y)
  scoped_vmem_bytes: int
  hbm_bytes: int
  kind: str  # jax Device.device_kind


TPUS = {
    'v5p': _Tpu(2, 3, 16 * MiB, 95 * GiB, 'TPU v5'),
    'v5e': _Tpu(1, 2, 16 * MiB, 16 * GiB, 'TPU v5 lite'),
    'v6e': _Tpu(1, 2, 32 * MiB, 32 * GiB, 'TPU v6 lite'),
}
GPU_SPECS = Path(__file__).parent / 'gpu_specs'
GPUS = ('h100', 'h200')
EXAMPLES = 'tpu:v5p-8, tpu:v5e-16, tpu:v6e-8, tpu:v5p-16x2, gpu:h100x8, gpu:h200x8, gpu:h100x8x2'


@dataclasses.dataclass(frozen=True)
class Target:
  """One compile target; `devices()` gives its abstract devices (needs the optional compiler package)."""

  name: str  # as given, e.g. 'tpu:v5p-8'
  platform: str  # 'tpu' or 'gpu' (the names `moejax.kernels` uses)
  chip: str  # 'v5p', 'h100', ...
  num_devices: int  # chips (TPU) or GPUs, all slices or nodes together
  num_slices: int  # TPU slices or GPU nodes
  onchip_bytes: int  # scoped VMEM (TPU) or shared memory per block (GPU) a kernel tile may use
  device_memory_bytes: int  # HBM per device
  topology: tuple  # (key, value) pairs for get_topology_desc

  @property
  def compiler(self) -> str:
    """The compiler that makes this target's figures, with its package version."""
    if self.platform == 'tpu':
      return f'XLA:TPU with Mosaic (libtpu {_version("libtpu")})'
    return f'XLA:GPU with Triton (jax-cuda12-plugin {_version("jax-cuda12-plugin")})'

  def devices(self) -> list:
    """The target's devices, for a Mesh; raises ConfigError when its compiler package is missing or mismatched."""
    check_installed(self.platform)
    prepare_environment((self.platform,))
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    try:
      devices = list(topologies.get_topology_desc(**dict(self.topology)).devices)
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ConfigError(f'--target={self.name}: the {self.platform} compiler gave no devices: {first}') from e
    if len(devices) != self.num_devices:
      raise ConfigError(f'--target={self.name}: the compiler gave {len(devices)} devices, not {self.num_devices}')
    return devices


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def _pinned_libtpu(jax_version: str) -> str | None:
  """The libtpu version prefix that jax's `tpu` extra pins, e.g. '0.0.42' (None if jax names none)."""
  for req in importlib.metadata.requires('jax') or ():
    m = re.match(r'libtpu\s*==\s*([0-9.]+?)(\.\*)?\s*;.*extra\s*==\s*"tpu"', req)
    if m:
      return m.group(1)
  del jax_version
  return None


def check_installed(platform: str) -> None:
  """Raises ConfigError (one line) unless the compiler package for `platform` matches the installed jax."""
  jax_version = _version('jax')
  if platform == 'tpu':
    have, want = _version('libtpu'), _pinned_libtpu(jax_version)
    fix = f"pip install 'jax[tpu]=={jax_version}' (or moejax[tpu-compile])"
    if have is None:
      raise ConfigError(f'compiling for TPU needs libtpu, which is not installed: {fix}')
    if want and not (have == want or have.startswith(want + '.')):
      raise ConfigError(f'libtpu {have} does not match jax {jax_version} (it pins libtpu {want}): {fix}')
    return
  for dist in ('jax-cuda12-plugin', 'jax-cuda12-pjrt'):
    have = _version(dist)
    fix = (f'pip install --no-deps jax-cuda12-plugin=={jax_version} jax-cuda12-pjrt=={jax_version} '
           '(or moejax[gpu-compile])')
    if have is None:
      raise ConfigError(f'compiling for GPU needs {dist}, which is not installed: {fix}')
    if have != jax_version:
      raise ConfigError(f'{dist} {have} does not match jax {jax_version}: {fix}')


def _torus(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape of `chips` chips: from 2x2(x1), double the last of the smallest dimensions."""
  shape = [2, 2, 1] if dims == 3 else [2, 2]
  while shape[0] * shape[1] * (shape[2] if dims == 3 else 1) < chips:
    i = max(j for j, n in enumerate(shape) if n == min(shape))
    shape[i] *= 2
  return tuple(shape)


def _tpu(name: str, chip: str, count: int, slices: int) -> Target:
  spec = TPUS[chip]
  chips = count // spec.cores_per_chip_in_name
  if count % spec.cores_per_chip_in_name or chips < 4 or chips & (chips - 1):
    raise ConfigError(f'--target={name}: {chip} slices here have a power-of-two count of at least 4 chips '
                      f'({4 * spec.cores_per_chip_in_name} or more in the name), e.g. tpu:{chip}-'
                      f'{8 * spec.cores_per_chip_in_name // 2}')
  shape = _torus(chips, spec.dims)
  topology = (('platform', 'tpu'), ('topology_name', f'{chip}:{"x".join(map(str, shape))}'),
              ('chip_config_name', 'default'), ('chips_per_host_bounds', (2, 2, 1)), ('num_slices', slices))
  return Target(name, 'tpu', chip, chips * slices, slices, spec.scoped_vmem_bytes, spec.hbm_bytes, topology)


def gpu_spec(chip: str) -> str:
  """The text GpuTargetConfig of `chip` (gpu_specs/<chip>.txtpb)."""
  return (GPU_SPECS / f'{chip}.txtpb').read_text()


def _spec_field(spec: str, field: str) -> int:
  return int(re.search(rf'\b{field}:\s*(\d+)', spec).group(1))


def _gpu(name: str, chip: str, per_node: int, nodes: int) -> Target:
  if per_node not in (1, 2, 4, 8):
    raise ConfigError(f'--target={name}: a GPU node has 1, 2, 4 or 8 GPUs, not {per_node}')
  spec = gpu_spec(chip)
  topology = (('platform', 'cuda'), ('topology_name', ''), ('topology', f'1 x {nodes} x {per_node}'),
              ('target_config', spec))
  return Target(name, 'gpu', chip, per_node * nodes, nodes, _spec_field(spec, 'shared_memory_per_block_optin'),
                _spec_field(spec, 'device_memory_size'), topology)


def prepare_environment(platforms=('tpu', 'gpu')) -> None:
  """Call before jax starts its backends in a process that compiles for targets of `platforms` (`devices()`
  calls it for its own).

  TPU: libtpu's start-up probing of a TPU VM it is not on is quieted and it is told it may be loaded by a
  second compiling process (a test worker; it otherwise takes /tmp/libtpu_lockfile). GPU: the CUDA plugin
  otherwise refuses to start without the CUDA runtime, which compiling does not need. Only unset
  variables are set.
  """
  settings = {'tpu': (('TPU_ACCELERATOR_TYPE', 'v5p-8'), ('TPU_WORKER_HOSTNAMES', 'localhost'),
                      ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')),
              'gpu': (('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1'),)}
  for platform in platforms:
    for key, value in settings[platform]:
      os.environ.setdefault(key, value)


def parse(name: str) -> Target:
  """The Target named `name` (see the module docstring); ConfigError naming the accepted forms otherwise."""
  m = re.fullmatch(r'tpu:(v5p|v5e|v6e)-(\d+)(?:x(\d+))?', name.strip().lower())
  if m:
    return _tpu(name, m.group(1), int(m.group(2)), int(m.group(3) or 1))
  m = re.fullmatch(rf'gpu:({"|".join(GPUS)})x(\d+)(?:x(\d+))?', name.strip().lower())
  if m:
    return _gpu(name, m.group(1), int(m.group(2)), int(m.group(3) or 1))
  raise ConfigError(f'--target={name!r} is not a compile target; use tpu:<v5p|v5e|v6e>-<count>[x<slices>] '
                    f'or gpu:<{"|".join(GPUS)}>x<gpus per node>[x<nodes>], e.g. {EXAMPLES}')

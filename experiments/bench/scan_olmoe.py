"""OLMoE-1B-7B's train step, unrolled against scanned, with and without remat (issue 31's compile-time target).

16 layers, 4,096 tokens, one sequence per device over `mesh.fsdp=8`, bfloat16 compute,
`model.attention='auto'`. On 8 fake CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m moejax.bench compile --config=experiments/bench/scan_olmoe.py

docs/scaling-out.md has the table (and the same model compiled for an H100 node).
"""

from experiments.published import olmoe_1b_7b


def get_config(arg=None):
  del arg
  c = olmoe_1b_7b.get_config()
  c.name = 'scan-olmoe'
  c.model.compute_dtype, c.model.attention = 'bfloat16', 'auto'
  c.mesh.fsdp, c.mesh.data, c.mesh.expert, c.mesh.tensor = 8, 1, 1, 1
  c.train.batch_size, c.eval.batch_size = 8, 8
  return c


def get_sweep(arg=None):
  del arg
  return [{'name': 'unrolled'}, {'name': 'scanned', 'model.scan_layers': True},
          {'name': 'unrolled-remat-full', 'model.remat': 'full'},
          {'name': 'scanned-remat-full', 'model.scan_layers': True, 'model.remat': 'full'}]

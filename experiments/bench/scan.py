"""Compile time of a deep model, unrolled against scanned (`model.scan_layers`).

The quickstart width (d=64, 16 experts top-2) at 16 layers, and at 16 layers with a first dense
layer and MoE every other layer (the scan then runs periods of two blocks); and the compiled
memory of remat 'full' and 'moe' at this depth, unrolled and scanned.

Run:  python -m moejax.bench compile --config=experiments/bench/scan.py
docs/scaling-out.md has the table.
"""

from experiments import quickstart


def get_config(arg=None):
  del arg
  c = quickstart.get_config()
  c.name = 'scan-bench'
  c.moe.num_experts = 16
  c.model.num_layers = 16
  return c


def get_sweep(arg=None):
  del arg
  mixed = {'moe.first_dense_layers': 1, 'moe.every_n_layers': 2}
  return [{'name': 'unrolled'}, {'name': 'scanned', 'model.scan_layers': True},
          {'name': 'mixed-unrolled', **mixed}, {'name': 'mixed-scanned', 'model.scan_layers': True, **mixed},
          {'name': 'unrolled-remat-full', 'model.remat': 'full'}, {'name': 'unrolled-remat-moe', 'model.remat': 'moe'},
          {'name': 'scanned-remat-full', 'model.scan_layers': True, 'model.remat': 'full'},
          {'name': 'scanned-remat-moe', 'model.scan_layers': True, 'model.remat': 'moe'}]

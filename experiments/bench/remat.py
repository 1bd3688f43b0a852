"""Memory against step time: rematerialization policies and microbatches at one global batch.

Question: what do `model.remat` and `train.microbatches` save in compiled temporaries, and
what do they cost in step time, on the quickstart shape (d=64, 2 layers, 16 experts top-2,
32 x 128 tokens)?

Run (each on one CPU device; a few minutes on 2 cores):
  python -m moejax.bench step --config=experiments/bench/remat.py            # step time, interleaved rounds
  python -m moejax.bench compile --config=experiments/bench/remat.py       # compiler memory analysis

Points: no remat, 'full', 'moe' (keep projections and routing, recompute the routed experts)
and 'dots'; then 2, 4 and 8 microbatches without remat. docs/scaling-out.md has the table.
"""

from experiments import quickstart


def get_config(arg=None):
  del arg
  c = quickstart.get_config()
  c.name = 'remat-bench'
  c.moe.num_experts = 16
  return c


def get_sweep(arg=None):
  del arg
  return ([{'name': f'remat-{r}', 'model.remat': r} for r in ('none', 'full', 'moe', 'dots')]
          + [{'name': f'micro-{k}', 'train.microbatches': k} for k in (2, 4, 8)])

"""Expert-parallel step cost against one device, for the same global batch.

Question: what does splitting the experts over the mesh's expert axis (shard_map all-to-all)
cost, compared with the same model and global batch on one device?

Run (8 fake CPU devices; ~2 min on 2 cores):
  python -m moejax.bench step --config=experiments/bench/expert_parallel.py --cpu_devices=8

Points: one device; data-parallel over 8; experts over 8 (the dropless buffer, and
capacity factors 1.25 and 2); data 2 x experts 4. All points share the model, the batch and the
routing, so the ratios isolate the partitioning. On fake CPU devices all 8 share the same
cores: the ratio measures overhead (collectives, buffer padding, partitioning), not speed-up.
"""

from moejax import base_config as base


def get_config(arg=None):
  del arg
  c = base.get_config()
  c.name = 'ep-bench'
  c.model.model_dim = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.moe.num_experts = 32
  c.moe.experts_per_token = 2
  c.moe.expert_hidden = 128
  c.moe.use_renormalized_gates = True
  c.data.seq_len = 128
  c.train.batch_size = 32
  c.eval.batch_size = 32
  return c


def get_sweep(arg=None):
  del arg
  return [{'name': 'one-device'},
          {'name': 'data8', 'mesh.data': 8},
          {'name': 'expert8', 'mesh.expert': 8},
          {'name': 'expert8-cf1.25', 'mesh.expert': 8, 'moe.expert_parallel_capacity_factor': 1.25},
          {'name': 'expert8-cf2', 'mesh.expert': 8, 'moe.expert_parallel_capacity_factor': 2.0},
          {'name': 'data2-expert4', 'mesh.data': 2, 'mesh.expert': 4}]

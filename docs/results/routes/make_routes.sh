# How docs/results/routes was made (2026-12-06, 2-core CPU): two seeds of the quickstart E16 design, checkpoints kept every 50 steps, then the replay.
set -e
cd /work/main
for s in 0 1; do
  .venv/bin/python -m moejax.main --config=experiments/quickstart.py --workdir=/tmp/routes_demo/e16-seed$s \
    --config.moe.num_experts=16 --config.moe.expert_hidden=128 --config.moe.experts_per_token=2 --config.train.steps=300 \
    --config.checkpoint.every_steps=50 --config.checkpoint.keep_every_steps=50 --config.seed=$s --config.data.seed=$s --config.name=routes-e16
done
.venv/bin/python -m moejax.routes --workdir=/tmp/routes_demo/e16-seed0 --workdir=/tmp/routes_demo/e16-seed1 --out=/work/main/docs/results/routes
echo ROUTES_DONE

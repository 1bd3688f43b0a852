#!/usr/bin/env bash
# Train one configuration on a Cloud TPU VM or pod slice: create (or reuse) it, copy this
# checkout to every worker, install, run on all workers at once, stream the logs, and
# optionally delete the slice. No hyperparameters live here.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--type v5litepod-16] [--version RUNTIME]
#       [--project P] [--spot] [--delete] [--dry_run] CONFIG WORKDIR [--config.key=value ...]
#
# WORKDIR must be a directory every worker sees (a Filestore/NFS mount or a gcsfuse-mounted
# bucket): Orbax writes one checkpoint from all workers, process 0 writes the records.
# Every worker runs `python -m moejax.main ... --config.distributed.mode=multi`; JAX finds
# the other workers through the TPU metadata. Check memory first with --mode=compile
# (docs/scaling-out.md). --dry_run prints the gcloud commands instead of running them.
set -euo pipefail
name=''; zone=''; type='v5litepod-16'; version='v2-alpha-tpuv5-lite'; project=''; spot=0; delete=0; dry_run=0
python_version=${PYTHON_VERSION:-3.12}
usage() {
  echo "usage: launch/tpu_pod.sh --name NAME --zone ZONE [--type T] [--version V] [--project P] [--spot]" \
       "[--delete] [--dry_run] CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
}
while [[ $# -gt 0 && $1 == --* && $1 != --config* ]]; do
  case $1 in
    --name) name=${2:?}; shift 2 ;;
    --zone) zone=${2:?}; shift 2 ;;
    --type) type=${2:?}; shift 2 ;;
    --version) version=${2:?}; shift 2 ;;
    --project) project=${2:?}; shift 2 ;;
    --spot) spot=1; shift ;;
    --delete) delete=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    *) echo "launch/tpu_pod.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ -n $name && -n $zone && $# -ge 2 ]] || usage
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")
remote_dir='~/moejax'
archive=/tmp/moejax-$name.tar.gz
overrides=''
(( $# )) && overrides=$(printf ' %q' "$@")  # (printf with no arguments would still print one '')
train_cmd="cd $remote_dir && .venv/bin/python -m moejax.main --config=$(printf %q "$config")"
train_cmd+=" --workdir=$(printf %q "$workdir") --config.distributed.mode=multi$overrides"

run() {  # print (dry run) or execute one command
  if (( dry_run )); then printf '%q ' "$@"; echo; else "$@"; fi
}

create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version")
(( spot )) && create+=(--spot)
if (( delete )); then  # also when a later step fails: never leave a paid slice behind
  trap 'run "${tpu[@]}" delete "$name" "${where[@]}" --quiet' EXIT
fi
if (( dry_run )); then
  echo "# create the slice unless '${tpu[*]} describe $name' finds it READY (a preempted one is deleted first):"
  run "${create[@]}"
else
  state=$("${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null || true)
  if [[ -n $state && $state != READY ]]; then  # PREEMPTED / TERMINATED spot slices cannot be reused
    echo "launch/tpu_pod.sh: slice $name is $state; recreating it" >&2
    "${tpu[@]}" delete "$name" "${where[@]}" --quiet
    state=''
  fi
  [[ -z $state ]] && "${create[@]}"
fi
run git archive --format=tar.gz -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$name:moejax.tar.gz" "${where[@]}" --worker=all
# TPU VM images ship an older system Python: uv installs Python $python_version for the venv.
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command \
  "set -e; mkdir -p $remote_dir && tar -xzf moejax.tar.gz -C $remote_dir && cd $remote_dir && python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --python $python_version .venv && ~/.local/bin/uv pip install -q --python .venv/bin/python -e '.[tpu]'"
# All workers start together; their output streams here (and into ~/moejax-run.log on each worker).
# pipefail: the exit status is the trainer's, not tee's.
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "set -o pipefail; $train_cmd 2>&1 | tee -a ~/moejax-run.log"

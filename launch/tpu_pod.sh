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
overrides=$(printf ' %q' "$@")
train_cmd="cd $remote_dir && .venv/bin/python -m moejax.main --config=$(printf %q "$config")"
train_cmd+=" --workdir=$(printf %q "$workdir") --config.distributed.mode=multi$overrides"

run() {  # print (dry run) or execute one command
  if (( dry_run )); then printf '%q ' "$@"; echo; else "$@"; fi
}

create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version")
(( spot )) && create+=(--spot)
if (( dry_run )); then
  echo "# create the slice unless '${tpu[*]} describe $name' finds it:"
  run "${create[@]}"
elif ! "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  "${create[@]}"
fi
run git archive --format=tar.gz -o "$archive" HEAD
run "${tpu[@]}" scp "$archive" "$name:moejax.tar.gz" "${where[@]}" --worker=all
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command \
  "mkdir -p $remote_dir && tar -xzf moejax.tar.gz -C $remote_dir && cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
# All workers start together; their output streams here (and into ~/moejax-run.log on each worker).
status=0
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$train_cmd 2>&1 | tee -a ~/moejax-run.log" \
  || status=$?
if (( delete )); then
  run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
exit $status

#!/usr/bin/env bash
# Run one configuration on this machine (all its devices, one process).
#   launch/local.sh [--dry_run] CONFIG WORKDIR [--config.key=value ...]
# No hyperparameters live here: they belong in the experiment file or the overrides.
# Fake N CPU devices (to try a mesh) with XLA_FLAGS=--xla_force_host_platform_device_count=N.
set -euo pipefail
dry_run=0
if [[ ${1:-} == --dry_run ]]; then dry_run=1; shift; fi
if [[ $# -lt 2 ]]; then
  echo "usage: launch/local.sh [--dry_run] experiments/X.py[:arg] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
# Paths given relative to the caller's directory keep meaning that after the cd below.
[[ $config == /* ]] || config=$PWD/$config
[[ $workdir == /* || $workdir == *://* ]] || workdir=$PWD/$workdir
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
cmd=("$PY" -m moejax.main --config="$config" --workdir="$workdir" "$@")
if (( dry_run )); then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"

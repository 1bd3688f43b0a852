#!/usr/bin/env bash
# Run one configuration on this machine: launch/local.sh CONFIG WORKDIR [--config.a.b=v ...]
# No hyperparameters live here: they belong in the experiment file or the overrides.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: launch/local.sh experiments/X.py[:arg] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
config=$1; workdir=$2; shift 2
exec "$PY" -m moejax.main --config="$config" --workdir="$workdir" "$@"

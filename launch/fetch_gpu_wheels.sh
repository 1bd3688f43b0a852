#!/usr/bin/env bash
# Downloads the wheels the device machine's image lacks into .whl/ (git-ignored), for Python 3.12
# on manylinux x86_64, one version of each, so `launch/gpu_check.sh` can install them there
# offline (docs/performance.md, "The GPU check"). Run once on a machine with network access:
#
#   launch/fetch_gpu_wheels.sh [DIR]        # DIR defaults to .whl (make gpu-wheels)
#
# The image (/work/.library/device/KINDS.md) already has jax 0.11.2, flax, optax, orbax, numpy,
# absl-py, etils, protobuf, pyarrow, psutil, requests, tqdm, wrapt, pyyaml, cloudpickle, attrs,
# typing-extensions, zipp, fsspec and tokenizers 0.23.2 (setup.cfg asks >= 0.20), so those are
# not carried. The pins are the versions verified together on the development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}

# moejax's own needs, then what they need that the image lacks (Requires-Dist of each, read
# with `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`).
BINARY=(
  grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 tensorflow-datasets==4.9.10
  portpicker==1.6.0                                   # grain
  importlib-resources==7.1.0                          # tfds (and etils[epath])
  dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
)
SOURCE_ONLY=(promise==2.3)  # tfds; PyPI has no wheel, so one is built here (pure Python)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${BINARY[@]}"
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "${SOURCE_ONLY[@]}" 2>/dev/null \
  || "$PYTHON" -m pip wheel --quiet --no-deps -w "$DEST" "${SOURCE_ONLY[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
expected=$(( ${#BINARY[@]} + ${#SOURCE_ONLY[@]} ))
if [ "$count" -ne "$expected" ]; then
  echo "fetch_gpu_wheels: error: $count wheels in $DEST, expected $expected (one per package)" >&2
  exit 1
fi
echo "fetch_gpu_wheels: $count wheels, $(du -sh "$DEST" | cut -f1) in $DEST"

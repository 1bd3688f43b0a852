#!/usr/bin/env bash
# The GPU check (issue 29): everything moejax has to prove on a lent GPU, in one call of at most
# 8 minutes, every stage time-boxed and independent, every table and log under $OUT (8 files).
#
#   launch/gpu_check.sh             # on the device machine (make gpu-check); needs .whl/ (make gpu-wheels)
#   launch/gpu_check.sh --dry-run   # on CPU: tiny shapes, the same stages and files (tests/launch_test.py)
#
# Stages: setup (install .whl/ into /tmp/site), info (device, driver, versions), pytest (-m gpu),
# moe-N (python -m moejax.bench.moe per shape, with a Triton settings sweep), olmoe (30 train
# steps of experiments/bench/olmoe_h100.py through moejax.bench.step, MFU), decode (moejax.bench.decode
# on experiments/bench/decode_h100.py). docs/performance.md says what each measures and gives the
# device call. Exit status 0 only when every stage passed; summary.md says which did.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  '') ;;
  *) echo "usage: launch/gpu_check.sh [--dry-run]   (OUT=dir for the files; PYTHON=interpreter)" >&2; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$OUT" || exit 2
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES_LOG=$OUT/stages.log CONSOLE=$OUT/gpu_check.log SUMMARY=$OUT/summary.md
: >"$STAGES_LOG"; : >"$CONSOLE"

if [ $DRY = 1 ]; then
  export JAX_PLATFORMS=cpu
  MOE_SHAPES=(4:32:64:256 8:32:32:256)  # E:D:F:M, CPU-sized stand-ins for the four below
  MOE_SWEEP=16:32:4:3,32:32:8:2
  MOE_FLAGS=(--rounds=1 --layer_kernels=xla)
  OLMOE=(--config=experiments/bench/olmoe_h100.py:tiny --steps=2 --rounds=1)
  DECODE=(--config=experiments/bench/decode_h100.py:tiny --batches=1,4 --decode_steps=4 --rounds=1 --copy_mb=4)
  BOX_SETUP=30 BOX_INFO=60 BOX_PYTEST=120 BOX_MOE=240 BOX_OLMOE=240 BOX_DECODE=180
  TOTAL=${GPU_CHECK_SECONDS:-1500}
else
  export JAX_PLATFORMS=cuda
  # PERF.md's grouped-matmul target shapes; E64/F1024 at 131072 rows is also the layer target T16k, K8,
  # and E8/F14336 at 16384 rows the Mixtral-like layer (T8192, K2).
  MOE_SHAPES=(64:2048:1024:131072 64:2048:1408:65536 128:2048:512:32768 8:4096:14336:16384)
  MOE_SWEEP=128:128:4:3,128:128:8:3,128:64:4:3,128:128:4:4,64:128:4:3,128:128:8:4  # BLOCK:TILE:WARPS:STAGES
  MOE_FLAGS=(--rounds=3 --layer_kernels=xla,pallas)  # (the reference layer gathers 48 GB of weights at Mixtral)
  OLMOE=(--config=experiments/bench/olmoe_h100.py --steps=10 --rounds=3)
  DECODE=(--config=experiments/bench/decode_h100.py --batches=1,64 --decode_steps=16 --rounds=3)
  TOTAL=${GPU_CHECK_SECONDS:-465}  # every stage ends by then, inside the device call's 480 s, so the summary is written
  BOX_SETUP=15 BOX_INFO=15 BOX_PYTEST=65 BOX_MOE=55 BOX_OLMOE=95 BOX_DECODE=45  # 455 s in all (4 shapes)
fi

say() { echo "$*" | tee -a "$CONSOLE"; }
RESULTS=()

# stage NAME BOX STDOUT_FILE COMMAND...: runs COMMAND under `timeout BOX`, stdout appended to STDOUT_FILE,
# stderr to stages.log; records passed / FAILED / TIMED OUT with its seconds.
stage() {
  local name=$1 box=$2 file=$3 t0=$SECONDS rc status
  shift 3
  local left=$((TOTAL - SECONDS))
  if [ "$left" -lt 5 ]; then
    RESULTS+=("$name|SKIPPED (no time left)|0|$(basename "$file")")
    say "gpu_check: $name: SKIPPED (no time left of $TOTAL s)"
    return 1
  fi
  [ "$box" -gt "$left" ] && box=$left
  printf '\n===== %s (%s s box): %s\n' "$name" "$box" "$*" >>"$STAGES_LOG"
  if declare -F "$1" >/dev/null; then  # a function of this script: `timeout` runs it in a fresh bash
    timeout -k 10 "$box" bash -c "$(declare -f "$1"); $(declare -p DRY OUT PYTHON OLMOE); \"\$@\"" _ "$@" \
      >>"$file" 2>>"$STAGES_LOG"
  else
    timeout -k 10 "$box" "$@" >>"$file" 2>>"$STAGES_LOG"
  fi
  rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status="TIMED OUT after ${box} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  RESULTS+=("$name|$status|$((SECONDS - t0))|$(basename "$file")")
  say "gpu_check: $name: $status in $((SECONDS - t0)) s"
  return $rc
}

setup() {
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    if [ $DRY = 1 ]; then echo "no .whl/: nothing to install (dry run)"; return 0; fi
    echo "no wheels in .whl/: run make gpu-wheels here, then carry .whl" >&2; return 1
  fi
  local dups
  dups=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
  if [ -n "$dups" ]; then echo "two versions of: $dups (keep one; make gpu-wheels)" >&2; return 1; fi
  ls .whl/*.whl | xargs -n1 basename
  if [ $DRY = 1 ]; then echo "(dry run: one version of each; not installed)"; return 0; fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

info() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv || echo "nvidia-smi: not found"
  git rev-parse --short HEAD 2>/dev/null | sed 's/^/moejax commit /'
  "$PYTHON" - "$DRY" <<'EOF'
import importlib.metadata as md, platform, sys
import jax
print(f'python {platform.python_version()}; backend {jax.default_backend()}; devices {jax.devices()}')
for name in ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax', 'optax', 'orbax-checkpoint', 'grain',
             'ml-collections', 'tensorflow-datasets', 'tokenizers', 'numpy', 'triton'):
  try:
    print(f'{name} {md.version(name)}')
  except md.PackageNotFoundError:
    pass
sys.exit(0 if sys.argv[1] == '1' or jax.default_backend() == 'gpu' else 'no GPU backend: ' + jax.default_backend())
EOF
}

run_pytest() {
  local log=$OUT/pytest.log
  "$PYTHON" -m pytest -q -m gpu tests/gpu_test.py >>"$log" 2>&1 || return 1
  # On a GPU every gpu test must run: all of them skipped is a failure there.
  [ $DRY = 1 ] || ! grep -qE '^[0-9]+ skipped' "$log"
}

olmoe() {
  "$PYTHON" -m moejax.bench.step "${OLMOE[@]}" && return 0
  echo "(the batch of 4 x 4096 failed, see stages.log; one sequence per step:)"
  "$PYTHON" -m moejax.bench.step "${OLMOE[@]}" --override=train.batch_size=1
}

say "gpu_check: $([ $DRY = 1 ] && echo 'dry run (CPU)' || echo 'GPU run'), files in $OUT"
stage setup "$BOX_SETUP" "$STAGES_LOG" setup && [ $DRY = 0 ] && export PYTHONPATH="/tmp/site:$PYTHONPATH"
stage info "$BOX_INFO" "$OUT/info.txt" info
stage pytest "$BOX_PYTEST" "$OUT/pytest.log" run_pytest
i=0
for shape in "${MOE_SHAPES[@]}"; do
  i=$((i + 1))
  stage "moe-$i ($shape)" "$BOX_MOE" "$OUT/moe.md" "$PYTHON" -m moejax.bench.moe --shapes="$shape" \
    --triton="$MOE_SWEEP" "${MOE_FLAGS[@]}"
done
stage olmoe "$BOX_OLMOE" "$OUT/olmoe.md" olmoe
stage decode "$BOX_DECODE" "$OUT/decode.md" "$PYTHON" -m moejax.bench.decode "${DECODE[@]}"

mfu=$(awk -F'|' '/^\| olmoe-h100 /{v=$8} END{gsub(/ /, "", v); print v}' "$OUT/olmoe.md" 2>/dev/null)
ratio=$(awk -F'|' '/^\| decode-h100 /{if ($14 ~ /x/) {gsub(/ /, "", $3); gsub(/ /, "", $14); v=v " B=" $3 " " $14}}
  END{sub(/^ /, "", v); print v}' "$OUT/decode.md" 2>/dev/null)
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ) ($([ $DRY = 1 ] && echo 'dry run, CPU' || echo GPU))"
  echo
  echo "| stage | result | seconds | file |"
  echo "|---|---|---:|---|"
  for r in "${RESULTS[@]}"; do IFS='|' read -r n s t f <<<"$r"; echo "| $n | $s | $t | $f |"; done
  echo
  echo "OLMoE-shaped train step MFU: ${mfu:-none}; decode measured/model by batch: ${ratio:-none}; total $SECONDS s."
} >"$SUMMARY"
cat "$SUMMARY" | tee -a "$CONSOLE"
failed=$(printf '%s\n' "${RESULTS[@]}" | grep -vc '|passed|')
say "gpu_check: $(( ${#RESULTS[@]} - failed )) of ${#RESULTS[@]} stages passed"
[ "$failed" = 0 ]

#!/usr/bin/env bash
# One-command GPU check: install (no dependencies, no network), the GPU tests
# (bf16 included), the headline benchmarks and a config sweep; a markdown
# table lands in $OUT/bench.md. Run from the repository root:
#     bash bench/gpu_check.sh            # OUT defaults to ./gpu-check
set -uo pipefail
OUT=${OUT:-./gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, keep going on failure
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    [ $rc -eq 0 ] || { echo "=== $name exited $rc"; status=1; }
}
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
step bench 200 python3 -m posttrain_kernels.bench bench all --md "$OUT/bench.md" --json "$OUT/bench.json"
step gpu-tests 150 python3 -m pytest tests -m "gpu" -q -x -p no:cacheprovider
step sweep 120 python3 -m posttrain_kernels.bench.sweep_lora --json "$OUT/sweep.json"
step cuda-tests 150 python3 -m pytest tests -m "not gpu and not aot" -q -n 8 -p no:cacheprovider
exit $status

#!/usr/bin/env bash
# One-command GPU check, for a fresh GPU machine with torch, triton (and
# optionally peft) installed and no network: installs the package without
# dependencies, runs the GPU tests (bf16 included), the headline benchmarks
# (every provider and mode), the host time per LoRA fwd+bwd (real launches and
# stubbed), a tuning run, and the CUDA run of the odd-shape suite. The markdown table lands in $OUT/bench.md. From the repository root:
#     bash bench/gpu_check.sh                 # OUT defaults to ./gpu-check
#     STEPS="gpu-tests bench" bash bench/gpu_check.sh   # a subset of the steps
set -uo pipefail
OUT=${OUT:-./gpu-check}
STEPS=${STEPS:-gpu-tests bench host tune cuda-tests}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run if selected, log to $OUT/NAME.log, keep going on failure
    local name=$1 limit=$2; shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    [ $rc -eq 0 ] || { echo "=== $name exited $rc"; status=1; }
}
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
step gpu-tests 240 python3 -m pytest tests -m gpu -q -p no:cacheprovider -rf
step bench 240 python3 -m posttrain_kernels.bench bench all --quick --md "$OUT/bench.md" --json "$OUT/bench.json"
step host 60 python3 -m posttrain_kernels.bench.host_overhead --cuda
step tune 120 python3 -m posttrain_kernels.bench tune --shape 4096,4096 --tokens 8192 --rank 16 \
    --output "$OUT/tuned.json"
step cuda-tests 200 python3 -m pytest tests -m "not gpu and not aot" -q -n 8 -p no:cacheprovider
exit $status

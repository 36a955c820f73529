#!/usr/bin/env bash
# The whole project's GPU check in one command, for a GPU machine lent for minutes: torch and
# triton (and optionally peft) installed, no network. Budget: 8 minutes cold on one H100/H200
# with 16 CPU cores (the step limits below add up to 465 s, plus the install).
#
#     bash bench/gpu_check.sh                            # OUT defaults to ./gpu-check
#     STEPS="gpu-tests bench" bash bench/gpu_check.sh    # a subset of the steps
#     LIMIT_bench=60 bash bench/gpu_check.sh             # another limit (s) for a step
#
# In priority order; each step is killed at its limit and the next one runs:
#   warm       compile, don't launch (autotune/compile_only.py): the GPU tests and the benchmarks'
#              headline shapes run in parallel processes with every launch replaced by Triton's
#              warmup, so the kernels the timed steps launch are compiled on every core first;
#              counts what each step compiles (compile-counts.txt)
#   gpu-tests  bf16 correctness of every kernel family at real shapes: LoRA (TMA and portable),
#              multi-LoRA, MoE dispatch/combine, grouped experts, CUDA-graph capture, inductor
#   bench      the headline benchmark of each family against its floor (--quick), serial
#   host       host time per LoRA fwd+bwd, launches real and stubbed
#   cuda-tests the interpreter suite's odd shapes on CUDA (not warmed: what fits in its limit)
#   tune       (not in the default steps) a tuning run
#
# Every result is on disk under $OUT the moment it exists, so a step killed at its limit keeps
# what it finished: gpu-tests.txt / cuda-tests.txt get a line per test as it ends, bench.rows.jsonl
# a row per benchmark case as it is measured (bench.md / bench.json after each family), and each
# step's output goes to <step>.log unbuffered.
set -uo pipefail
OUT=${OUT:-./gpu-check}
STEPS=${STEPS:-warm gpu-tests bench host cuda-tests}
JOBS=${JOBS:-$(n=$(nproc); echo $(( n < 12 ? n : 12 )))}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
limit() {  # limit NAME DEFAULT: $LIMIT_<name> (dashes as underscores) or the default
    local var="LIMIT_${1//-/_}"
    echo "${!var:-$2}"
}
step() {  # step NAME DEFAULT_LIMIT_S COMMAND...: run if selected, log to $OUT/NAME.log, keep going on failure
    local name=$1 lim; lim=$(limit "$1" "$2"); shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${lim}s, $(date -u +%H:%M:%S))" | tee -a "$OUT/steps.txt"
    timeout -k 5 "$lim" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name exited $rc ($(date -u +%H:%M:%S))$([ $rc -eq 124 ] && echo ': killed at its limit')" \
        | tee -a "$OUT/steps.txt"
    [ $rc -eq 0 ] || status=1
}
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
    > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available())" >> "$OUT/gpu.txt" 2>&1
git rev-parse HEAD >> "$OUT/gpu.txt" 2>/dev/null
cat "$OUT/gpu.txt"

warm() {  # every process compiles what its own workload launches; Triton's disk cache is shared
    local c="$OUT/compile"
    rm -rf "$c"
    POSTTRAIN_KERNELS_COMPILE_ONLY="$c/gpu-tests" python3 -m pytest tests -m gpu -q -n "$JOBS" \
        -p no:cacheprovider > "$OUT/warm-gpu-tests.log" 2>&1 &
    for family in lora multi-lora moe moe-lora qlora; do
        POSTTRAIN_KERNELS_COMPILE_ONLY="$c/bench-$family" python3 -m posttrain_kernels.bench bench "$family" \
            --quick > "$OUT/warm-bench-$family.log" 2>&1 &
    done
    wait
    python3 -m posttrain_kernels.bench.compile_count "$c/gpu-tests" "$c"/bench-* | tee "$OUT/compile-counts.txt"
}
export OUT JOBS
export -f warm
step warm 75 bash -c warm
step gpu-tests 150 env POSTTRAIN_KERNELS_TEST_LOG="$OUT/gpu-tests.txt" \
    python3 -m pytest tests -m gpu -q -n 4 -p no:cacheprovider -rf
step bench 150 python3 -m posttrain_kernels.bench bench all --quick --rows "$OUT/bench.rows.jsonl" \
    --md "$OUT/bench.md" --json "$OUT/bench.json"
step host 30 python3 -m posttrain_kernels.bench.host_overhead --cuda
step cuda-tests 60 env POSTTRAIN_KERNELS_TEST_LOG="$OUT/cuda-tests.txt" \
    python3 -m pytest tests -m "not gpu and not aot" -q -n 8 -p no:cacheprovider -rf
step tune 120 python3 -m posttrain_kernels.bench tune --shape 4096,4096 --tokens 8192 --rank 16 \
    --output "$OUT/tuned.json"
exit $status

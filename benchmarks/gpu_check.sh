#!/usr/bin/env bash
# One device call: build, check, sanitize and benchmark on the GPU machine, in under 9 minutes.
#
#   bash benchmarks/gpu_check.sh                      (from the repository root; $OUT defaults to ./gpu_out)
#   ESPER_BENCH_COMMIT=<sha> GPU_CHECK_SECONDS=520 BENCH_ARGS="--full" PYTEST_SEL="tests/test_gpu_cuda.py" \
#       SKIP="san-triton" bash benchmarks/gpu_check.sh
#
# ESPER_BENCH_COMMIT: the commit to record in the CSV (the device copy may have no .git); BENCH_ARGS: the
# benchmark's selection (default --full, torch.compile rows included; e.g. "--full --providers
# reference,triton,cuda,triton_graph,cuda_graph" to leave torch.compile out); SKIP: comma-separated steps not to run
# (e.g. a second call that only benchmarks: SKIP=pytest,san-triton,san-cuda,race-cuda); CUDA_ARCHS: the build's
# CMAKE_CUDA_ARCHITECTURES (default 90-real: this machine's only, one ptxas pass instead of three).
# Steps (each under its own `timeout`, capped so the whole script ends within GPU_CHECK_SECONDS, default 520 s,
# plus at most 5 s of kill grace per step that ignores SIGTERM;
# a failing step does not stop the others; the exit code is 0 only when every step passed):
#   env        nvidia-smi, versions                                        max  30 s
#   build      pip install --no-build-isolation --no-deps -e .   (CUDA)    max 240 s   -> $OUT/build.log
#   info       python -m esper_kernels info                                max  30 s
#   pytest     python -m pytest -m gpu -q tests                            max 150 s   -> $OUT/pytest.log
#   san-triton compute-sanitizer memcheck, sanitize_case.py --backend triton  max 60 s -> $OUT/sanitize.log
#   san-cuda   compute-sanitizer memcheck, sanitize_case.py --backend cuda    max 60 s -> $OUT/sanitize.log
#   race-cuda  compute-sanitizer racecheck (shared memory: the tiles, the folds, the last block's merge),
#              sanitize_case.py --backend cuda --cases race (small cases, many blocks, a cluster)
#                                                                             max 60 s -> $OUT/sanitize.log
#   bench      bench_ppo_loss.py $BENCH_ARGS --budget (the time left)       rest       -> $OUT/bench.log, csv, png
#   summary    the benchmark table from the CSV, then this script's step table (printed last)
# Later steps keep a reserve, so an early step that hangs shrinks the benchmark, never the checks after it.
# Files back in $OUT (7): gpu_check.log (everything), build.log, pytest.log, sanitize.log, bench.log,
# bench_<gpu>.csv, bench_<gpu>.png (bench_h200.* on an H200); the CSV and PNG are also copied to benchmarks/results/.

set -o pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
TOTAL="${GPU_CHECK_SECONDS:-520}"
read -r -a BENCH_SEL <<< "${BENCH_ARGS:---full}"
export PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"
export PY
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
CUDA_ARCHS="${CUDA_ARCHS:-90-real}"
SKIP=",${SKIP:-},"

T0=$SECONDS
FAILED=0
STEPS=()
TMP="$(mktemp -d)"

record() {  # record NAME STATUS SECONDS NOTE
    STEPS+=("$(printf '%-11s %-8s %5ss  %s' "$1" "$2" "$3" "$4")")
}

# run_step NAME MAX_SECONDS RESERVE_SECONDS LOG QUIET -- COMMAND...
#   timeout = min(MAX, time left - RESERVE); QUIET=1 prints only the log's tail
run_step() {
    local name=$1 max=$2 reserve=$3 log=$4 quiet=$5
    shift 6
    if [[ $SKIP == *",$name,"* ]]; then
        record "$name" SKIP 0 "SKIP"
        return 0
    fi
    local left=$(( TOTAL - (SECONDS - T0) - reserve ))
    local t=$(( max < left ? max : left ))
    if (( t < 10 )); then
        record "$name" SKIP 0 "no time left"
        FAILED=1
        return 1
    fi
    echo
    echo "=== $name: timeout ${t}s ($(( SECONDS - T0 ))s elapsed) :: $* ==="
    local s=$SECONDS rc
    if [[ $quiet == 1 ]]; then
        timeout -k 5 "$t" "$@" > "$TMP/step.log" 2>&1
        rc=$?
        tail -n 25 "$TMP/step.log"
    else
        timeout -k 5 "$t" "$@" 2>&1 | tee "$TMP/step.log"
        rc=${PIPESTATUS[0]}
    fi
    [[ -n $log ]] && { echo "=== $name (rc=$rc) :: $*"; cat "$TMP/step.log"; } >> "$log"
    local dt=$(( SECONDS - s )) status=PASS note=""
    if (( rc == 124 || rc == 137 )); then status=TIMEOUT; note="killed after ${t}s"; FAILED=1
    elif (( rc != 0 )); then status=FAIL; note="rc=$rc"; FAILED=1; fi
    [[ -n $log ]] && note="$note ${log#"$OUT"/}"
    record "$name" "$status" "$dt" "$note"
    return $rc
}

env_info() {
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit --format=csv
    uname -a
    nvcc --version | tail -n 2
    command -v compute-sanitizer && compute-sanitizer --version | tail -n 1
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); import triton; print('triton', triton.__version__)"
    echo "commit: ${ESPER_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
}

pytest_gpu() {  # pytest's "no tests collected" (rc 5) is not a failure: the gpu tier may be empty
    # PYTEST_SEL narrows the gpu tier when device time is short (default: every gpu test)
    read -r -a sel <<< "${PYTEST_SEL:-tests}"
    "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfE "${sel[@]}"
    local rc=$?
    (( rc == 5 )) && { echo "pytest: no gpu tests collected"; return 0; }
    return $rc
}

backend_on_gpu() {  # exit 0 when backend $1 is available for CUDA tensors; prints the backend's status
    "$PY" -c "import sys, esper_kernels as ek; b = ek.available_backends()['$1']; print(b); sys.exit(0 if b.available and 'cuda' in b.devices else 3)"
}

sanitize() {  # sanitize BACKEND RESERVE [TOOL NAME CASES]
    local tool=${3:-memcheck} name=${4:-san-$1} cases=${5:-all}
    if [[ $SKIP == *",$name,"* ]]; then
        record "$name" SKIP 0 "SKIP"
        return 0
    fi
    if ! backend_on_gpu "$1" > "$TMP/avail.txt" 2>&1; then
        record "$name" SKIP 0 "$(tail -n 1 "$TMP/avail.txt" | cut -c1-150)"
        echo "=== $name: skipped: $(tail -n 1 "$TMP/avail.txt")" | tee -a "$OUT/sanitize.log"
        return 0
    fi
    run_step "$name" 60 "$2" "$OUT/sanitize.log" 0 -- env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool "$tool" --error-exitcode 97 --print-limit 25 \
        "$PY" benchmarks/sanitize_case.py --backend "$1" --cases "$cases"
    local summary
    summary="$(grep -h "ERROR SUMMARY" "$TMP/step.log" | tail -n 1)"
    summary="${summary#========= }"
    STEPS[-1]="${STEPS[-1]} | ${summary:-no ERROR SUMMARY line} | $(grep -h "cases ran" "$TMP/step.log" | tail -n 1)"
}

export -f env_info pytest_gpu

main() {
# reserves: what the later steps need at least (info 10, pytest 40, three sanitizers 40 each, bench 60, summary 20)
run_step env 30 $(( 10 + 40 + 120 + 60 + 20 )) "" 0 -- bash -c env_info
run_step build 240 $(( 10 + 40 + 120 + 60 + 20 )) "$OUT/build.log" 1 -- \
    "$PY" -m pip install --no-build-isolation --no-deps -v \
    --config-settings="cmake.define.CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS" -e .
run_step info 30 $(( 40 + 120 + 60 + 20 )) "" 0 -- "$PY" -m esper_kernels info
run_step pytest 150 $(( 120 + 60 + 20 )) "$OUT/pytest.log" 0 -- bash -c pytest_gpu
sanitize triton $(( 80 + 60 + 20 ))
sanitize cuda $(( 40 + 60 + 20 ))
sanitize cuda $(( 60 + 20 )) racecheck race-cuda race

# the benchmark gets what is left, less the summary's reserve; its own --budget stops starting work 45 s before
left=$(( TOTAL - (SECONDS - T0) - 20 ))
budget=$(( left - 45 ))
(( budget < 20 )) && budget=20
run_step bench "$left" 20 "$OUT/bench.log" 0 -- \
    "$PY" benchmarks/bench_ppo_loss.py "${BENCH_SEL[@]}" --out "$OUT" --budget "$budget"

rm -f "$OUT"/*.tmp
csv="$(ls -t "$OUT"/bench_*.csv 2>/dev/null | head -n 1)"
if [[ -n $csv ]]; then
    png="${csv%.csv}.png"
    plot_flag=()
    [[ -f $png ]] && plot_flag=(--no-plot)
    mkdir -p benchmarks/results
    run_step summary 20 0 "" 0 -- "$PY" benchmarks/bench_ppo_loss.py --from-csv "$csv" "${plot_flag[@]}"
    cp -f "$csv" benchmarks/results/ 2>/dev/null
    [[ -f $png ]] && cp -f "$png" benchmarks/results/
else
    if [[ $SKIP == *",bench,"* ]]; then record summary SKIP 0 "no benchmark (SKIP)"
    else record summary FAIL 0 "no benchmark CSV in $OUT"; FAILED=1; fi
fi

echo
echo "=== gpu_check: $(( SECONDS - T0 ))s, $( ((FAILED)) && echo 'SOME STEPS FAILED' || echo 'all steps passed') ==="
printf '%-11s %-8s %6s  %s\n' step status time note
printf '%s\n' "${STEPS[@]}"
return "$FAILED"
}

main 2>&1 | tee -a "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
rm -rf "$TMP"
exit "$rc"

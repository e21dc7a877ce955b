#!/usr/bin/env bash
# The GPU check, sized for a 15-minute lease (shared/MEASURING.md). From anywhere in the repository:
#
#     bash bench/gpu_check.sh                 # the check: <= 6 minutes
#     bash bench/gpu_check.sh tune            # the second run: <= 5 minutes, python -m bench.tune
#     OUT=/some/dir bash bench/gpu_check.sh   # files into /some/dir instead of bench/results/
#
# It uses the machine's python3 as it is (torch, triton, numpy, pytest, matplotlib preinstalled):
# no virtual environment, no installs, no network.
#
# Any NVIDIA GPU: every limit below is wall-clock time, so a slower GPU skips more of the sweep
# rather than running longer. The preflight names the GPU (its capability, memory and SMs), and so
# do the log, the files and the last table. Below sm_80 (no bf16 tensor cores: T4, V100) the sweep
# runs in float16. On a card smaller than an H100 the largest sizes may not fit: in the memory
# suite naive attention at N = 16k (about 16 GiB) and SDPA's math backend beside it, in the decode
# suite 64 sequences of 128k keys (32 GiB of K and V). Their rows then say OOM and the sweep goes
# on. The gpu tests' float64 references peak at about 15 GiB (GPU_CASES in tests/cases.py). Both
# figures were measured on the CPU at a quarter of the lengths and scaled by N^2. A card with less
# than that fails those tests with OOM, and the preflight says so.
#
# Timing plan of the check (seconds from the start; TOTAL_BUDGET=330, so 30 s to spare in 6 minutes):
#     0- 15  1. preflight (hard limit PREFLIGHT_LIMIT=60 s): python3; torch, triton, numpy, pytest
#               importable; a C compiler and Python.h (Triton builds a launcher per kernel); a CUDA
#               device; one tiny Triton launch checked against torch. Anything missing: one line
#               saying what, and the script stops (exit 2). The versions, nvidia-smi, the commit.
#    15-105  2. pytest -m gpu on the test files that hold GPU tests (found by their pytest.mark.gpu
#               marks: an import error in any other test file cannot stop the step), forward tests
#               first, on the default launch configs (untimed: ATTN_AUTOTUNE is unset for it);
#               stopped with SIGINT at PYTEST_LIMIT=90 s, so the failures seen so far are still
#               printed. Meanwhile bench.precompile compiles the sweep's kernels in the background
#               (same limit), with as many workers as the GPU's memory leaves room for next to the
#               tests (PYTEST_GPU_GIB, PRECOMPILE_WORKER_GIB).
#   105-300  3. the sweep: python -m bench --time-budget (what is left of TOTAL_BUDGET, less
#               REPORT_MARGIN=30 s). Order: correctness rows; timed attention, Triton and the SDPA
#               backends; the host cost of one call; FlexAttention; serving; decode; memory; softmax;
#               modules; window; varlen; hf. A job that would not finish inside the budget (judged
#               from the jobs measured so far) is skipped. At the hard limit it gets SIGTERM and still writes its CSV, markdown, plots.
#   300-330  4. the files, the sweep's TFLOP/s table, and the steps' table last.
#
# Timing plan of `tune` (TUNE_BUDGET=240): the same preflight (0-15), then python -m bench.tune
# --time-budget 240 (15-255): every config of every tuned kernel compiled in parallel workers (at
# most half the budget), then each timed at the 12 standard shapes, head dim 128 first; the files
# and its table last (255-285).
#
# Files, all directly in ${OUT:-bench/results} (the lease returns at most 8 files), named with the
# GPU and the date:
#     check  gpu_check_<gpu>_<date>.log, bench_<gpu>_<date>.csv, bench_<gpu>_<date>.md,
#            attention_<gpu>_<date>.png, memory_<gpu>_<date>.png, softmax_<gpu>_<date>.png,
#            serving_<gpu>_<date>.png, decode_<gpu>_<date>.png   (8)
#     tune   gpu_tune_<gpu>_<date>.log, tune_<gpu>_<date>.csv, tune_<gpu>_<date>.md            (3)
# Exit code: 0 when every step passed, 2 when the preflight failed, else the first failing step's.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the interpreter on a GPU machine would time NumPy, not the GPU

MODE="${1:-check}"
OUT_DIR="${OUT:-bench/results}"
TOTAL_BUDGET="${TOTAL_BUDGET:-330}"
PREFLIGHT_LIMIT="${PREFLIGHT_LIMIT:-60}"
PYTEST_LIMIT="${PYTEST_LIMIT:-90}"
TUNE_BUDGET="${TUNE_BUDGET:-240}"
REPORT_MARGIN=30   # seconds kept for the job in flight to finish and the files to be written
SWEEP=(--n 1024 4096 16384 --memory-n 1024 2048 4096 8192 16384)
PYTEST_GPU_GIB=16        # the gpu tests' peak (about 15 GiB, see above), and a little room
PRECOMPILE_WORKER_GIB=1  # one precompile worker: a CUDA context and tiny inputs (an allowance, not measured)
GPU_NAME=""              # from the preflight
GPU_MEMORY_GIB=0
case "$MODE" in
    check|tune) ;;
    *) echo "usage: bash bench/gpu_check.sh [check|tune]" >&2; exit 2 ;;
esac

mkdir -p "$OUT_DIR"
# The GPU's name as bench/report.py spells it (nvidia-smi answers in a blink; torch takes seconds).
slug=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 |
       tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
slug=${slug:-cuda-unknown}
LOG="$OUT_DIR/gpu_${MODE}_${slug}_$(date -u +%Y-%m-%d).log"
STEPS=()   # "step|result|seconds", printed as the last table

step() {  # step NAME RESULT STARTED_AT
    STEPS+=("$1|$2|$((SECONDS - $3))")
}

print_steps() {
    echo; echo "== steps on ${GPU_NAME:-an unnamed GPU} (total ${SECONDS} s) =="
    printf '%-16s %-46s %s\n' step result seconds
    local row
    for row in "${STEPS[@]}"; do
        IFS='|' read -r name result secs <<<"$row"
        printf '%-16s %-46s %s\n' "$name" "$result" "$secs"
    done
}

preflight() {
    echo "== 1. preflight ($(date -u '+%Y-%m-%d %H:%M:%S UTC')) =="
    local started=$SECONDS output line rc
    if ! command -v python3 >/dev/null; then
        line="preflight FAILED: python3 not found"
    else
        # The versions first, then one last line: "preflight ok: ..." or "preflight FAILED: why".
        output=$(timeout -k 5 "$PREFLIGHT_LIMIT" python3 - <<'PY' 2>&1
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig


def fail(why):
    print(f"preflight FAILED: {why}")
    sys.exit(1)


missing = [m for m in ("torch", "triton", "numpy", "pytest") if importlib.util.find_spec(m) is None]
if missing:
    fail(f"python3 cannot import {', '.join(missing)}")
# Triton compiles a small C launcher per kernel: it looks for $CC, then gcc, then clang.
if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
    fail("no C compiler (gcc or clang, or $CC): Triton builds a C launcher for every kernel")
include = sysconfig.get_paths()["include"]
if not os.path.exists(os.path.join(include, "Python.h")):
    fail(f"no Python.h in {include} (the python3-dev headers): Triton's launcher includes it")
import torch
import triton

print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| triton", triton.__version__)
if not torch.cuda.is_available():
    fail("torch sees no CUDA device")
name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
props = torch.cuda.get_device_properties(0)
memory_gib = props.total_memory / 2**30
print(f"GPU {name} | sm_{major}{minor} | {memory_gib:.1f} GiB | {props.multi_processor_count} SMs")
# Read by the script: the sweep's dtype (bf16 tensor cores from sm_80 on), the memory it plans with.
print("sweep dtype:", "bfloat16" if major >= 8 else "float16")
print("memory GiB:", int(memory_gib))
try:
    import flash_attn
    print("flash_attn", flash_attn.__version__)
except ImportError:
    print("flash_attn: not installed")
from kernels import softmax

x = torch.randn(4, 100, device="cuda")
try:
    y = softmax(x)
    torch.cuda.synchronize()
except Exception as exc:  # noqa: BLE001 - the one line says what broke
    fail(f"a tiny Triton launch failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
if not torch.allclose(y, torch.softmax(x, dim=-1), atol=1e-5, rtol=1e-5):
    fail("a tiny Triton launch ran but returned a wrong softmax")
plots = "plots on" if importlib.util.find_spec("matplotlib") else "no matplotlib: no plots"
print(f"preflight ok: {name} (sm_{major}{minor}, {memory_gib:.1f} GiB), a tiny Triton launch checked; {plots}")
PY
)
        rc=$?
        line=$(printf '%s\n' "$output" | tail -n 1)
        printf '%s\n' "$output" | sed '$d'   # everything but the last line, which is printed below
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            line="preflight FAILED: did not finish in ${PREFLIGHT_LIMIT} s (the tiny launch hung?)"
        fi
        case "$line" in
            "preflight "*) ;;
            *) line="preflight FAILED: python3 exited with code $rc: ${line:-no output}" ;;
        esac
    fi
    echo "$line"
    case "$line" in
        "preflight ok"*) step preflight ok "$started" ;;
        *) step preflight FAILED "$started"; print_steps; return 2 ;;
    esac
    case "$line" in *"no matplotlib"*) PLOTS=(--no-plots) ;; *) PLOTS=() ;; esac
    GPU_NAME=$(printf '%s\n' "$output" | sed -n 's/^GPU \(.*\) | sm_[0-9]* | .*/\1/p' | head -n 1)
    GPU_MEMORY_GIB=$(printf '%s\n' "$output" | sed -n 's/^memory GiB: \([0-9][0-9]*\)$/\1/p' | head -n 1)
    GPU_MEMORY_GIB=${GPU_MEMORY_GIB:-0}
    if printf '%s\n' "$output" | grep -qx 'sweep dtype: float16'; then
        SWEEP+=(--dtype float16)
        echo "no bf16 tensor cores below sm_80: the sweep runs in float16"
    fi
    if [ "$GPU_MEMORY_GIB" -lt "$PYTEST_GPU_GIB" ]; then
        echo "note: ${GPU_MEMORY_GIB} GiB on this GPU; the gpu tests' float64 references need about 15: expect OOM failures"
    fi
    nvidia-smi || echo "nvidia-smi failed"
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no git checkout)')"
}

gpu_test_files() {  # the test files with a pytest.mark.gpu mark outside a comment, the forward's first
    local f rest=()
    for f in $(grep -lE '^[^#]*\bmark\.gpu\b' tests/test_*.py); do
        # If the backward hangs or the limit comes, the forward is proven.
        if [ "$f" = tests/test_kernel_flash_forward.py ]; then echo "$f"; else rest+=("$f"); fi
    done
    if [ "${#rest[@]}" -gt 0 ]; then printf '%s\n' "${rest[@]}"; fi
}

precompile_jobs() {  # workers that fit in the GPU's memory next to the tests, at most the CPUs less two
    local cpus jobs  # (bench.precompile's own default, from os.cpu_count(): getconf, not nproc, which reads OMP_*)
    cpus=$(( $(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 4) - 2 ))
    jobs=$(( (GPU_MEMORY_GIB - PYTEST_GPU_GIB) / PRECOMPILE_WORKER_GIB ))
    if [ "$jobs" -gt "$cpus" ]; then jobs=$cpus; fi
    if [ "$jobs" -lt 1 ]; then jobs=1; fi
    echo "$jobs"
}

gpu_tests() {
    local started=$SECONDS precompile_log precompile_pid rc note summary_line tests jobs
    mapfile -t tests < <(gpu_test_files)
    jobs=$(precompile_jobs)
    echo; echo "== 2. pytest -m gpu on ${#tests[@]} files (limit ${PYTEST_LIMIT} s), precompiling in the background (workers: $jobs) =="
    precompile_log=$(mktemp)
    timeout -k 10 "$((PYTEST_LIMIT + 20))" python3 -m bench.precompile "${SWEEP[@]}" --jobs "$jobs" \
        --deadline "$PYTEST_LIMIT" >"$precompile_log" 2>&1 &
    precompile_pid=$!
    if [ "${#tests[@]}" -eq 0 ]; then
        # pytest without files would collect every test file: the failure this list avoids.
        echo "no test file has a pytest.mark.gpu mark" | tee "$precompile_log.pytest"
        rc=5
    else
        echo "${tests[*]}"
        # SIGINT, not TERM, at the limit: pytest then still prints the failures it has seen. A GPU test
        # file that fails to import is an error, and the other files still run.
        env -u ATTN_AUTOTUNE timeout -s INT -k 15 "$PYTEST_LIMIT" \
            python3 -m pytest -m gpu -q -p no:cacheprovider --durations=5 --continue-on-collection-errors \
            "${tests[@]}" 2>&1 | tee "$precompile_log.pytest"
        rc=${PIPESTATUS[0]}
    fi
    # pytest's closing line, e.g. "12 passed, 1 failed in 80.1s" (its "=" frame and time dropped).
    summary_line=$(grep -E '^=* *[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran' \
                   "$precompile_log.pytest" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ in [0-9.]*s.*//')
    case $rc in
        0) note="passed" ;;
        1) note="FAILED" ;;
        5) note="no gpu tests found" ;;
        124|137) note="stopped at ${PYTEST_LIMIT} s" ;;
        *) note="error (exit $rc)" ;;
    esac
    echo "pytest -m gpu: exit code $rc ($note) at ${SECONDS} s"
    step "pytest -m gpu" "$note${summary_line:+: $summary_line}" "$started"
    PYTEST_RC=$rc
    wait "$precompile_pid"
    echo "precompile: exit code $? at ${SECONDS} s"
    cat "$precompile_log"
    rm -f "$precompile_log" "$precompile_log.pytest"
}

sweep() {
    local started=$SECONDS budget rc csv note
    budget=$((TOTAL_BUDGET - SECONDS - REPORT_MARGIN))
    if [ "$budget" -lt 60 ]; then budget=60; fi
    echo; echo "== 3. the sweep (time budget ${budget} s) =="
    timeout -s TERM -k 20 "$((budget + REPORT_MARGIN))" python3 -m bench --device cuda "${SWEEP[@]}" \
        --time-budget "$budget" --out "$OUT_DIR" "${PLOTS[@]}"
    rc=$?
    case $rc in
        0) note="ok" ;;
        143) note="stopped at its limit (SIGTERM), files written" ;;
        124|137) note="killed at its limit" ;;
        *) note="error (exit $rc)" ;;
    esac
    step sweep "$note" "$started"
    SWEEP_RC=$rc

    echo; echo "== 4. results =="
    ls -l "$OUT_DIR"
    csv=$(ls -t "$OUT_DIR"/bench_*.csv 2>/dev/null | head -n 1)
    if [ -n "$csv" ]; then
        python3 -m bench.report "$csv"
    else
        echo "no CSV was written"
    fi
}

tune() {
    local started=$SECONDS rc note
    echo; echo "== 2. python -m bench.tune (time budget ${TUNE_BUDGET} s) =="
    timeout -s TERM -k 20 "$((TUNE_BUDGET + REPORT_MARGIN))" python3 -m bench.tune --time-budget "$TUNE_BUDGET" \
        --out "$OUT_DIR"
    rc=$?
    case $rc in
        0) note="ok" ;;
        143) note="stopped at its limit (SIGTERM), files written" ;;
        *) note="error (exit $rc)" ;;
    esac
    step "bench.tune" "$note" "$started"
    TUNE_RC=$rc
}

main() {
    preflight || return 2
    if [ "$MODE" = tune ]; then
        tune
        print_steps
        return "$TUNE_RC"
    fi
    gpu_tests
    sweep
    print_steps
    if [ "$PYTEST_RC" -ne 0 ]; then return "$PYTEST_RC"; fi
    return "$SWEEP_RC"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"

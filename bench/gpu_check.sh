#!/usr/bin/env bash
# All GPU work of the project in one command, run from anywhere in the repository:
#
#     bash bench/gpu_check.sh                 # results into bench/results/
#     OUT=/some/dir bash bench/gpu_check.sh   # results into /some/dir
#
# It uses the machine's python3 as it is (torch, triton, numpy, pytest, matplotlib
# preinstalled): no virtual environment, no installs, no network. Target: about 6
# minutes on an H100, never more than 7 (TOTAL_BUDGET seconds, default 380).
#
#   1. nvidia-smi, python/torch/triton/GPU versions
#   2. python3 -m pytest -m gpu -q, stopped after PYTEST_LIMIT s; its failure is
#      recorded, not fatal. Meanwhile, in the background, python3 -m bench.precompile
#      compiles the sweep's Triton and FlexAttention kernels in parallel.
#   3. the standard sweep, bf16: N = 1k, 4k, 16k at B*N = 16k tokens; head dim 128
#      and 64; causal and not; 16 heads and GQA 32:8; fwd and bwd; sdpa-flash,
#      sdpa-efficient, sdpa-cudnn, flex, triton (and flash_attn if installed); the
#      memory sweep at batch 1 to N = 16k (naive's N^2 next to ours); softmax;
#      modules. Its --time-budget is whatever is left of TOTAL_BUDGET: jobs it
#      cannot start are recorded as "skipped: time budget".
#   4. into ${OUT:-bench/results}, named with the device and the date: this log,
#      bench_*.csv (written row by row), bench_*.md, attention_*.png, memory_*.png,
#      softmax_*.png (6 files). The short table comes last.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

OUT_DIR="${OUT:-bench/results}"
TOTAL_BUDGET="${TOTAL_BUDGET:-380}"
PYTEST_LIMIT="${PYTEST_LIMIT:-140}"
PRECOMPILE_LIMIT="${PRECOMPILE_LIMIT:-140}"
REPORT_MARGIN=40   # seconds kept for the last job to finish and the files to be written
SWEEP=(--n 1024 4096 16384 --memory-n 1024 2048 4096 8192 16384)

mkdir -p "$OUT_DIR"
slug=$(python3 -c 'import torch; from bench.report import slug; print(slug(torch.cuda.get_device_name()))' \
       2>/dev/null || echo cuda-unknown)
LOG="$OUT_DIR/gpu_check_${slug}_$(date -u +%Y-%m-%d).log"

main() {
    echo "== 1. machine and versions ($(date -u '+%Y-%m-%d %H:%M:%S UTC')) =="
    nvidia-smi || echo "nvidia-smi failed"
    python3 - <<'PY' || echo "version check failed"
import platform
import torch
import triton
print("python", platform.python_version())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("triton", triton.__version__)
if torch.cuda.is_available():
    print("GPU", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
else:
    print("GPU: none visible to torch")
try:
    import flash_attn
    print("flash_attn", flash_attn.__version__)
except ImportError:
    print("flash_attn: not installed")
PY
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no git checkout)')"

    echo; echo "== 2. pytest -m gpu (limit ${PYTEST_LIMIT} s), precompiling in the background =="
    local precompile_log precompile_pid pytest_rc precompile_rc bench_rc
    precompile_log=$(mktemp)
    timeout "$((PRECOMPILE_LIMIT + 30))" python3 -m bench.precompile "${SWEEP[@]}" --deadline "$PRECOMPILE_LIMIT" \
        >"$precompile_log" 2>&1 &
    precompile_pid=$!
    trap 'kill "$precompile_pid" 2>/dev/null' EXIT
    # SIGINT, not TERM, at the limit: pytest then still prints the failures it has seen.
    timeout -s INT -k 15 "$PYTEST_LIMIT" python3 -m pytest -m gpu -q -p no:cacheprovider
    pytest_rc=$?
    case $pytest_rc in
        0) pytest_note="passed" ;;
        1) pytest_note="some tests FAILED" ;;
        5) pytest_note="no gpu tests collected" ;;
        124|137) pytest_note="stopped at the ${PYTEST_LIMIT} s limit" ;;
        *) pytest_note="error" ;;
    esac
    echo "pytest -m gpu: exit code $pytest_rc ($pytest_note) at ${SECONDS} s"
    wait "$precompile_pid"
    precompile_rc=$?
    trap - EXIT
    cat "$precompile_log"
    rm -f "$precompile_log"
    echo "precompile: exit code $precompile_rc at ${SECONDS} s"

    local budget=$((TOTAL_BUDGET - SECONDS - REPORT_MARGIN))
    if [ "$budget" -lt 60 ]; then budget=60; fi
    echo; echo "== 3. the sweep (time budget ${budget} s) =="
    timeout "$((budget + REPORT_MARGIN))" python3 -m bench --device cuda "${SWEEP[@]}" \
        --time-budget "$budget" --out "$OUT_DIR"
    bench_rc=$?

    echo; echo "== 4. results =="
    ls -l "$OUT_DIR"
    echo "pytest -m gpu: exit code $pytest_rc ($pytest_note); precompile: $precompile_rc;" \
         "bench: $bench_rc (124: stopped at its limit); total ${SECONDS} s"
    local csv
    csv=$(ls -t "$OUT_DIR"/bench_"${slug}"_*.csv 2>/dev/null | head -n 1)
    if [ -n "$csv" ]; then
        python3 -m bench.report "$csv"
    else
        echo "no CSV was written"
    fi
    return "$bench_rc"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"

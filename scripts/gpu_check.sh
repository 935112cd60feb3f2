#!/usr/bin/env bash
# The GPU check of issue 15, one script for the device machine (an H200, no network), run from the repo root:
#
#   bash scripts/gpu_check.sh                 # GPU: writes into $OUT (the device tool's folder), else /tmp/gpu_check
#   bash scripts/gpu_check.sh --cpu           # the same steps on the CPU, small (TRITON_INTERPRET=1), to a temp dir
#   bash scripts/gpu_check.sh --cpu --dry-run # print the steps and their time limits, run nothing
#
# Device call (after `bash scripts/gpu_wheels.sh` here):  run(command="bash scripts/gpu_check.sh",
#   carry=[".whl"], timeout_s=420). Steps, each under its own `timeout` and inside one overall budget
#   (GPU_CHECK_BUDGET seconds, default 360): environment (nvidia-smi, versions); device-to-device copy bandwidth;
#   offline install (the carried wheels, then the project, into /tmp); `pytest -m gpu tests/` (CPU mode: collected
#   only); tests/test_kernels.py; benchmarks/gpu_check.py (joint training Triton vs torch, the server on the device);
#   benchmarks/mixed_batch.py with 1 / 8 / 64 tasks, then 64 tasks of mixed ranks 4..64. A failing step is recorded
#   and the next one runs; the summary at the end lists every step, and the exit status is 1 if any failed.
#
# Files written (at most 8: the device tool returns 8): gpu_check.log (everything printed), summary.json,
# bandwidth.json, pytest_gpu.xml, pytest_kernels.xml, gpu_check.json, mixed_batch.json, mixed_batch_ranks.json.
# Caches (Triton, pip) stay under /tmp.
set -uo pipefail

MODE=gpu
DRY=0
OUT_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --dry-run) DRY=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (use --cpu, --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
[ "${GPU_CHECK_CPU:-0}" = 1 ] && MODE=cpu

cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
WORK="$(mktemp -d /tmp/mtp-gpu-check.XXXXXX)"
if [ "$MODE" = cpu ]; then
    OUT_DIR="${OUT_DIR:-$(mktemp -d /tmp/mtp-gpu-check-cpu-out.XXXXXX)}"
    DEVICE=cpu
    QUICK=(--quick)
    export TRITON_INTERPRET=1
    BUDGET="${GPU_CHECK_BUDGET:-900}"
    SCALE=2 # step limits x2: the interpreter, two cores
else
    OUT_DIR="${OUT_DIR:-${OUT:-/tmp/gpu_check}}"
    DEVICE=cuda
    QUICK=()
    unset TRITON_INTERPRET
    BUDGET="${GPU_CHECK_BUDGET:-360}"
    SCALE=1
fi
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
export PYTHONSAFEPATH=1 # `python -m` / `-c` must not import the source tree of the cwd (kernels/ maps by package-dir)
export PYTHONDONTWRITEBYTECODE=1
export TRITON_CACHE_DIR="$WORK/triton-cache"
export PIP_CACHE_DIR="$WORK/pip-cache"
LOG="$OUT_DIR/gpu_check.log"
if [ "$DRY" = 0 ]; then
    exec > >(tee -a "$LOG") 2>&1
fi

START=$(date +%s)
NAMES=()
RESULTS=()
FAILED=0

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout` (its limit, cut to the budget left), records the result
step() {
    local name="$1" limit=$(($2 * SCALE))
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    [ "$limit" -gt "$left" ] && limit="$left"
    if [ "$DRY" = 1 ]; then
        printf '%-14s %4ss  %s\n' "$name" "$limit" "$*"
        return 0
    fi
    echo
    echo "=== [$name] limit ${limit}s: $*"
    if [ "$limit" -lt 10 ]; then
        echo "=== [$name] SKIPPED: the budget of ${BUDGET}s is spent"
        NAMES+=("$name")
        RESULTS+=("skipped 0")
        FAILED=1
        return 0
    fi
    local t0=$(date +%s) rc
    if declare -F "$1" >/dev/null; then # a function of this script: `timeout` runs programs, so through bash
        timeout --kill-after=15 "$limit" bash -c '"$@"' _ "$@"
    else
        timeout --kill-after=15 "$limit" "$@"
    fi
    rc=$?
    local took=$(($(date +%s) - t0)) status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status=timeout
    elif [ "$rc" != 0 ]; then
        status="failed(rc=$rc)"
    fi
    echo "=== [$name] $status in ${took}s"
    [ "$status" = ok ] || FAILED=1
    NAMES+=("$name")
    RESULTS+=("$status $took")
}

# pytest's rc 5 is "no tests collected" (no gpu-marked test there yet): recorded, not a failure
pytest_step() {
    "$PY" -m pytest -p no:cacheprovider "$@"
    local rc=$?
    if [ "$rc" = 5 ]; then
        echo "(pytest: no tests collected)"
        return 0
    fi
    return "$rc"
}

env_info() {
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi || echo "nvidia-smi failed"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
    fi
    uname -a
    nproc
    "$PY" - <<'EOF'
import importlib.metadata as md
import platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("triton", "timm", "peft", "torchvision", "fastapi", "starlette", "uvicorn", "pydantic", "pycocotools",
             "httpx", "numpy", "onnxruntime"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
EOF
}

bandwidth() {
    "$PY" - "$DEVICE" "$OUT_DIR/bandwidth.json" <<'EOF'
import json, sys, time
import torch
device, path = sys.argv[1], sys.argv[2]
n = (2 << 30) if device == "cuda" else (64 << 20)  # bytes per buffer
src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
dst = torch.empty_like(src)
times = []
for i in range(13):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(); start.record(); dst.copy_(src); end.record(); end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t = time.perf_counter(); dst.copy_(src); seconds = time.perf_counter() - t
    if i >= 3:
        times.append(seconds)
times.sort()
best, median = times[0], times[len(times) // 2]
result = {"device": device, "bytes_per_copy": n, "copies": len(times), "median_s": median, "best_s": best,
          "read_plus_write_gb_per_s_median": 2 * n / median / 1e9, "read_plus_write_gb_per_s_best": 2 * n / best / 1e9}
if device == "cuda":
    result["gpu"] = torch.cuda.get_device_name()
print(json.dumps(result, indent=2))
json.dump(result, open(path, "w"), indent=2)
EOF
}

install() {
    local site="$WORK/site"
    if ls .whl/*.whl >/dev/null 2>&1 && [ "$DEVICE" = cuda ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl ||
            return 1
        echo "wheels installed into $site: $(ls .whl | tr '\n' ' ')"
    else
        echo "no wheels installed (CPU mode, or no .whl/ carried): using what $PY has"
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$site/mtp" . ||
        return 1
    echo "multitask-peft installed into $site/mtp"
}

after_install() {
    # the installed copy first, then the carried wheels, then the interpreter's own packages
    export PYTHONPATH="$WORK/site/mtp:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    if [ "$DRY" = 0 ]; then
        "$PY" -c "import multitask_peft, fastapi, uvicorn, pycocotools; print('imports ok:', multitask_peft.__file__)" ||
            echo "WARNING: an import failed after the install (see above)"
    fi
}

export -f pytest_step env_info bandwidth install
export PY DEVICE OUT_DIR WORK

echo "gpu_check.sh: mode $MODE, device $DEVICE, out $OUT_DIR, budget ${BUDGET}s, $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"

if [ "$DEVICE" = cuda ]; then
    MB_ALL=(--device cuda --tasks 1 8 64)
    MB_RANKS=(--device cuda --tasks 64 --ranks 4 8 16 32 64)
else
    MB_ALL=(--device cpu --quick --repeats 1 --warmup 0)
    MB_RANKS=(--device cpu --quick --tasks 5 --ranks 4 8 16 32 64 --repeats 1 --warmup 0)
fi
GPU_TESTS=(-m gpu tests/ -x -q -rfE --junitxml "$OUT_DIR/pytest_gpu.xml")
KERNEL_TESTS=(tests/test_kernels.py -q -rfE --junitxml "$OUT_DIR/pytest_kernels.xml")
if [ "$DEVICE" = cpu ]; then
    GPU_TESTS+=(--collect-only) # they need CUDA: on the CPU they must only import and collect
    KERNEL_TESTS+=(-x)
fi

step environment 30 env_info
step bandwidth 30 bandwidth
step install 90 install
after_install
step pytest_gpu 90 pytest_step "${GPU_TESTS[@]}"
step test_kernels 90 pytest_step "${KERNEL_TESTS[@]}"
step gpu_check 120 "$PY" benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT_DIR" "${QUICK[@]}"
step mixed_batch 150 "$PY" benchmarks/mixed_batch.py "${MB_ALL[@]}" --json "$OUT_DIR/mixed_batch.json"
step mixed_ranks 90 "$PY" benchmarks/mixed_batch.py "${MB_RANKS[@]}" --json "$OUT_DIR/mixed_batch_ranks.json"

if [ "$DRY" = 1 ]; then
    rm -rf "$WORK"
    rmdir "$OUT_DIR" 2>/dev/null
    exit 0
fi
TOTAL=$(($(date +%s) - START))
echo
echo "=== summary ($MODE, ${TOTAL}s of a ${BUDGET}s budget) ==="
{
    echo "{\"mode\": \"$MODE\", \"device\": \"$DEVICE\", \"total_s\": $TOTAL, \"budget_s\": $BUDGET, \"steps\": ["
    for i in "${!NAMES[@]}"; do
        read -r status took <<<"${RESULTS[$i]}"
        printf '%-14s %-16s %4ss\n' "${NAMES[$i]}" "$status" "$took" >&2
        [ "$i" -gt 0 ] && echo ","
        echo "{\"step\": \"${NAMES[$i]}\", \"status\": \"$status\", \"seconds\": $took}"
    done
    echo "], \"ok\": $([ "$FAILED" = 0 ] && echo true || echo false)}"
} >"$OUT_DIR/summary.json"
echo "files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
rm -rf "$WORK"
if [ "$FAILED" = 0 ]; then
    echo "gpu_check.sh: every step passed"
else
    echo "gpu_check.sh: FAILED (see the steps above)"
fi
exit "$FAILED"

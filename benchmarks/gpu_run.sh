#!/usr/bin/env bash
# The GPU benchmark as one command for a lent GPU machine (run from anywhere):
#
#     bash benchmarks/gpu_run.sh [extra gpu.py arguments, e.g. --quick]
#
# Writes $OUT/gpu.json (rewritten as each row starts and ends, so a run cut short keeps its
# finished rows), $OUT/gpu.log (the printed table) and $OUT/nvidia-smi.txt. Installs nothing
# and reaches no network; everything else it creates (compiler caches, temporary files) stays
# in runs/gpu_bench_cache/ inside the repository (runs/ is git-ignored). Without $OUT it writes
# into runs/gpu_bench/.
#
# GPU_BENCH_BUDGET_S (default 200): no benchmark row starts after this many seconds.
# GPU_BENCH_HARD_S (default 280): the whole script is killed after this many (rows done stay).
# If the first pass dies (a crash, a broken CUDA context) and time is left, a second pass
# resumes with the rows not yet done.
set -u
START=$(date +%s)
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT="${OUT:-$REPO/runs/gpu_bench}"
mkdir -p "$OUT"
BUDGET="${GPU_BENCH_BUDGET_S:-200}"
HARD="${GPU_BENCH_HARD_S:-280}"

CACHE="$REPO/runs/gpu_bench_cache"
mkdir -p "$CACHE/tmp"
export TMPDIR="$CACHE/tmp" XDG_CACHE_HOME="$CACHE/xdg" TORCH_HOME="$CACHE/torch"
export TORCHINDUCTOR_CACHE_DIR="$CACHE/inductor" TRITON_CACHE_DIR="$CACHE/triton" TRITON_HOME="$CACHE"
export CUDA_CACHE_PATH="$CACHE/nv" MPLCONFIGDIR="$CACHE/mpl" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

PY=""
TRIED=""
for cand in "$REPO/.venv/bin/python" python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then
        TRIED="$TRIED $cand"
        if "$cand" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
            PY=$cand
            break
        fi
    fi
done
if [ -z "$PY" ]; then
    MSG="gpu_run.sh: no Python here imports torch with a usable CUDA GPU (tried:${TRIED:- none}); nothing benchmarked"
    echo "$MSG" | tee "$OUT/gpu.log"
    for cand in $TRIED; do
        SAYS=$("$cand" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1 | tail -1)
        echo "  $cand: $SAYS" | tee -a "$OUT/gpu.log"
    done
    printf '{"meta": {"error": "%s"}, "rows": []}\n' "$MSG" >"$OUT/gpu.json"
    exit 2
fi
echo "gpu_run.sh: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"
command -v nvidia-smi >/dev/null 2>&1 && timeout 20 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1

timeout -k 5 "$HARD" "$PY" benchmarks/gpu.py --device cuda --budget-s "$BUDGET" --json "$OUT/gpu.json" "$@" 2>&1 \
    | tee "$OUT/gpu.log"
rc=${PIPESTATUS[0]}
LEFT=$((HARD - ($(date +%s) - START)))
case "$rc" in 0 | 2 | 124 | 137) LEFT=0 ;; esac  # done, no GPU, or out of time: no second pass
if [ "$LEFT" -gt 40 ]; then
    echo "gpu_run.sh: the first pass ended with code $rc; resuming the other rows (${LEFT} s left)" | tee -a "$OUT/gpu.log"
    RB=$((LEFT - 30))
    timeout -k 5 "$LEFT" "$PY" benchmarks/gpu.py --device cuda --budget-s "$RB" --json "$OUT/gpu.json" --resume "$@" 2>&1 \
        | tee -a "$OUT/gpu.log"
    rc=${PIPESTATUS[0]}
fi
rm -f "$OUT/gpu.json.tmp"
echo "gpu_run.sh: exit $rc after $(($(date +%s) - START)) s; results in $OUT/gpu.json"
exit "$rc"

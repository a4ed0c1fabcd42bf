#!/usr/bin/env bash
# One-shot GPU check: the numbers BENCHMARKS.md asks of an H100/H200, in one command (at most
# 9.5 minutes there with the default section limits: 330, 150 and 90 s). Each run appends a JSON
# line (device, date, commit, versions, every row) to $OUT/results.jsonl (benchmarks/gpu/
# without $OUT) and its Markdown table to a .txt beside it; a section that fails or is cut
# keeps the lines of the sections before it, and the others still run.
#
#   bash benchmarks/gpu_check.sh                    # on the GPU machine
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # rehearsal on a CPU: tiny models, few steps
#
# What it measures, in this order:
#   1. a PIE-Bench-shaped `nti bench` run: sd15-random, 32 generated PIE-format samples at 512 px,
#      the four methods (pivot shared), edits with the benchmark's settings, scoring with
#      random-weight DINO ViT-B/8 and CLIP ViT-L/14 (images/hour per method, and the minutes the
#      700-image benchmark would take; target: Null-text + P2P in <= 30 min);
#   2. sd15-random at 512 px: the reference loop on one image, then B = 8 at full N in fp32,
#      bf16-mixed, bf16-mixed + reuse + torch.compile (continuous batching, the default) and
#      bf16-mixed in lockstep scheduling (s/image, speed-up, peak memory per image, fidelity to fp32);
#   3. sdxl-random at 1024 px, B = 1, full N, bf16-mixed with and without gradient checkpointing
#      (s/image, peak memory).
# A machine without diffusers or jsonargparse gets them from gpu_wheels/ (pip download --no-deps
# -d gpu_wheels diffusers jsonargparse docstring-parser typeshed-client, carried along).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/gpu}"
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/results.jsonl"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# find_spec looks for the packages without importing them (seconds saved per run)
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('diffusers', 'jsonargparse')))" 2>/dev/null; then
    if compgen -G "gpu_wheels/*.whl" >/dev/null; then
        "$PYTHON" -m pip install --quiet --no-deps gpu_wheels/*.whl
    else
        echo "gpu_check: diffusers or jsonargparse is missing and there is no gpu_wheels/ folder" >&2
        exit 2
    fi
fi

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
    SD=(--model tiny --device cpu --threads 1 --steps 2 --inner-steps 2 --warmup-steps 1)
    SD_CONFIGS=(fp32 bf16 fp32+lockstep)
    XL=(--model tiny-xl --device cpu --threads 1 --steps 2 --inner-steps 2 --warmup-steps 1)
    PIE=(--tiny)
else
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
    SD=(--model sd15-random --device cuda)
    SD_CONFIGS=(fp32 bf16 bf16+reuse+compile bf16+lockstep)
    XL=(--model sdxl-random --device cuda)
    PIE=(--model sd15-random --samples 32 --resolution 512 --device cuda --precision bf16-mixed --batch-size 8)
fi

# Each section runs under its own time limit and a failing or cut section does not stop the
# others: one device session gets one try, and what finished must come back. The open PIE-Bench
# target goes first. Limits in seconds: GPU_CHECK_PIE_S, GPU_CHECK_SD15_S, GPU_CHECK_SDXL_S.
FAILED=()
section() {  # section NAME LIMIT_S TABLE_FILE COMMAND...
    local name=$1 limit=$2 table=$3
    shift 3
    echo "== $name (at most $limit s)"
    if timeout --kill-after=30 "$limit" "$@" | tee "$table"; then
        echo "== $name: done"
    else
        echo "== $name: failed or cut at $limit s (status ${PIPESTATUS[0]}); going on"
        FAILED+=("$name")
    fi
}

section "PIE-Bench-shaped nti bench: invert + edit + score per method" "${GPU_CHECK_PIE_S:-330}" "$OUT_DIR/pie.txt" \
    "$PYTHON" benchmarks/pie_throughput.py "${PIE[@]}" --output "$RESULTS"

section "sd15-random: baseline on one image, B = 8 at full N" "${GPU_CHECK_SD15_S:-150}" "$OUT_DIR/sd15.txt" \
    "$PYTHON" benchmarks/benchmark_inversion.py "${SD[@]}" --batch-size 8 --baseline-images 1 --modes full \
    --configs "${SD_CONFIGS[@]}" --output "$RESULTS"

section "sdxl-random at its resolution: B = 1 at full N" "${GPU_CHECK_SDXL_S:-90}" "$OUT_DIR/sdxl.txt" \
    "$PYTHON" benchmarks/benchmark_inversion.py "${XL[@]}" --batch-size 1 --baseline-images 0 --modes full \
    --configs bf16+checkpointing bf16 --no-fidelity --output "$RESULTS"

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check: ${#FAILED[@]} section(s) failed or were cut: ${FAILED[*]}; results so far in $RESULTS" >&2
    exit 1
fi
echo "gpu_check: done; results in $RESULTS"

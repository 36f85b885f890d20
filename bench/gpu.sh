#!/usr/bin/env bash
# The one script to run first on a GPU machine: every benchmark of the project in one run, in at most
# $BUDGET seconds (default 470, under 8 minutes), installing nothing:
#     bash bench/gpu.sh                              # prints markdown for BENCHMARKS.md (GPU name and date)
#     OUT=/some/dir bash bench/gpu.sh                # also appends it all to $OUT/gpu-bench.md
#     TAESD=taesd_decoder.safetensors bash bench/gpu.sh   # the tiny-decoder rows with real weights
#     PYTHON=python3.11 BUDGET=300 bash bench/gpu.sh
# What is missing (CUDA, torch, triton, pytest, diffusers) is said up front, and a step
# that needs it is skipped with that reason instead of failing halfway. A machine without diffusers
# (the H200 image of 2026-12-04) can take it as wheels, without an index:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 -d wheels diffusers importlib_metadata
#     (on the GPU machine) pip install --no-index --no-deps --target /tmp/site wheels/*.whl
#     PYTHONPATH=/tmp/site bash bench/gpu.sh
# Steps run most important first (bench/gpu_checks.py: what only a GPU shows about kernel timing, graph
# streams and memory, failed captures and torchrun; that the graphs replay the eager results; the
# issue-18 goals: UNet, live stream, video sampling, training; then the kernels alone and the compiled
# kernel tests); each has its own time limit, cut to what is left of the budget, and a step with under
# 15 s left is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-470}
unset TRITON_INTERPRET  # the point is the compiled kernels

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

run_all() {
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        echo "bench/gpu.sh: $PY has no torch with a usable CUDA device; this script is for a GPU machine" >&2
        return 1
    fi
    has triton || { echo "bench/gpu.sh: $PY cannot import triton" >&2; return 1; }

    echo "### GPU run of bench/gpu.sh, $(date -u +%F) (commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo
    "$PY" - <<'EOF'
import platform, torch, triton
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}; torch {torch.__version__}, "
      f"triton {triton.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}")
EOF
    for module in diffusers pytest; do
        has "$module" || echo "MISSING: $module is not importable by $PY: the steps and rows that need it are skipped"
    done
    local decoder=()
    if [ -z "${TAESD:-}" ]; then
        # The tiny decoder's speed does not depend on its weights: without a real file, random ones in
        # TAESD's (diffusers') layout, read by the same loader, give the rows all the same.
        TAESD=$(mktemp -d)/taesd-random.safetensors
        "$PY" -c "import sys; from safetensors.torch import save_file; from model.taesd import TinyDecoder
save_file({'decoder.' + k: v.contiguous() for k, v in TinyDecoder().state_dict().items()}, sys.argv[1])" \
            "$TAESD" && echo "TINY DECODER: random weights in TAESD's layout (TAESD=FILE for the real ones)"
    fi
    if [ -f "$TAESD" ]; then decoder=(--decoder "$TAESD"); else echo "SKIPPED the tiny-decoder rows: no file $TAESD"; fi
    local table=()
    [ -n "${OUT:-}" ] && table=(--write-table "$OUT/kernels-table.json")

    local start=$SECONDS failed=0
    # step SECONDS NEEDS TITLE COMMAND...: run with a time limit (cut to the budget left), or say why it is skipped.
    step() {
        local limit=$1 needs=$2 title=$3; shift 3
        local left=$((BUDGET - (SECONDS - start)))
        [ "$limit" -gt "$left" ] && limit=$left
        echo
        echo "#### $title"
        echo
        for module in $needs; do
            if ! has "$module"; then echo "SKIPPED: $module is not importable by $PY"; return; fi
        done
        if [ "$limit" -lt 15 ]; then echo "SKIPPED: ${left} s of the ${BUDGET} s budget left"; return; fi
        local t0=$SECONDS
        echo '```'
        timeout "$limit" "$@" 2>&1 | grep -v '^\s*$' | tail -n 60
        local rc=${PIPESTATUS[0]}
        echo '```'
        echo "(exit $rc, $((SECONDS - t0)) s of a $limit s limit)"
        if [ "$rc" -ne 0 ]; then
            echo "FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", over ${limit} s"))"
            failed=1
        fi
    }

    step 150 "" "GPU checks: kernel timing, graph streams and memory, failed capture, torchrun (bench/gpu_checks.py)" \
        "$PY" bench/gpu_checks.py
    step 45 "pytest" "CUDA graphs replay the eager results (tests/test_graphs.py, GPU tests)" \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_graphs.py -k "real_graph or on_the_gpu"
    step 150 "" "UNet: ours per kernel mode and diffusers, eager / graphed / compiled (bench/unet.py)" \
        "$PY" bench/unet.py --device cuda --repeats 20
    step 90 "" "Live stream and offline, CUDA graphs on/off (bench/stream.py)" \
        "$PY" bench/stream.py --device cuda "${decoder[@]}"
    step 90 "diffusers" "Video sampling vs diffusers, fp16, CUDA graphs on (bench/sample.py)" \
        "$PY" bench/sample.py --device cuda --dtype fp16 --repeats 2
    step 60 "diffusers" "Training step vs diffusers, bf16 autocast, eager (bench/train.py)" \
        "$PY" bench/train.py --device cuda --channels 320 --size 64 --batch 4
    step 90 "" "Live loop: tracking in front of the stream, serial and pipelined (bench/live.py)" \
        "$PY" bench/live.py --device cuda --seconds 10 --sources 1080 "${decoder[@]}"
    # fp16 only: the autotuner's first run compiles every attention candidate (bf16 would double it).
    # With $OUT, the measured table comes back as kernels-table.json, to commit as kernels/sm<arch>.json.
    step 150 "" "Kernels vs PyTorch (bench/kernels.py)" "$PY" bench/kernels.py --dtypes float16 "${table[@]}"
    step 90 "pytest" "Kernel tests, compiled" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py
    echo
    echo "total $((SECONDS - start)) s of a ${BUDGET} s budget"
    return $failed
}

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    run_all 2>&1 | tee -a "$OUT/gpu-bench.md"
    exit "${PIPESTATUS[0]}"
fi
run_all

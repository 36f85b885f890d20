#!/usr/bin/env bash
# The one script to run first on a GPU machine (about 8 minutes at most; installs nothing):
#     bash bench/gpu.sh                 # prints one markdown block for BENCHMARKS.md
#     PYTHON=python3.11 bash bench/gpu.sh
# It runs the Triton kernel tests compiled (no interpreter), then the benchmarks on CUDA. GPU machines
# may have no package index: what is missing (CUDA, torch, triton, pytest, diffusers) is said up front,
# and a step that needs it is skipped with that reason instead of failing halfway.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
unset TRITON_INTERPRET  # the point is the compiled kernels

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "bench/gpu.sh: $PY has no torch with a usable CUDA device; this script is for a GPU machine" >&2
    exit 1
fi
has triton || { echo "bench/gpu.sh: $PY cannot import triton" >&2; exit 1; }

echo "### GPU run of bench/gpu.sh ($(date -u +%F))"
echo
"$PY" - <<'EOF'
import platform, torch, triton
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}; torch {torch.__version__}, "
      f"triton {triton.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}")
EOF

failed=0
# step SECONDS NEEDS TITLE COMMAND...: run with a time limit, or say why it is skipped.
step() {
    local limit=$1 needs=$2 title=$3; shift 3
    echo
    echo "#### $title"
    echo
    for module in $needs; do
        if ! has "$module"; then echo "SKIPPED: $module is not importable by $PY"; return; fi
    done
    echo '```'
    timeout "$limit" "$@" 2>&1 | grep -v '^\s*$' | tail -n 60
    local rc=${PIPESTATUS[0]}
    echo '```'
    if [ "$rc" -ne 0 ]; then
        echo "FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", over ${limit} s"))"
        failed=1
    fi
}

step 120 "pytest" "Kernel tests, compiled" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py
step 75 "" "Kernels vs PyTorch (bench/kernels.py)" "$PY" bench/kernels.py
step 45 "diffusers" "UNet vs diffusers, fp16 (bench/unet.py)" "$PY" bench/unet.py --device cuda
step 100 "diffusers" "Video sampling vs diffusers, fp16 (bench/sample.py)" \
    "$PY" bench/sample.py --device cuda --dtype fp16 --repeats 3
step 100 "" "Streaming (bench/stream.py)" "$PY" bench/stream.py --device cuda
exit $failed

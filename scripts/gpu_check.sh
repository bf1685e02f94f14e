#!/usr/bin/env bash
# Everything that needs a GPU, in one go, for a session that is lent one (about 8 minutes on
# one H100/H200): the GPU-only tests (CUDA, triton), then `python recipes/bench.py gpu`.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      # logs: OUT_DIR (default $OUT, else ./gpu_check_out)
#
# It uses the python3 whose torch sees the GPU (GPU images ship their own torch, 2.11 on this
# project's) and this checkout's tinymeg (PYTHONPATH=.), installing nothing: pytest, hypothesis,
# tqdm, numpy and safetensors must be there. Exit status: non-zero if the tests or the bench failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

"$python" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, torch.cuda.get_device_name() if ok else 'no CUDA device'); sys.exit(0 if ok else 1)" \
    || { echo "gpu_check: no CUDA device here; this script is for a machine with a GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"

# The GPU-only tests: every test that skips without CUDA (their skip reasons say so), -rs lists
# any that still skipped. ~1-2 min.
timeout 300 "$python" -m pytest -q -p no:cacheprovider -rs tests/test_ops.py tests/test_llama_ops.py tests/test_precision.py \
    -k "triton or cuda" 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}

# GPT-2 small, T=1024, batch 16: four modes, tinymeg vs plain PyTorch. ~3-5 min (compiles).
timeout 420 "$python" recipes/bench.py gpu 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}

echo "gpu_check: tests exit $tests, bench exit $bench (logs in $out)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]

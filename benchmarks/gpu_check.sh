#!/usr/bin/env bash
# On a CUDA machine, in one call of under 8 minutes:
#   1. the test suite's CUDA tests (NCCL, fp16 and bf16 paths, the compiled
#      decode step under CUDA graphs), and
#   2. the benchmark on Llama-2-7B's shape, fp16 random weights made on the GPU
#      (no checkpoint file), eager and compile=True, at batch 1 and 8, with the
#      GPU's measured read bandwidth and our fraction of it.
# Usage: bash benchmarks/gpu_check.sh [extra bench.py arguments]
# Results: $OUT (or ./gpu-results) holds bench-7b.json and the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"

# The GPU machine has torch but not fairscale/fire/...: they travel as wheels.
if compgen -G ".whl/*.whl" > /dev/null; then
    pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

status=0
echo "== CUDA tests (the CUDA-marked ones: NCCL, fp16/bf16, the compiled step)"
timeout 150 python -m pytest -q -rs tests -k cuda 2>&1 | tee "$out/tests.log" \
    || status=1

echo "== 7B benchmark (fp16)"
timeout 300 python benchmarks/bench.py --shapes 7B --device cuda --dtype float16 --compile \
    --batch-sizes 1,8 --prompt-len 32 --gen-len 64 --runs 3 --json "$out/bench-7b.json" "$@" 2>&1 \
    | grep -v '^> initializing' | tee "$out/bench.log" || status=1
exit $status

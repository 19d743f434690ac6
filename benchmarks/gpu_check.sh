#!/usr/bin/env bash
# The real CUDA path on a GPU machine, in one call of under 10 minutes:
#   1. Llama-2-7B's shape, random weights made on the GPU (no checkpoint
#      file), batch 1, every run compiled (compile=True): ours in fp16 (the
#      baseline), int8 and int4 (group 32, bf16 activations), with the GPU's
#      measured read bandwidth and each one's fraction of its own ceiling;
#   2. the test suite's CUDA tests (NCCL under torchrun, fp16 and bf16, the
#      compiled and the graphed decode steps, int8 and int4);
#   3. which int8 / int4 product is fastest on one block's matrices
#      (benchmarks/gpu_quant_kernels.py);
#   4. the text-completion example under torchrun (NCCL, fp16 by default).
# Each stage has its own time limit, so one that hangs leaves the others
# their time; every figure is printed as it is measured.
#
# Usage: bash benchmarks/gpu_check.sh
# Results: $OUT (or ./gpu-results) gets the logs and bench-7b.json.
# Missing packages travel as wheels in .whl/ (see benchmarks/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), \
'nccl', torch.cuda.nccl.version())" || exit 1

status=0
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -a --line-buffered -v '^> initializing' | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

# perf_hints: torch says here if it could not capture the step in a CUDA graph.
stage bench-7b 300 env TORCH_LOGS=perf_hints "$py" benchmarks/bench.py --shapes 7B --device cuda \
    --dtype float16 --compile --no-eager --quantize int8,int4 --no-transformers --batch-sizes 1 \
    --prompt-len 32 --gen-len 128 --runs 3 --json "$out/bench-7b.json"
stage tests 150 "$py" -m pytest -q -rs -p no:cacheprovider tests -k cuda
stage quant-kernels 90 "$py" benchmarks/gpu_quant_kernels.py
stage example 40 "$py" -m torch.distributed.run --standalone --nproc_per_node 1 example_text_completion.py \
    --max_gen_len 16
exit $status

"""Run under torchrun by tests/test_quantize.py: build each quantized mode, generate,
and let rank 0 write the greedy tokens and log-probabilities as JSON.

    torchrun --nproc_per_node N tests/quant_worker.py OUT_JSON CKPT_DIR [CKPT_DIR ...]
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llama import Llama

PROMPTS = [[1, 100, 200, 300], [1, 42]]
# (name, build options): fp32 activations, so that the sum over ranks rounds as in one process.
MODES = [
    ("int8", dict(quantize="int8", dtype=torch.float32)),
    ("int4", dict(quantize="int4", group_size=32, dtype=torch.float32)),
    # bf16 activations: torch's int4 kernel rather than the C one
    ("int4-bf16", dict(quantize="int4", group_size=32, dtype=torch.bfloat16)),
    ("bf16", dict(dtype=torch.bfloat16)),
]


def run(ckpt_dir: str, **options) -> dict:
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=str(Path(ckpt_dir) / "tokenizer.model"),
        max_seq_len=64,
        max_batch_size=2,
        **options,
    )
    tokens, logprobs = generator.generate(PROMPTS, max_gen_len=8, temperature=0, logprobs=True)
    return {"tokens": tokens, "logprobs": logprobs}


def main(out_path: str, *ckpt_dirs: str) -> None:
    out = {}
    for ckpt_dir in ckpt_dirs:
        params = json.loads((Path(ckpt_dir) / "params.json").read_text())
        if "quantization" in params:  # an offline quantized checkpoint loads as written
            out[ckpt_dir] = run(ckpt_dir, dtype=torch.float32)
        else:
            for name, options in MODES:
                out[f"{ckpt_dir}:{name}"] = run(ckpt_dir, **options)
    out["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
    from llama.distributed import end_process

    end_process(0)  # as the scripts end: past gloo's teardown at exit (docs/reliability.md)

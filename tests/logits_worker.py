"""Run under torchrun (or plain python) by the Llama 3 parity tests: build a
checkpoint, and let rank 0 write its full-prompt logits and greedy tokens as JSON.

    torchrun --nproc_per_node N tests/logits_worker.py OUT_JSON CKPT_DIR [CKPT_DIR ...]

OUT_JSON holds a list: one result per checkpoint, in order.
"""

import json
import sys
from pathlib import Path

import torch

from llama import Llama

PROMPT = [384, 84, 278, 265, 308, 109, 97, 365, 323, 299, 115, 119]  # within a tiny Llama 3 vocabulary
MAX_GEN_LEN = 12


def results(generator) -> dict:
    with torch.inference_mode():
        logits = generator.model.forward(torch.tensor([PROMPT], device=generator.device), 0)
    greedy, _ = generator.generate([PROMPT], max_gen_len=MAX_GEN_LEN, temperature=0)
    return {"logits": logits[0].tolist(), "greedy": greedy[0]}


def main(out_path: str, *ckpt_dirs: str) -> None:
    out = []
    for ckpt_dir in ckpt_dirs:
        generator = Llama.build(ckpt_dir, str(Path(ckpt_dir) / "tokenizer.model"), max_seq_len=64, max_batch_size=1)
        out.append({**results(generator), "model_parallel_size": generator.model.model_parallel_size})
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
    from llama.distributed import end_process

    end_process(0)  # as the scripts end: past gloo's teardown at exit (docs/reliability.md)

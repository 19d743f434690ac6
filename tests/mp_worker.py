"""Run under torchrun by the tests: build, generate, and let rank 0 write the results as JSON.

    torchrun --nproc_per_node N tests/mp_worker.py CKPT_DIR OUT_JSON
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from llama import Llama

PROMPTS = [[1, 100, 200, 300], [1, 42], [1, 7, 8, 9, 10, 11, 12, 13]]


def results(generator):
    greedy, greedy_logprobs = generator.generate(PROMPTS, max_gen_len=10, temperature=0, logprobs=True)
    # Every rank draws from the same seeded generator, so sampling agrees too.
    sampled, _ = generator.generate(PROMPTS, max_gen_len=10, temperature=0.9, top_p=0.9)
    text = generator.text_completion(["Hello world"], max_gen_len=6, temperature=0)
    return {"greedy": greedy, "logprobs": greedy_logprobs, "sampled": sampled, "text": text[0]["generation"]}


def main(ckpt_dir: str, out_path: str) -> None:
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=str(Path(ckpt_dir) / "tokenizer.model"),
        max_seq_len=64,
        max_batch_size=4,
        seed=5,
    )
    out = results(generator)
    out["world_size"] = dist.get_world_size()
    out["backend"] = dist.get_backend()
    out["device"] = str(generator.device)
    out["dtype"] = str(generator.model.output.weight.dtype)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
    from llama.distributed import end_process

    end_process(0)  # as the scripts end: past gloo's teardown at exit (docs/reliability.md)

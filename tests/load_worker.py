"""Run under torchrun by the loading tests: build each checkpoint given, decode
greedily, and write what every rank saw to OUT.rank<R>.json.

    torchrun ... tests/load_worker.py OUT CKPT_DIR [CKPT_DIR ...]

Each record holds the tokens and logprobs (which every rank computes) and
the shard files this rank opened, so a test can check both the numbers and
that a rank read only the shards it needs.
"""

import json
import os
import sys

from llama import Llama, checkpoint

PROMPT_TOKENS = [[1, 306, 58, 278], [1, 450, 74, 310, 34, 338, 12]]
MAX_GEN_LEN = 8


def opened_shards_recorder():
    opened = []
    original = checkpoint.load_shard

    def recording(path):
        opened.append(os.path.basename(str(path)))
        return original(path)

    checkpoint.load_shard = recording
    return opened


def decode(generator):
    tokens, logprobs = generator.generate(PROMPT_TOKENS, MAX_GEN_LEN, temperature=0, logprobs=True)
    return {"tokens": tokens, "logprobs": logprobs}


def main(out, *ckpt_dirs):
    opened = opened_shards_recorder()
    records = []
    for ckpt_dir in ckpt_dirs:
        opened.clear()
        generator = Llama.build(ckpt_dir, os.path.join(ckpt_dir, "tokenizer.model"), max_seq_len=64, max_batch_size=2)
        records.append({"ckpt": ckpt_dir, "opened": sorted(opened), **decode(generator)})
    result = {
        "rank": int(os.environ["RANK"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
        "records": records,
    }
    with open(f"{out}.rank{result['rank']}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    from llama.distributed import end_process

    end_process(0)  # as the scripts end: past gloo's teardown at exit (docs/reliability.md)

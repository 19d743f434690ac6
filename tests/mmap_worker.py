"""Build a Llama, change its shard file on disk, and generate again (run in a child process).

    python tests/mmap_worker.py CKPT_DIR truncate|rewrite mmap|copy

Prints the greedy tokens before the change, then after it either the tokens
again or "error: ..." for a RuntimeError. A truncated memory-mapped file can
kill the process with SIGBUS, which is why this runs apart from pytest.
"""

import sys
from pathlib import Path

import torch

from llama import Llama

ckpt, change, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
llama = Llama.build(
    str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1,
    device="cpu", fast_layout=False, mmap=(mode == "mmap"),
)
prompt = [[1, 5, 6, 7]]
print("before", llama.generate(prompt, max_gen_len=8, temperature=0)[0][0], flush=True)
shard = ckpt / "consolidated.00.pth"
if change == "truncate":  # as `cp small.pth consolidated.00.pth` or torch.save onto the path
    torch.save({"x": torch.zeros(1)}, shard)
else:  # same size, other bytes: every weight's value changes
    data = bytearray(shard.read_bytes())
    data[-len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    with open(shard, "r+b") as f:
        f.write(data)
try:
    print("after", llama.generate(prompt, max_gen_len=8, temperature=0)[0][0], flush=True)
except RuntimeError as e:
    print(f"error: {e}", flush=True)

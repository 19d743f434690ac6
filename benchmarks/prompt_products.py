"""Prompts (prefill) with torch's products against the C products, in turn, in one process.

    python benchmarks/prompt_products.py                          # 100M, fp32, int8, int4; 16-512 tokens
    python benchmarks/prompt_products.py --modes fp32 --lengths 47 --rounds 9

Builds the shape from seeded random weights once per mode (fp32 in the C step's layout; int8
and int4 quantized while loading, fp32 activations), then times the eager forward of one
prompt of each length (the last position's logits, as `generate` asks for them) with
LLAMA_NATIVE_PROMPT=torch and =c taking turns (`llama.native.prompt_product`): fp32 by
torch's matrix product or by C's; int8 and int4 made fp32 a block at a time for torch's
product from `native.PROMPT_ROWS` rows on, or by C's products at every length. Prints the
median milliseconds of each and their ratio, torch / C (above 1: C is faster).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench import SHAPES, model_from_state  # noqa: E402
from llama import distributed, kernels, native  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.tiny import random_weights  # noqa: E402


def build(shape: str, mode: str, max_seq_len: int) -> Transformer:
    args = ModelArgs(**SHAPES[shape], max_seq_len=max_seq_len, max_batch_size=1)
    cpu = torch.device("cpu")
    model = model_from_state(random_weights(args, seed=0), args, cpu, torch.float32, None if mode == "fp32" else mode)
    if mode == "fp32":
        kernels.prepare(model, kernels.choose_layout(cpu, torch.float32))
    model.setup_caches(device=cpu, dtype=torch.float32)
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="100M", choices=sorted(SHAPES))
    parser.add_argument("--modes", default="fp32,int8,int4")
    parser.add_argument("--lengths", default="16,47,128,512", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="timed turns of each product at each length")
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args(argv)
    if not native.available():
        parser.error(f"the C products are not available: {native.unavailable_reason()}")
    torch.set_num_threads(opts.threads)
    distributed.init_distributed(torch.device("cpu"), 1)
    lengths = [int(n) for n in opts.lengths.split(",")]
    print(f"{opts.shape}, {opts.threads} threads, C kernels {native.variant()}, CPU vendor {native.cpu_vendor()}, "
          f"default prompt product here: {native.prompt_product()}; median of {opts.rounds} turns")
    print("| mode | tokens | torch ms (tok/s) | C ms (tok/s) | torch / C |")
    print("|---|---|---|---|---|")
    before = os.environ.get(native.PROMPT_VARIABLE)
    try:
        for mode in opts.modes.split(","):
            model = build(opts.shape, mode, max(lengths))
            for n in lengths:
                tokens = torch.randint(3, model.params.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                times = {"torch": [], "c": []}
                with torch.inference_mode():
                    for turn in range(opts.rounds + 1):  # the first turn warms up, untimed
                        for product in times:
                            os.environ[native.PROMPT_VARIABLE] = product
                            start = time.perf_counter()
                            model.forward(tokens, 0, last_logits_only=True)
                            if turn:
                                times[product].append(time.perf_counter() - start)
                t, c = (statistics.median(times[p]) for p in ("torch", "c"))
                print(f"| {mode} | {n} | {t * 1e3:.1f} ({n / t:.0f}) | {c * 1e3:.1f} ({n / c:.0f}) | {t / c:.2f}x |",
                      flush=True)
    finally:
        if before is None:
            os.environ.pop(native.PROMPT_VARIABLE, None)
        else:
            os.environ[native.PROMPT_VARIABLE] = before
    return 0


if __name__ == "__main__":
    sys.exit(main())

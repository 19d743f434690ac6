"""Build a checkpoint from disk in one mode, decode a few tokens, and report
the load time, the peak resident memory and the decode speed.

    python benchmarks/bench.py --shapes 7B --device cpu --write-ckpt /data/llama-7b-shape   # once, ~13.5 GB
    python benchmarks/decode_checkpoint.py /data/llama-7b-shape --mode int8    # or int4, bf16, fp32

One mode per process, so that the peak resident memory is that mode's alone
(the figure that says whether a model fits the machine). Greedy, batch 1, a
16-token prompt of fixed ids.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama
from llama import Llama  # noqa: E402

MODES = {
    "fp32": {"dtype": torch.float32},
    "bf16": {"dtype": torch.bfloat16},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    # quantized with bf16 activations: torch's kernels rather than the C step
    "int8-bf16": {"quantize": "int8", "dtype": torch.bfloat16},
    "int4-bf16": {"quantize": "int4", "dtype": torch.bfloat16},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_dir", help="a Meta-format checkpoint directory with its tokenizer.model")
    parser.add_argument("--mode", choices=sorted(MODES), default="int8")
    parser.add_argument("--gen-len", type=int, default=8, help="tokens to generate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    start = time.time()
    generator = Llama.build(opts.ckpt_dir, str(Path(opts.ckpt_dir) / "tokenizer.model"), max_seq_len=64,
                            max_batch_size=1, device="cpu", **MODES[opts.mode])
    load_s = time.time() - start
    prompt = [[generator.tokenizer.bos_id] + list(range(100, 115))]
    times = []
    with torch.inference_mode():
        state = generator._start_decoding(prompt, opts.gen_len, temperature=0.0, top_p=1.0, logprobs=False)
        start = time.perf_counter()
        for _ in generator._decode_steps(state):  # generate()'s own loop
            times.append(time.perf_counter() - start)
    # The tokens after the first, over the time they took (the first includes the prompt).
    decode = (len(times) - 1) / (times[-1] - times[0])
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{opts.mode}: loaded in {load_s:.0f} s, peak resident memory {peak_gib:.1f} GiB, "
          f"decode {decode:.2f} tokens/s over {len(times) - 1} tokens, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()

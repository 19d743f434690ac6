"""One draw of `sample_top_p` on the CPU against Meta's steps (torch.sort), side by side.

    python benchmarks/sampling.py [--vocab 32000] [--rows 1] [--rounds 200]

Both draw from the same generator state on the same probabilities (softmax of random logits at
temperature 0.6, top-p 0.9), alternating; prints the median milliseconds of each, their ratio,
and whether every token matched.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama, not the installed one
from llama.generation import sample_top_p  # noqa: E402


def meta_sample_top_p(probs, p, generator):
    # Meta's steps (llama/generation.py of the reference), the generator made explicit.
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.gather(probs_idx, -1, torch.multinomial(probs_sort, num_samples=1, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=200)
    opts = parser.parse_args()
    logits = torch.randn(opts.rows, opts.vocab, generator=torch.Generator().manual_seed(0)) * 3
    probs = torch.softmax(logits / 0.6, dim=-1)
    times = {"meta": [], "ours": []}
    same = True
    for i in range(opts.rounds):
        drawn = {}
        for name, draw in (("meta", meta_sample_top_p), ("ours", sample_top_p)):
            generator = torch.Generator().manual_seed(i)
            start = time.perf_counter()
            drawn[name] = draw(probs.clone(), 0.9, generator)
            times[name].append(time.perf_counter() - start)
        same &= torch.equal(drawn["meta"], drawn["ours"])
    meta, ours = (statistics.median(times[k]) * 1e3 for k in ("meta", "ours"))
    print(f"vocab {opts.vocab}, {opts.rows} row(s), {opts.rounds} rounds, {torch.get_num_threads()} threads")
    print(f"Meta's steps {meta:.2f} ms, ours {ours:.2f} ms: {meta / ours:.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()

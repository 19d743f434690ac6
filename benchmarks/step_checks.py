"""What the per-step non-finite check costs: one decoding step's sampling and
sync, before (argmax or softmax + top-p, then `bool(eos_reached.all())`) and
now (`sample_next_token` with its finite test, one `tolist()` of both flags).

    python benchmarks/step_checks.py [--vocab 32000] [--batch 1,8] [--threads 2]

Old and new run alternately in one process; prints the median microseconds
of each and their ratio. To set them beside a whole step: a 15M-shape step
takes ~3 ms and a 100M one ~28 ms on the 2-vCPU development machine.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama, not another install
from llama.generation import sample_next_token, sample_top_p  # noqa: E402


def old_step(logits, eos_reached, temperature, top_p):
    if temperature > 0:
        next_token = sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p).reshape(-1)
    else:
        next_token = torch.argmax(logits, dim=-1).reshape(-1)
    eos_reached |= next_token == 2
    return bool(eos_reached.all())


def new_step(logits, eos_reached, temperature, top_p):
    next_token, nonfinite = sample_next_token(logits, temperature, top_p)
    eos_reached |= next_token == 2
    all_done, any_nonfinite = torch.stack((eos_reached.all(), nonfinite.any())).tolist()
    return all_done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"vocab {args.vocab}, {args.threads} threads, torch {torch.__version__}")
    for batch in map(int, args.batch.split(",")):
        for temperature in (0.0, 0.6):
            logits = torch.randn(batch, args.vocab)
            times = {"old": [], "new": []}
            with torch.inference_mode():
                for i in range(args.repeats):
                    for name, step in (("old", old_step), ("new", new_step)) if i % 2 else (("new", new_step), ("old", old_step)):
                        eos_reached = torch.zeros(batch, dtype=torch.bool)
                        start = time.perf_counter()
                        step(logits, eos_reached, temperature, 0.9)
                        times[name].append(time.perf_counter() - start)
            old, new = (statistics.median(times[k]) * 1e6 for k in ("old", "new"))
            print(f"batch {batch}, temperature {temperature}: old {old:.1f} us, new {new:.1f} us, "
                  f"new - old {new - old:+.1f} us ({new / old:.2f}x)")


if __name__ == "__main__":
    main()

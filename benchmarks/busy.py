"""Decoding on a machine whose cores other jobs hold: a fixed thread count against the adaptive one.

    python benchmarks/busy.py                          # the tiny demo, 200 tokens, then 100M, 64 tokens
    python benchmarks/busy.py --shapes demo --rounds 7 --busy 2

Two worker processes build the same model: one with LLAMA_NATIVE_THREADS set to
torch's thread count (every step on all threads, as before the count adapted),
one with the default (`llama.native.ThreadCount`). They then take turns, each
timing one greedy generation of --tokens tokens, first on the idle machine and
then while --busy processes (default: one per core) spin, started before the
turn and stopped after it, each bounded by --deadline seconds. The same workers
serve every round, so the adaptive one carries what it learned from one round
into the next, as a long-running process would when load comes and goes.

Prints the median seconds per generation of each worker, idle and busy, and
the ratios fixed / adaptive (above 1: the adaptive count is faster).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from llama import Llama, checkpoint, distributed
from llama.model import ModelArgs, Transformer
from llama.tiny import random_weights
shape, tokens = sys.argv[2], int(sys.argv[3])
from llama.demo import resolve_checkpoint
from llama.tokenizer import Tokenizer
ckpt_dir, tokenizer = resolve_checkpoint(None, None)  # the demo's checkpoint and tokenizer
if shape == "demo":
    llama = Llama.build(ckpt_dir, tokenizer, max_seq_len=tokens + 8, max_batch_size=1)
else:  # random weights of the shape, with the demo's tokenizer (only its ids and EOS are used)
    tokenizer = Tokenizer(tokenizer)
    dims = {"100M": dict(dim=768, n_layers=12, n_heads=12, multiple_of=256)}[shape]
    args = ModelArgs(**dims, vocab_size=tokenizer.n_words, max_seq_len=tokens + 8, max_batch_size=1)
    distributed.init_distributed(torch.device("cpu"), 1)
    with checkpoint.init_on_meta():
        model = Transformer(args)
    checkpoint.load_into(model, random_weights(args, seed=0), torch.device("cpu"), torch.float32, source="random")
    llama = Llama.from_model(model, tokenizer)
prompt = [[1, 300, 400, 500]]

def once():
    start = time.perf_counter()
    out, _ = llama.generate(prompt, max_gen_len=tokens, temperature=0.0, top_p=1.0)
    return time.perf_counter() - start, len(out[0])

once()  # warm-up
print("ready", flush=True)
for line in sys.stdin:
    seconds, made = once()
    step = llama.step.one_token if llama.step.kind == "native" else None
    chooser = step._threads.get(len(prompt)) if step is not None else None  # the chooser of this batch size
    count = chooser.current if chooser is not None else None
    print(json.dumps({"seconds": seconds, "tokens": made, "threads_now": count}), flush=True)
"""

SPIN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def start_worker(shape: str, tokens: int, env: dict) -> subprocess.Popen:
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(REPO), shape, str(tokens)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in worker.stdout:
        if line.strip() == "ready":
            return worker
    raise RuntimeError(f"the {shape} worker ended before it was ready (exit {worker.wait()})")


def turn(worker: subprocess.Popen) -> dict:
    worker.stdin.write("go\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def spin(count: int, deadline: float):
    return [subprocess.Popen([sys.executable, "-c", SPIN, str(deadline)]) for _ in range(count)]


def stop(spinners) -> None:
    for p in spinners:
        p.kill()
        p.wait()


def bench(shape: str, tokens: int, opts) -> dict:
    import torch

    threads = torch.get_num_threads()
    fixed_env = dict(os.environ, LLAMA_NATIVE_THREADS=str(threads))
    adaptive_env = {k: v for k, v in os.environ.items() if k != "LLAMA_NATIVE_THREADS"}
    workers = {"fixed": start_worker(shape, tokens, fixed_env), "adaptive": start_worker(shape, tokens, adaptive_env)}
    times = {(name, load): [] for name in workers for load in ("idle", "busy")}
    try:
        for r in range(opts.rounds):
            for load in ("idle", "busy"):
                for name, worker in workers.items():
                    spinners = spin(opts.busy, opts.deadline) if load == "busy" else []
                    if spinners:
                        time.sleep(0.2)  # the spinners running before the turn starts
                    try:
                        result = turn(worker)
                    finally:
                        stop(spinners)
                    times[(name, load)].append(result["seconds"])
                    print(f"  [{shape}] round {r + 1} {load:4} {name:8}: {result['seconds']:7.3f} s "
                          f"for {result['tokens']} tokens (threads now {result['threads_now'] or threads})", flush=True)
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    medians = {f"{name} {load}": statistics.median(values) for (name, load), values in times.items()}
    return {"shape": shape, "tokens": tokens, "threads": threads, "busy_processes": opts.busy,
            "median_seconds": medians, "runs": {f"{n} {l}": v for (n, l), v in times.items()},
            "fixed_over_adaptive_idle": medians["fixed idle"] / medians["adaptive idle"],
            "fixed_over_adaptive_busy": medians["fixed busy"] / medians["adaptive busy"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="demo:200,100M:64", help="shape:tokens, comma-separated (demo, 100M)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--busy", type=int, default=os.cpu_count(), help="spinning processes while busy")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds a spinner runs at most")
    parser.add_argument("--json", default=None, help="where to write the results")
    opts = parser.parse_args()
    results = []
    for item in opts.shapes.split(","):
        shape, _, tokens = item.partition(":")
        results.append(bench(shape, int(tokens or 64), opts))
    print()
    print("| shape | tokens | threads | fixed idle s | adaptive idle s | fixed busy s | adaptive busy s | "
          "fixed / adaptive, idle | fixed / adaptive, busy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median_seconds"]
        print(f"| {r['shape']} | {r['tokens']} | {r['threads']} | {m['fixed idle']:.3f} | {m['adaptive idle']:.3f} | "
              f"{m['fixed busy']:.3f} | {m['adaptive busy']:.3f} | {r['fixed_over_adaptive_idle']:.2f}x | "
              f"{r['fixed_over_adaptive_busy']:.2f}x |")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Why a sharded run on one CPU machine decodes with the eager step: model-parallel 2 against 1.

    python benchmarks/cpu_mp.py                 # the 100M shape, fp32, 2 cores
    python benchmarks/cpu_mp.py --rounds 5 --tokens 64

Writes one random checkpoint of the shape (bench.py's), then, in turn, round by round:
world size 1 under torchrun (the C step on every thread) and world size 2 (the
eager step on each rank, one thread a rank: the cores split between the ranks),
each timing greedy decoding of --tokens tokens after a 32-token prompt. World
size 2 also times the all-reduce a C step at model-parallel 2 could not avoid:
one of a token's activations (dim floats) after each layer's attention and
feed-forward, 2 x n_layers a step, over gloo.

Prints the medians: ms per token at each world size, and the floor a C step at
world size 2 would have on this machine: (the C step's time at world size 1 on
one thread, halved: each rank reads half the weights) + 2 x n_layers
all-reduces.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, sys, time, statistics, torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from llama import Llama
ckpt, tokens, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
llama = Llama.build(ckpt, os.path.join(ckpt, "tokenizer.model"), max_seq_len=32 + tokens, max_batch_size=1)
prompt = [list(range(100, 132))]
with torch.inference_mode():
    state = llama._start_decoding(prompt, tokens, temperature=0.0, top_p=1.0, logprobs=False)
    times = []
    for step in llama._decode_steps(state):  # warm-up
        pass
    state = llama._start_decoding(prompt, tokens, temperature=0.0, top_p=1.0, logprobs=False)
    start = None
    for step in llama._decode_steps(state):
        now = time.perf_counter()
        if start is not None:
            times.append(now - start)
        start = now
result = {"ms_per_token": 1e3 * statistics.median(times), "world_size": dist.get_world_size(),
          "threads": torch.get_num_threads(), "step": llama.step.kind}
if dist.get_world_size() > 1:
    x = torch.randn(1, llama.model.params.dim)
    for _ in range(20):
        dist.all_reduce(x)
    t = time.perf_counter()
    for _ in range(200):
        dist.all_reduce(x)
    result["all_reduce_us"] = 1e6 * (time.perf_counter() - t) / 200
else:
    if llama.step.kind == "native":  # the C step alone on one thread, for the floor of model-parallel 2
        os.environ["LLAMA_NATIVE_THREADS"] = "1"
        from llama import native
        one = native.DecodeStep(llama.model)
        with torch.inference_mode():
            llama.model.forward(torch.tensor(prompt), 0)
            ts = []
            for pos in range(32, 32 + tokens):
                t = time.perf_counter()
                one(torch.tensor([[5]]), pos)
                ts.append(time.perf_counter() - t)
        result["c_step_one_thread_ms"] = 1e3 * statistics.median(ts)
if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump(result, f)
"""


def run(world: int, ckpt: Path, tokens: int, out: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    worker = out.with_name("worker.py")
    worker.write_text(WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), str(worker),
                           str(REPO), str(ckpt), str(tokens), str(out)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"world size {world} failed: {done.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="100M")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="threads at world size 1; split at 2")
    opts = parser.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        tokenizer = bench.LLAMA2_TOKENIZER
        if not tokenizer.is_file():
            from llama.tiny import train_tokenizer

            tokenizer = Path(tmp) / "tokenizer.model"
            train_tokenizer(tokenizer)
        bench.write_random_checkpoint(ckpt, opts.shape, tokenizer)
        rows = {1: [], 2: []}
        for r in range(opts.rounds):
            for world in (1, 2):
                result = run(world, ckpt, opts.tokens, Path(tmp) / f"out{world}.json", opts.cores // world)
                rows[world].append(result)
                print(f"  round {r + 1}, world size {world}: {json.dumps(result)}", flush=True)
    n_layers = bench.SHAPES[opts.shape]["n_layers"]
    one = statistics.median(x["ms_per_token"] for x in rows[1])
    two = statistics.median(x["ms_per_token"] for x in rows[2])
    reduce_us = statistics.median(x["all_reduce_us"] for x in rows[2])
    c_one_thread = statistics.median(x["c_step_one_thread_ms"] for x in rows[1] if "c_step_one_thread_ms" in x)
    floor = c_one_thread / 2 + 2 * n_layers * reduce_us / 1e3
    print(f"\n{opts.shape}, {opts.tokens} tokens, {opts.cores} cores, medians of {opts.rounds} rounds:")
    print(f"  world size 1 (C step, {opts.cores} threads): {one:.2f} ms/token")
    print(f"  world size 2 (eager step, {opts.cores // 2} thread a rank): {two:.2f} ms/token ({two / one:.2f}x)")
    print(f"  gloo all-reduce of {bench.SHAPES[opts.shape]['dim']} floats: {reduce_us:.0f} us; "
          f"{2 * n_layers} a step: {2 * n_layers * reduce_us / 1e3:.2f} ms")
    print(f"  a C step at world size 2, at best: {c_one_thread:.2f} / 2 + {2 * n_layers * reduce_us / 1e3:.2f} = "
          f"{floor:.2f} ms/token ({floor / one:.2f}x world size 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

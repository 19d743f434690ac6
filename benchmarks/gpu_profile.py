"""Where a compiled batch-1 decode step spends its time (a diagnosis for the GPU).

    python benchmarks/gpu_profile.py                 # 7B shape, fp16, on CUDA
    python benchmarks/gpu_profile.py --shape 15M --device cpu --dtype float32

1. Matrix-vector products of the shape's matrices alone, in both layouts:
   Meta's (out, in) with `F.linear`, and the transposed (in, out) that
   `fast_layout` makes, with `x @ w`. Read bandwidth of each, over enough
   distinct copies that no cache holds them.
2. Decode tokens/s of the compiled step in each layout (`fast_layout`
   True and False), alternating, medians over `--runs`; and with
   `--autotune`, the step compiled with inductor's `max-autotune` mode.
3. The top kernels of a few compiled steps under `torch.profiler`.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from llama import Tokenizer, decode_step  # noqa: E402
from llama.model import ModelArgs, ffn_hidden_dim  # noqa: E402
from llama.tiny import random_weights, train_tokenizer  # noqa: E402


def matvec_bandwidth(rows: int, cols: int, device, dtype, total_bytes: float) -> dict:
    """GB/s of y = W x for W (rows out, cols in), in Meta's layout and transposed."""
    copies = max(2, int(total_bytes // (rows * cols * torch.finfo(dtype).bits // 8)))
    x = torch.randn(1, cols, device=device, dtype=dtype)
    meta = [torch.randn(rows, cols, device=device, dtype=dtype) for _ in range(copies)]
    transposed = [w.t().contiguous() for w in meta]
    out = {}
    for name, fn in (
        ("F.linear(x, W[out, in])", lambda: [F.linear(x, w) for w in meta]),
        ("x @ W[in, out]", lambda: [x @ w for w in transposed]),
    ):
        if device.type == "cuda":  # one graph for all copies: launch overhead out of the way
            graph = torch.cuda.CUDAGraph()
            fn()
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        else:
            run = fn
        run()  # warm-up
        seconds = bench.median_time(run, device, runs=5)
        out[name] = copies * rows * cols * torch.finfo(dtype).bits // 8 / seconds / 1e9
    del meta, transposed
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="7B", choices=sorted(bench.SHAPES))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--autotune", action="store_true", help="also compile with mode='max-autotune'")
    opts = parser.parse_args(argv)
    device = bench.distributed.choose_device(opts.device)
    dtype = bench.distributed.choose_dtype(device, opts.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args = ModelArgs(**bench.SHAPES[opts.shape], max_seq_len=32 + opts.gen_len, max_batch_size=1)
    bandwidth = bench.read_bandwidth(device, gib=4.0 if device.type == "cuda" else 1.0)
    ceiling = bandwidth / bench.bytes_per_token(args, dtype)
    print(f"{opts.shape} {dtype} on {device}: read bandwidth {bandwidth / 1e9:.0f} GB/s, "
          f"ceiling {ceiling:.0f} tok/s", flush=True)

    print("\n== matrix-vector products (GB/s of weights read)")
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    matrices = {"wqkv": (3 * args.dim, args.dim), "wo": (args.dim, args.dim), "w13": (2 * hidden, args.dim),
                "w2": (args.dim, hidden), "output": (args.vocab_size, args.dim)}
    for name, (rows, cols) in matrices.items():
        result = matvec_bandwidth(rows, cols, device, dtype, total_bytes=2e9 if device.type == "cuda" else 2e8)
        print(f"  {name:>6} {rows}x{cols}: " + ", ".join(f"{k} {v:.0f}" for k, v in result.items()), flush=True)

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(Path(tmp) / "t.model")
        tokenizer = Tokenizer(str(Path(tmp) / "t.model"))
    state = random_weights(args, seed=0, device=device, dtype=dtype)
    variants = [("compile, fast_layout", dict(compile=True, fast_layout=True)),
                ("compile, Meta layout", dict(compile=True, fast_layout=False))]
    runners = []
    for i, (name, options) in enumerate(variants):
        weights = state if i == len(variants) - 1 else {k: v.clone() for k, v in state.items()}
        runners.append(bench.OurRunner(name, weights, args, tokenizer, device, dtype, **options))
    del state, weights
    prompt = torch.randint(3, args.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))

    def decode_rates(runners):
        for runner in runners:
            start = time.perf_counter()
            runner.steps(prompt, opts.gen_len)
            print(f"  warm-up of {runner.name}: {time.perf_counter() - start:.1f} s", flush=True)
        rates = {r.name: [] for r in runners}
        for _ in range(opts.runs):
            for r in runners:
                t = r.steps(prompt, opts.gen_len)
                rates[r.name].append((len(t) - 1) / (t[-1] - t[0]))
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"  {name}: {rate:.1f} tok/s ({rate / ceiling:.0%} of the ceiling)", flush=True)

    print("\n== compiled decode, batch 1")
    decode_rates(runners)

    print("\n== top kernels over 16 compiled steps (fast_layout)")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runners[0].steps(prompt, 16)  # another length: must not compile again (if it did, it does so here)
    with profile(activities=activities) as prof:
        runners[0].steps(prompt, 16)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=70), flush=True)

    if opts.autotune:
        print("\n== compiled with mode='max-autotune' (fast_layout)")
        runner = runners[0]
        runners = None
        g = runner.generator
        torch._dynamo.reset()
        compiled = decode_step.CompiledDecodeStep(g.model, mode="max-autotune")
        g.step = decode_step.DecodeStep(g.model, "compiled", compiled)
        runner.name = "max-autotune, fast_layout"
        decode_rates([runner])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which int8 / int4 product reads a batch-1 decode step's weights fastest on a GPU.

    python benchmarks/gpu_quant_kernels.py                  # CUDA, Llama-2-7B's matrices
    python benchmarks/gpu_quant_kernels.py --shape 100M     # a smaller shape, a quicker look

One "chain" is the product of a row vector x (1, in) with each matrix of one
transformer block (q|k|v, wo, w1|w3, w2) and the output projection: about a
32nd of a 7B step's weights, more than the GPU's L2 cache holds. Each
candidate's chain is captured once in a CUDA graph (launch overhead out of the
way) and replayed; the table gives the median time, the bytes its weights take
read per second, and its speed against fp16 `F.linear` (the baseline):

- fp16: `F.linear` on Meta's [out, in] weights, and `x @ W` on the transposed
  [in, out] copy (`fast_layout`, the GPU default);
- int8: `F.linear(x, q.to(bf16)) * scale` compiled as `compile=True` compiles
  it (coordinate-descent tuning: the one-row product becomes a fused
  multiply-and-sum) and without that tuning (cuBLAS on a bf16 copy);
  `torch._weight_int8pack_mm` where this torch has it on CUDA;
- int4: `torch._weight_int4pack_mm` (bf16) at group sizes 32, 64, 128 and 256.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from llama import kernels, quantization  # noqa: E402
from llama.model import ffn_hidden_dim  # noqa: E402


def shapes_of(name: str):
    """(rows, cols) of each matrix of one block, fused as the model runs them, and the output."""
    s = bench.SHAPES[name]
    dim, heads = s["dim"], s["n_heads"]
    kv = s.get("n_kv_heads") or heads
    head_dim = dim // heads
    hidden = ffn_hidden_dim(dim, s.get("multiple_of", 256), s.get("ffn_dim_multiplier"))
    return [((heads + 2 * kv) * head_dim, dim), (dim, heads * head_dim), (2 * hidden, dim), (dim, hidden),
            (s.get("vocab_size", 32000), dim)]


def time_chain(run, device, repeats: int) -> float:
    """Median seconds of one replay of `run` captured in a CUDA graph."""
    run()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def candidates(shapes, device):
    """(name, bytes of weights, function running the chain) of each candidate that can be made here."""
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [torch.randn(r, c, device=device, generator=gen, dtype=torch.float32) / c**0.5 for r, c in shapes]
    xs = {c: torch.randn(1, c, device=device, dtype=torch.float16) for _, c in shapes}
    xb = {c: v.to(torch.bfloat16) for c, v in xs.items()}

    fp16 = [w.half() for w in weights]
    yield "fp16 F.linear(x, W[out, in])", sum(w.nbytes for w in fp16), lambda: [F.linear(xs[w.shape[1]], w)
                                                                                   for w in fp16]
    fp16_t = [w.t().contiguous() for w in fp16]
    yield "fp16 x @ W[in, out] (fast_layout)", sum(w.nbytes for w in fp16_t), lambda: [xs[w.shape[0]] @ w
                                                                                        for w in fp16_t]
    del fp16, fp16_t

    int8 = [quantization.quantize_int8(w) for w in weights]
    int8 = [(q, s.to(torch.bfloat16)) for q, s in int8]
    int8_bytes = sum(q.nbytes + s.nbytes for q, s in int8)

    def int8_linear(x, q, s):
        return F.linear(x, q.to(x.dtype)) * s

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for label, options in (("compile=True (coordinate-descent tuning)", {"coordinate_descent_tuning": True}),
                           ("compiled, no tuning", {})):
        fn = torch.compile(int8_linear, fullgraph=True, dynamic=False, options=options)
        yield f"int8 F.linear(x, q.to(bf16)) * s, {label}", int8_bytes, (
            lambda fn=fn: [fn(xb[q.shape[1]], q, s) for q, s in int8])
    if hasattr(torch, "_weight_int8pack_mm"):
        scales = [s for _, s in int8]
        try:
            torch._weight_int8pack_mm(xb[int8[0][0].shape[1]], int8[0][0], scales[0])
        except (RuntimeError, NotImplementedError) as error:
            print(f"  torch._weight_int8pack_mm on CUDA: not here ({str(error).splitlines()[0][:100]})")
        else:
            yield "int8 torch._weight_int8pack_mm", int8_bytes, lambda: [
                torch._weight_int8pack_mm(xb[q.shape[1]], q, s) for q, s in int8]
    del int8

    for group in quantization.GROUP_SIZES:
        if any(c % group for _, c in shapes):
            continue
        made = []
        for w in weights:
            nibbles, scale, zero = quantization.quantize_int4(w, group)
            made.append((kernels.Int4Linear(nibbles, scale, zero, group, torch.bfloat16), xb[w.shape[1]]))
        size = sum(k.packed.nbytes + k.scale_zero.nbytes for k, _ in made)
        yield f"int4 torch._weight_int4pack_mm, group {group}", size, lambda made=made: [k(x) for k, x in made]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7B", choices=sorted(bench.SHAPES))
    parser.add_argument("--repeats", type=int, default=20)
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    device = torch.device("cuda")
    shapes = shapes_of(opts.shape)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}; {opts.shape} matrices "
          f"{', '.join(f'{r}x{c}' for r, c in shapes)}, x (1, in)", flush=True)
    rows = []
    with torch.inference_mode():
        for name, size, run in candidates(shapes, device):
            try:
                seconds = time_chain(run, device, opts.repeats)
            except Exception as error:  # one candidate that fails leaves the others their figures
                print(f"  {name}: failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
                continue
            rows.append((name, size, seconds))
            print(f"  {name}: {seconds * 1e6:.0f} us, {size / seconds / 1e9:.0f} GB/s", flush=True)
    base = rows[0][2]
    print(f"\n| product | MB read | us per chain | GB/s | speed vs {rows[0][0]} |\n|---|---|---|---|---|")
    for name, size, seconds in rows:
        print(f"| {name} | {size / 1e6:.0f} | {seconds * 1e6:.0f} | {size / seconds / 1e9:.0f} | {base / seconds:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

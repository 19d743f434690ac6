"""Which fp32 matrix-vector kernel in torch reads the weights fastest on this CPU.

    python benchmarks/fp32_kernels.py                     # 100M shape, batch 1 and 8
    python benchmarks/fp32_kernels.py --shape 15M --threads 2 --rounds 15

Times the chain of every linear layer of one decode step of a bench.py shape
(per layer: q/k/v fused, wo, w1/w3 fused, w2; then the output matrix), each
kernel on its own copy of the weights, in alternating rounds so that the load
of a shared machine falls on all alike. Prints the median milliseconds per
chain, the read rate (weight bytes / time), each kernel's speed relative to
`F.linear` in Meta's layout, and the read bandwidth probe of bench.py.

The kernels:
- `F.linear`: Meta's [out, in] weights (what build() used on CPU before);
- `x @ Wt`: the same matrices stored transposed [in, out] (`fast_layout`);
- `mkldnn packed`: `torch.ops.mkldnn._linear_pointwise` on weights reordered
  once by `torch.ops.mkldnn._reorder_linear_weight` (oneDNN's blocked layout,
  what inductor's freezing uses);
- `mkl packed`: `torch.ops.mkl._mkl_linear` on weights packed once by
  `torch.ops.mkl._mkl_reorder_linear_weight` (MKL's packed sgemm).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench import SHAPES, read_bandwidth  # noqa: E402
from llama.model import ffn_hidden_dim  # noqa: E402


def matrices(shape: str):
    """(out, in) shapes of one decode step's products, in order."""
    s = SHAPES[shape]
    dim, hidden = s["dim"], ffn_hidden_dim(s["dim"], s["multiple_of"], None)
    layer = [(3 * dim, dim), (dim, dim), (2 * hidden, dim), (dim, hidden)]
    return layer * s["n_layers"] + [(s["vocab_size"], dim)]


def kernels(weights, batch):
    """name -> a list of (function, prepared weight) for each product of the chain."""
    chains = {"F.linear": [(F.linear, w) for w in weights],
              "x @ Wt": [(torch.matmul, w.t().contiguous()) for w in weights]}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        def mkldnn(x, w):
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

        chains["mkldnn packed"] = [(mkldnn, torch.ops.mkldnn._reorder_linear_weight(w, batch)) for w in weights]
    if torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"):
        def mkl(x, pair):
            return torch.ops.mkl._mkl_linear(x, pair[0], pair[1], None, batch)

        chains["mkl packed"] = [(mkl, (torch.ops.mkl._mkl_reorder_linear_weight(w, batch), w)) for w in weights]
    return chains


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="100M", choices=list(SHAPES))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--reps", type=int, default=5, help="chains per timing")
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {opts.shape}")
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * i**-0.5 for o, i in matrices(opts.shape)]
    nbytes = sum(w.numel() * 4 for w in weights)
    for batch in [int(b) for b in opts.batch_sizes.split(",")]:
        with torch.inference_mode():
            chains = kernels(weights, batch)
            xs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}
            for name, chain in chains.items():  # same numbers as F.linear?
                for (fn, w), orig in zip(chain, weights):
                    err = (fn(xs[orig.shape[1]], w) - F.linear(xs[orig.shape[1]], orig)).abs().max().item()
                    if err > 1e-3:
                        raise RuntimeError(f"{name} differs from F.linear by {err}")
            runs = {name: [(fn, w, xs[orig.shape[1]]) for (fn, w), orig in zip(chain, weights)]
                    for name, chain in chains.items()}
            times = {name: [] for name in runs}
            for _ in range(opts.rounds):
                for name, chain in runs.items():
                    start = time.perf_counter()
                    for _ in range(opts.reps):
                        for fn, w, x in chain:
                            fn(x, w)
                    times[name].append((time.perf_counter() - start) / opts.reps)
            bandwidth = read_bandwidth(torch.device("cpu"), runs=5)
        base = statistics.median(times["F.linear"])
        print(f"\nbatch {batch}: {nbytes / 1e6:.0f} MB of weights; probe {bandwidth / 1e9:.1f} GB/s")
        for name, t in times.items():
            med = statistics.median(t)
            print(f"  {name:<14} {1e3 * med:7.2f} ms  {nbytes / med / 1e9:5.1f} GB/s  {base / med:4.2f}x F.linear")
    return 0


if __name__ == "__main__":
    sys.exit(main())

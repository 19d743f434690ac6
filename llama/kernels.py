"""How the linear layers run: the choice of weight layout per device and dtype.

`choose_layout` is the one place that decides. Layouts:

- "meta": `F.linear` on Meta's [out, in] weights as loaded; on the CPU they
  stay in the memory-mapped checkpoint (no copy in RAM).
- "transposed": every matrix copied once as [in, out], q/k/v and w1/w3 fused
  (`Transformer.prepare_for_inference`), products as `x @ W`: the default on
  GPUs, and for fp32 on the CPU, where it is the fastest fp32 kernel torch
  offers for decoding (`benchmarks/fp32_kernels.py`, `benchmarks/NOTES.md`).
"""

from typing import Optional

import torch

LAYOUTS = ("meta", "transposed")


def choose_layout(device, dtype: torch.dtype, fast_layout: Optional[bool] = None) -> str:
    """The layout for weights of `dtype` on `device`: `fast_layout` True asks for
    the decoding layout, False for Meta's as loaded, None for the default."""
    if fast_layout is not None:
        return "transposed" if fast_layout else "meta"
    if torch.device(device).type == "cpu" and dtype != torch.float32:
        # bf16/fp16 on the CPU: the transposed product is slower than Meta's (NOTES.md)
        return "meta"
    return "transposed"

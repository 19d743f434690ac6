"""How the linear layers run: the choice of weight layout and kernel, per device and dtype.

`choose_layout` decides the layout; `prepare` (an unquantized model's
layout) and `quantized_kernel` (an int8 or int4 matrix, for
`llama.quantization.install`) make the kernels, each choice made once
there, never at run time. A kernel is a small `nn.Module` mapping
x (..., in_features) to (..., out_features), set into one of the model's
slots (`Transformer.kernel_slots()`), which `forward` calls unconditionally:
`torch.compile` sees plain tensor code. A kernel the C step can read says
what it reads with `c_matrix()` ((kind, tensor, scale, group) or None).

Layouts:

- "meta": `F.linear` on Meta's [out, in] weights, as loaded (no copy).
- "native": every matrix copied once into RAM in Meta's [out, in] layout, q/k/v
  and w1/w3 stacked (`FusedLinear`, rows), for the
  one-token step in C (`llama/native.py`): the default for fp32 and bf16 on the CPU
  where that library was compiled (`fast_layout=False` keeps Meta's layout
  in the memory-mapped file, on torch's kernels).
- "transposed": every matrix copied once as [in, out], q/k/v and w1/w3 fused
  (`FusedLinear`): the default on GPUs, and for fp32 on
  the CPU where the C step is not compiled.
- "mkldnn": bf16 weights reordered once into oneDNN's blocked layout
  (q/k/v and w1/w3 fused), for bf16 on a CPU without the C step: faster
  than `F.linear` in bf16, which the transposed layout makes slower instead
  (benchmarks/NOTES.md, "Figures that were in code comments").
- "int8": per-output-channel symmetric int8 (with fp32 activations on the
  CPU, C's product, `NativeInt8Linear`; else `torch._weight_int8pack_mm` on
  CPU, `Int8Linear`; on CUDA `F.linear` on weights dequantized in the step,
  which `torch.compile` fuses into the product, `CudaInt8Linear`).
- "int4": grouped asymmetric 4-bit (with fp32 activations on the CPU, C's
  product on 16-row tiles, which quantizes each group of x to int8 and sums in
  integers, `NativeInt4Linear`; else
  `torch._weight_int4pack_mm_for_cpu`, `Int4Linear`, or
  `torch._weight_int4pack_mm` on CUDA, which needs bf16 and sm80+, `CudaInt4Linear`).
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama import native


def mkldnn_bf16_available() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class FusedLinear(nn.Module):
    """The "transposed" and "native" layouts: the layers' weights copied once into
    one matrix, side by side (q|k|v, w1|w3), and x @ it.

    `fused` is (in, sum of out): stored so (transposed) or as its (sum of out, in)
    rows stacked (the C step's layout). Each layer's `weight` becomes a view of
    its rows, so the parameters keep their names, shapes and values and no
    weight is held twice. `release`, if given, is called on each old weight once
    copied. x @ fused is, for one layer, exactly `F.linear(x, weight)`.
    """

    def __init__(self, *layers: nn.Module, rows: bool, release: Optional[Callable[[torch.Tensor], None]] = None):
        super().__init__()
        self.layers = layers  # a tuple: they stay their owner's children (Meta's state-dict keys)
        self.rows = rows
        self.register_buffer("fused", None, persistent=False)
        self.reload(release)

    @torch.no_grad()  # else the copies would record an autograd graph that keeps the old weights alive
    def reload(self, release: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """Copy the layers' weights in again (after a load replaced them)."""
        weights = [layer.weight for layer in self.layers]
        shape = (sum(w.shape[0] for w in weights), weights[0].shape[1])
        like = dict(dtype=weights[0].dtype, device=weights[0].device)
        stacked = torch.empty(shape, **like) if self.rows else torch.empty(shape[::-1], **like).t()
        start = 0
        for layer, weight in zip(self.layers, weights):
            end = start + weight.shape[0]
            stacked[start:end].copy_(weight)
            if release is not None:
                release(weight)
            # Inference only: the fused matrix is a plain buffer; its views need no grad.
            layer.weight = nn.Parameter(stacked[start:end], requires_grad=False)
            start = end
        self.fused = stacked.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 rows (the C step's layout): by the C product where it is the CPU's faster
        # (`native.prompt_product`): every eager forward (a prompt, its last position's logits, an
        # eager step at more than one rank); a compiled forward keeps inductor's own products.
        if (self.rows and x.dtype == torch.float32 and not torch.compiler.is_compiling()
                and native.prompt_product() == "c"):
            return native.dense_matmul(self.fused.t(), x)
        return x @ self.fused

    def c_matrix(self):
        """("dense", the [out, in] rows, None, 0) in the rows layout (what C reads), else None."""
        return ("dense", self.fused.t(), None, 0) if self.rows else None


def choose_layout(
    device: torch.device, dtype: torch.dtype, quantize: Optional[str] = None, fast_layout: Optional[bool] = None
) -> str:
    """The layout (see the module docstring) for weights of `dtype` on `device`.

    `quantize` ("int8"/"int4") names its own layout. Otherwise `fast_layout`
    True asks for the fastest decoding layout (a copy of the weights),
    False for Meta's as loaded, None for this device and dtype's default.
    """
    device = torch.device(device)
    if quantize is not None:
        return quantize
    if fast_layout is False:
        return "meta"
    if device.type == "cpu" and dtype == torch.bfloat16:
        # The C step where it was compiled (it reads Meta's rows; AVX512-BF16
        # dot products where the CPU has them). Else never transposed: the
        # [in, out] bf16 matrix-vector product is slower than Meta's layout.
        # oneDNN's packed weights where it has bf16 support (AVX-512), else
        # F.linear (benchmarks/NOTES.md).
        if native.available():
            return "native"
        return "mkldnn" if mkldnn_bf16_available() else "meta"
    if device.type == "cpu" and dtype != torch.float32:
        return "meta"
    if device.type == "cpu" and dtype == torch.float32:
        # The C step where it was compiled (benchmarks/NOTES.md); else the
        # transposed product, torch's fastest fp32 kernel for decoding
        # (benchmarks/fp32_kernels.py), with one line saying why.
        if native.available():
            return "native"
        native.notice_fallback()
    return "transposed"


class MkldnnLinear(nn.Module):
    """bf16 weights in oneDNN's blocked layout (CPU)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features = weight.shape[0]
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scale: q int8 (out, in), scale (out,) in the activation dtype,
    by torch's CPU kernel. `quantized_kernel` picks this class or a subclass."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features = qweight.shape[0]
        self.register_buffer("qweight", qweight.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(dtype).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.scale)
        return y.view(*x.shape[:-1], self.out_features)

    def c_matrix(self):
        """("int8", q, scale, 0): what C reads (`native.matrix`), with fp32 scales."""
        return ("int8", self.qweight, self.scale, 0) if self.scale.dtype == torch.float32 else None


class NativeInt8Linear(Int8Linear):
    """`Int8Linear` with fp32 activations on the CPU, by C's product: torch's int8
    kernel is far slower with fp32 inputs (prompts; benchmarks/NOTES.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return native.matmul(self, x)


class CudaInt8Linear(Int8Linear):
    """`Int8Linear` on CUDA: dequantized in the step. Under torch.compile the
    conversion is fused into the product's prologue, so the int8 bytes are what is read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.to(x.dtype)) * self.scale


class Int4Linear(nn.Module):
    """Grouped 4-bit weights: w = (q - 8) * scale + zero, per group of `group_size` inputs,
    by torch's CPU kernel (`CudaInt4Linear`: CUDA's).

    `packed` is the kernel's own tiled layout, made on the weights' device from
    plain nibbles (see `llama.quantize`); `scale_zero` is (in / group_size, out, 2).
    """

    def __init__(self, nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype):
        super().__init__()
        self.out_features = nibbles.shape[0]
        self.group_size = group_size
        check_int4_kernel(nibbles.device, dtype)
        self.register_buffer("packed", self.pack(nibbles), persistent=False)
        scale_zero = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(dtype)
        self.register_buffer("scale_zero", scale_zero, persistent=False)

    @staticmethod
    def pack(nibbles: torch.Tensor) -> torch.Tensor:
        # Packed 4096 rows at a time (the packer tiles rows by 64, so the
        # pieces join to the whole's layout): its int32 input is 8x the
        # nibbles, which for a whole output projection would be a spike.
        return torch.cat([
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(rows).to(torch.int32), 1)
            for rows in nibbles.split(4096)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), self.packed, self.group_size, self.scale_zero)
        return y.view(*x.shape[:-1], self.out_features)


class CudaInt4Linear(Int4Linear):
    """`Int4Linear` on CUDA (bf16 activations, sm80+)."""

    @staticmethod
    def pack(nibbles: torch.Tensor) -> torch.Tensor:
        # The CUDA packer takes two 4-bit values a byte with the even column
        # in the high nibble; ours keeps it in the low one.
        swapped = ((nibbles & 15) << 4) | (nibbles >> 4)
        in_features = 2 * nibbles.shape[1]
        inner_k_tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
        return torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.packed, self.group_size, self.scale_zero)
        return y.view(*x.shape[:-1], self.out_features)


class NativeInt4Linear(nn.Module):
    """Grouped 4-bit weights as `Int4Linear`'s, for fp32 activations on the CPU, read by C
    (`llama/native.c`): the one-token step and, here, every other product.

    `packed` is C's tiled layout (uint8 (tiles, groups, group_size * 8 + 64)): the
    rows in tiles of 16 (the last padded with zero rows), and for each tile and
    group of `group_size` inputs one record: the 16 rows' values, two a byte, in
    chunks of 8 inputs (in chunk c, byte 4 j + u: row j's value at the group's
    input 8 c + u in the low nibble, 8 c + 4 + u in the high one), then the 16
    scales and the 16 offsets zero - 8 * scale (w = q * scale + offset) in fp16.
    A group's record is read in one stream, and each 32-bit lane of C's vectors
    is one row's four values, multiplied by four inputs of x at once: C quantizes
    each group of x to int8 (step max|x| / 127) and sums in integers, centred on
    q - 8, as llama.cpp's Q4_0 products do. fp16 keeps the
    scales and offsets to 2^-11 of their size: for a group quantized from its
    min and max, a weight moves by at most ~1% of its 4-bit step (rounding to
    4 bits moved it by up to 50%).
    """

    def __init__(self, nibbles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
        super().__init__()
        rows, half = nibbles.shape
        groups = 2 * half // group_size
        self.out_features, self.in_features, self.group_size = rows, 2 * half, group_size
        scale, zero = scale.to(torch.float32), zero.to(torch.float32)
        scale16, offset16 = scale.to(torch.float16), (zero - 8 * scale).to(torch.float16)
        if not (torch.isfinite(scale16).all() and torch.isfinite(offset16).all()):
            raise ValueError(
                f"int4 scales or zeros of a {rows}x{2 * half} matrix exceed fp16's range (65504), which the CPU "
                "int4 kernel keeps them in; use quantize='int8'"
            )
        pad = -rows % 16
        tiles = (rows + pad) // 16

        def per_tile(t: torch.Tensor) -> torch.Tensor:  # (rows, groups, k) -> (tiles, groups, k, 16)
            t = F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
            return t.view(tiles, 16, groups, t.shape[-1]).permute(0, 2, 3, 1)

        # chunks of 8 inputs: 4 bytes a row, byte u holding inputs u (low nibble) and 4 + u (high)
        q = unpack_nibbles(nibbles).view(rows, groups, group_size // 8, 2, 4)
        values = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # (rows, groups, chunks, 4)
        values = F.pad(values, (0, 0, 0, 0, 0, 0, 0, pad)) if pad else values
        values = values.view(tiles, 16, groups, group_size // 8, 4).permute(0, 2, 3, 1, 4).reshape(tiles, groups, -1)
        # fp16 (tiles, groups, 16) as their bytes (tiles, groups, 32)
        scales = per_tile(scale16.view(rows, groups, 1)).contiguous().view(torch.uint8).view(tiles, groups, 32)
        offsets = per_tile(offset16.view(rows, groups, 1)).contiguous().view(torch.uint8).view(tiles, groups, 32)
        self.register_buffer("packed", torch.cat((values, scales, offsets), dim=-1).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return native.matmul(self, x)

    def c_matrix(self):
        """("int4", records, None, group_size): what C reads (`native.matrix`)."""
        return "int4", self.packed, None, self.group_size


def unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) uint8, two values a byte, the even column in the low nibble -> (out, in) uint8 in 0..15."""
    return torch.stack((nibbles & 15, nibbles >> 4), dim=-1).flatten(-2)


def check_int4_kernel(device: torch.device, dtype: torch.dtype) -> None:
    """Raise RuntimeError naming what is missing where the int4 kernel cannot run."""
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            raise ValueError(f"int4 on CUDA runs torch._weight_int4pack_mm, which takes bfloat16 activations, not {dtype}")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise RuntimeError(
                f"int4 needs torch._weight_int4pack_mm, which needs a GPU of compute capability 8.0 or newer; "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}. Use quantize='int8'"
            )
        if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack"):
            raise RuntimeError(f"this torch build ({torch.__version__}) has no torch.ops.aten._convert_weight_to_int4pack")
    elif device.type == "cpu":
        if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
            raise RuntimeError(
                f"this torch build ({torch.__version__}) has no torch.ops.aten._weight_int4pack_mm_for_cpu "
                "(torch 2.5 or newer has it)"
            )
    else:
        raise RuntimeError(f"no int4 kernel for device {device}; int4 runs on CPU and CUDA")


def check_kernel(layout: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise (naming the missing kernel) unless `layout` can run on `device` in `dtype`."""
    device = torch.device(device)
    if layout == "int4":
        check_int4_kernel(device, dtype)
    elif layout == "int8":
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"no int8 kernel for device {device}; int8 runs on CPU and CUDA")
        if device.type == "cpu" and not hasattr(torch, "_weight_int8pack_mm"):
            raise RuntimeError(f"this torch build ({torch.__version__}) has no torch._weight_int8pack_mm")
    elif layout == "mkldnn" and not mkldnn_bf16_available():
        raise RuntimeError("this CPU or torch build has no oneDNN bf16 support (torch.ops.mkldnn)")


def quantized_kernel(
    mode: str, q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], group_size: Optional[int], dtype
) -> nn.Module:
    """The kernel of one quantized matrix (`q` on its device; int4: `zero` and
    `group_size`) for activations of `dtype`: C's product for fp32 on a CPU
    where the C step is compiled, else torch's kernel for the device.
    Raises ValueError for an int4 matrix torch's CPU kernel cannot tile."""
    device = q.device
    in_c = device.type == "cpu" and dtype == torch.float32 and native.available()
    if mode == "int8":
        if device.type == "cuda":
            return CudaInt8Linear(q, scale, dtype)
        return (NativeInt8Linear if in_c else Int8Linear)(q, scale, dtype)
    if in_c:
        return NativeInt4Linear(q, scale, zero, group_size)  # read by C (llama/native.c)
    if device.type == "cuda":
        return CudaInt4Linear(q, scale, zero, group_size, dtype)
    if q.shape[0] % 16 != 0:
        raise ValueError(f"int4 on CPU needs each rank's output rows in multiples of 16; this matrix has {q.shape[0]}")
    return Int4Linear(q, scale, zero, group_size, dtype)


def install(model: nn.Module, make, layout: str) -> None:
    """Give each linear slot of `model` the kernel `make([weight keys])` returns
    (None: keep the slot's kernel) and record `layout`. A layer whose weights
    went into a kernel of their own (not a `FusedLinear`, whose views they are)
    drops its `weight` parameter, so nothing is held twice."""
    for owner, slot, layers in model.kernel_slots():
        kernel = make([name + ".weight" for name in layers])
        if kernel is None:
            continue
        setattr(owner, slot, kernel)
        if not isinstance(kernel, FusedLinear):
            for name in layers:
                model.get_submodule(name).register_parameter("weight", None)
    model.weight_layout = layout
    model.layout_version += 1  # the C step re-reads its pointers


class WidenedBf16Linear(FusedLinear):
    """The rows layout in bf16 on a CPU without bf16 arithmetic (no AVX512-BF16: torch's bf16
    product there is several times slower than its fp32 one). One row of x (a decoding step
    outside C) is `FusedLinear`'s product; a prompt (`native.PROMPT_ROWS` rows or more) multiplies
    fp32 copies of the weights, a block of rows at a time, in fp32, and rounds the result to bf16
    once, as `F.linear` in bf16 does (its sums are fp32 too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] < native.PROMPT_ROWS:
            return x @ self.fused
        rows = self.fused.t()  # (sum of out, in)

        def fill(first: int, n: int, buffer: torch.Tensor) -> bool:
            buffer[:n * rows.shape[1]].view(n, rows.shape[1]).copy_(rows[first:first + n])
            return False

        y = native.blocked_product(x2.float(), rows.shape[0], rows.shape[1], fill, dtype=x.dtype)
        return y.view(*x.shape[:-1], rows.shape[0])


def prepare(model: nn.Module, layout: str, release: Optional[Callable[[torch.Tensor], None]] = None) -> None:
    """Lay the loaded (unquantized) weights of `model` out as `layout`: the one
    place an unquantized model's kernels are made.

    `release`, if given, is called on each original matrix once it has been
    copied into the new layout (`Llama.build` drops its memory-mapped pages).
    """
    if layout == "meta":
        return
    layers_of = lambda keys: [model.get_submodule(key.rsplit(".", 1)[0]) for key in keys]  # noqa: E731
    if layout in ("transposed", "native"):
        rows = layout == "native"
        weight = model.tok_embeddings.weight
        widen = (rows and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                 and not mkldnn_bf16_available())
        kind = WidenedBf16Linear if widen else FusedLinear
        install(model, lambda keys: kind(*layers_of(keys), rows=rows, release=release),
                "rows" if rows else "transposed")
        return
    if layout != "mkldnn":
        raise ValueError(f"layout {layout!r} is made while loading, not from loaded weights")
    check_kernel(layout, model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype)

    @torch.no_grad()
    def make(keys):
        weights = [layer.weight for layer in layers_of(keys)]
        kernel = MkldnnLinear(torch.cat(weights) if len(weights) > 1 else weights[0])
        if release is not None:
            for weight in weights:
                release(weight)
        return kernel

    install(model, make, "mkldnn")

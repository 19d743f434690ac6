"""Weight-only quantization: int8 per output channel, int4 in groups; and a quantized checkpoint writer.

    python -m llama.quantize SRC DST --quantize int8|int4 [--group-size N] [--keep-output]

Every matrix of the transformer blocks (and, unless kept, the output
projection) is quantized; embeddings and norms stay as they are, and the
activations and the KV cache stay in the activation dtype.

- int8: q = round(w / s) in [-127, 127] with s = max|w| / 127 over each
  output row (symmetric, per output channel).
- int4: each row is cut into groups of `group_size` inputs; a group's values
  map to 0..15 as q = round((w - min) / s), s = (max - min) / 15, and come
  back as w = (q - 8) * s + zero with zero = min + 8 s (the convention of
  torch's int4 kernels).

The quantized values are a function of the whole tensor, cut like the
weight: a rank at any model-parallel size, quantizing its own part while
loading, gets the same numbers as the offline checkpoint, so the two give
identical tokens and a quantized checkpoint reshards like any other.

The file format (keys, shapes, params.json's entry) is `llama/quant_format.py`;
its names are re-exported here. `install` puts a rank's quantized weights
into a model as the kernels of `llama/kernels.py`.
"""

import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from llama import atomic, checkpoint, family, kernels, memory, native
from llama.quant_format import (  # noqa: F401  (the format's names, re-exported: callers use them from here)
    DEFAULT_GROUP_SIZE,
    DEFAULT_QUANTIZE_OUTPUT,
    GROUP_SIZES,
    MODES,
    QuantConfig,
    check_fit,
    config_from_params,
    is_quantization_part,
    is_quantized,
    make_config,
    needs_whole_rows,
    quantized_shapes,
    scale_key,
    zero_key,
)
from llama.checkpoint import stored_dtype  # noqa: F401

def default_dtype(device: torch.device) -> torch.dtype:
    """Activation dtype of a quantized model when none is given: on the CPU fp32
    where the C step is compiled (it reads int8 and int4 matrices with fp32
    activations, `llama/native.c`), else bf16 (torch's kernels' fast input on
    the CPU; what int4 needs on CUDA)."""
    if torch.device(device).type == "cpu" and native.available():
        return torch.float32
    return torch.bfloat16


# Rows quantized at a time: bounds the fp32 temporaries (~4 MB each) whatever the matrix.
_CHUNK_ELEMENTS = 2**20


def _row_chunks(w: torch.Tensor):
    rows = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
    return range(0, w.shape[0], rows), rows


def quantize_int8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale fp32 (out,)) with w ~ q * scale[:, None]."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    starts, rows = _row_chunks(w)
    for start in starts:
        part = w[start : start + rows].float()
        s = part.abs().amax(dim=1).clamp(min=1e-10) / 127
        scale[start : start + rows] = s
        q[start : start + rows] = torch.round(part / s[:, None]).clamp_(-127, 127)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nibbles uint8 (out, in / 2), scale, zero fp32 (out, in / group_size)) with
    w ~ (q - 8) * scale + zero in each group."""
    rows, cols = w.shape
    nibbles = torch.empty(rows, cols // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(rows, cols // group_size, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    starts, chunk = _row_chunks(w)
    for start in starts:
        part = w[start : start + chunk].float()
        groups = part.reshape(part.shape[0], cols // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        s = ((high - low) / 15).clamp(min=1e-10)
        scale[start : start + chunk] = s
        zero[start : start + chunk] = low + 8 * s
        q = torch.round((groups - low[..., None]) / s[..., None]).clamp_(0, 15).to(torch.uint8)
        q = q.reshape(part.shape[0], cols)
        nibbles[start : start + chunk] = q[:, 0::2] | (q[:, 1::2] << 4)
    return nibbles, scale, zero


def dequantize(parts: Mapping[str, torch.Tensor], key: str, config: QuantConfig) -> torch.Tensor:
    """The fp32 weight that `key`'s quantized parts stand for (for tests and quality checks)."""
    q, scale = parts[key], parts[scale_key(key)]
    if config.mode == "int8":
        return q.float() * scale[:, None]
    values = kernels.unpack_nibbles(q).float()
    rows, cols = values.shape
    groups = values.reshape(rows, cols // config.group_size, config.group_size)
    return ((groups - 8) * scale[..., None] + parts[zero_key(key)][..., None]).reshape(rows, cols)


def quantize_tensor(key: str, w: torch.Tensor, config: QuantConfig) -> Dict[str, torch.Tensor]:
    """`key`'s quantized parts (the Meta key and its scale/zero keys)."""
    if config.mode == "int8":
        q, scale = quantize_int8(w)
        return {key: q, scale_key(key): scale}
    nibbles, scale, zero = quantize_int4(w, config.group_size)
    return {key: nibbles, scale_key(key): scale, zero_key(key): zero}


def converter(config: QuantConfig, dtype: Optional[torch.dtype], model_parallel_size: int):
    """A `convert` for `checkpoint.assemble_rank`: quantizes each weight `config` covers
    (from its values as stored, in fp32), and converts the rest to `dtype`."""

    def convert(key: str, part: torch.Tensor, whole: Callable[[], Tuple[torch.Tensor, Tuple[int, int, int]]]):
        if not is_quantized(key, config):
            return {key: part if dtype is None else part.to(dtype)}
        if not needs_whole_rows(key, config, model_parallel_size):
            parts = quantize_tensor(key, part, config)
        else:
            full, (dim, start, stop) = whole()
            q, scale = quantize_int8(full)
            parts = {key: q.narrow(dim, start, stop - start).contiguous(), scale_key(key): scale}
            del full
        # The temporaries were freed into the heaps of the threads that ran the
        # ops; without this, glibc keeps them and resident memory grows by
        # ~2x the quantized model over a load with 2 threads.
        memory.return_freed_memory()
        return parts

    return convert


def quantize_checkpoint(src, dst, config: QuantConfig, progress: bool = True) -> Path:
    """Write `src` quantized by `config` to `dst` (new or empty), with as many shards as `src`.

    The files are written beside `dst` and renamed into place when complete
    (`llama.atomic.output_dir`): an error, Ctrl-C or SIGTERM leaves `dst` as it was.
    Raises ValueError naming a weight of `src` that is not finite (it would
    make NaN scales), as `checkpoint.load_for_rank` does.
    """
    src, dst = Path(src), Path(dst)
    shards = checkpoint.find_shards(src)
    atomic.require_new_dir(dst)
    params = checkpoint.read_params(src)
    if params.get("quantization") is not None:
        raise ValueError(f"{str(src)!r} is already quantized ({config_from_params(params).describe()})")
    args = family.model_args_of_checkpoint(src, shards)
    n = len(shards)
    check_fit(args, config, [n])
    with atomic.output_dir(dst) as out:
        for rank in range(n):
            part = checkpoint.load_for_rank(
                shards, rank, n, args, progress=progress and rank == 0, convert=converter(config, None, n)
            )
            shard = {k: v.clone() for k, v in part.items()}
            with atomic.writing(n * sum(t.nbytes for t in shard.values())):  # shards are alike in size
                torch.save(shard, out / f"consolidated.{rank:02d}.pth")
            del part, shard
        params["quantization"] = config.to_params()
        (out / "params.json").write_text(json.dumps(params) + "\n")
        if (src / "tokenizer.model").is_file():
            shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
    return dst


def install(model, state_dict: Dict[str, torch.Tensor], config: QuantConfig, device, dtype) -> None:
    """Load a rank's quantized `state_dict` (as `checkpoint.load_for_rank` gives it)
    into `model` (built on `meta`): kernels for the quantized matrices, the rest assigned.

    Consumes `state_dict`: each matrix's parts are dropped once its kernel is made.
    """
    kernels.check_kernel(config.mode, device, dtype)

    def make(keys: List[str]):
        if not is_quantized(keys[0], config):
            return None
        qs = [state_dict.pop(k).to(device) for k in keys]
        scales = [state_dict.pop(scale_key(k)).to(device) for k in keys]
        q = torch.cat(qs) if len(qs) > 1 else qs[0]
        scale = torch.cat(scales) if len(scales) > 1 else scales[0]
        zero = None
        if config.mode == "int4":
            zeros = [state_dict.pop(zero_key(k)).to(device) for k in keys]
            zero = torch.cat(zeros) if len(zeros) > 1 else zeros[0]
        try:
            return kernels.quantized_kernel(config.mode, q, scale, zero, config.group_size, dtype)
        except ValueError as e:
            raise ValueError(f"{', '.join(keys)}: {e}") from None

    def make_and_trim(keys: List[str]):
        kernel = make(keys)
        memory.return_freed_memory()  # the joined parts and packing temporaries
        return kernel

    kernels.install(model, make_and_trim, config.mode)
    checkpoint.load_into(model, state_dict, device, dtype, source="the quantized checkpoint")
    model.quantization = config
    memory.return_freed_memory()

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

A quantized checkpoint keeps Meta's keys: `...wq.weight` holds int8 values
(int8) or two 4-bit values a byte (uint8, (out, in / 2), the even input
column in the low nibble). Next to it are `...wq.weight_scale` (fp32; int8:
(out,), int4: (out, in / group_size)) and, for int4, `...wq.weight_zero`.
`params.json` gains `"quantization": {"mode": ..., "group_size": ...,
"output": true|false}`. `Llama.build` loads it directly.
"""

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from llama.model import ModelArgs, ffn_hidden_dim

# The command line (llama/quantize.py) lists them without importing torch.
from llama.quantize import GROUP_SIZES, MODES  # noqa: E402,F401
# Measured on the 100M shape (benchmarks/quality.py, bench.py): see docs/compressed-weights.md.
DEFAULT_GROUP_SIZE = 32
# Measured: quantizing the output projection costs little (docs/compressed-weights.md), so it is.
DEFAULT_QUANTIZE_OUTPUT = True

_BLOCK_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_ROW_PARALLEL = ("wo", "w2")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    mode: str
    group_size: Optional[int] = None  # int4 only
    output: bool = DEFAULT_QUANTIZE_OUTPUT  # whether the output projection is quantized

    def to_params(self) -> Dict:
        entry = {"mode": self.mode}
        if self.group_size is not None:
            entry["group_size"] = self.group_size
        entry["output"] = self.output
        return entry

    def describe(self) -> str:
        group = f", group size {self.group_size}" if self.group_size else ""
        return f"{self.mode}{group}{'' if self.output else ', output projection unquantized'}"


def make_config(
    quantize: Optional[str], group_size: Optional[int] = None, quantize_output: Optional[bool] = None
) -> Optional[QuantConfig]:
    """The checked configuration for `build(quantize=..., group_size=...)`; None for no quantization."""
    if quantize is None:
        if group_size is not None:
            raise ValueError(f"group_size={group_size} is for quantize='int4'; no quantization was asked for")
        return None
    if quantize not in MODES:
        raise ValueError(f"unknown quantize={quantize!r}; use None, 'int8' or 'int4'")
    if quantize == "int8":
        if group_size is not None:
            raise ValueError("group_size is for int4; int8 is quantized per output channel")
        return QuantConfig("int8", None, DEFAULT_QUANTIZE_OUTPUT if quantize_output is None else quantize_output)
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
    return QuantConfig("int4", group_size, DEFAULT_QUANTIZE_OUTPUT if quantize_output is None else quantize_output)


def config_from_params(params: Mapping, source: str = "params.json") -> Optional[QuantConfig]:
    """The quantization a checkpoint's params.json records, or None."""
    entry = params.get("quantization")
    if entry is None:
        return None
    if not isinstance(entry, dict) or set(entry) - {"mode", "group_size", "output"} or "mode" not in entry:
        raise ValueError(f"{source}: 'quantization' must be {{'mode', 'group_size', 'output'}}, got {entry!r}")
    output = entry.get("output", True)
    if not isinstance(output, bool):
        raise ValueError(f"{source}: quantization 'output' must be true or false, got {output!r}")
    try:
        return make_config(entry["mode"], entry.get("group_size"), output)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def default_dtype(device: torch.device) -> torch.dtype:
    """Activation dtype of a quantized model when none is given: on the CPU fp32
    where the C step is compiled (it reads int8 and int4 matrices with fp32
    activations, `llama/native.c`), else bf16 (torch's kernels' fast input on
    the CPU; what int4 needs on CUDA)."""
    from llama import native

    if torch.device(device).type == "cpu" and native.available():
        return torch.float32
    return torch.bfloat16


def is_quantized(key: str, config: QuantConfig) -> bool:
    """Whether the Meta weight `key` is quantized under `config`."""
    parts = key.split(".")
    if parts[-1] != "weight" or len(parts) < 2:
        return False
    if parts[-2] == "output":
        return config.output
    return parts[-2] in _BLOCK_MATRICES


def scale_key(key: str) -> str:
    return key + "_scale"


def zero_key(key: str) -> str:
    return key + "_zero"


def is_quantization_part(key: str) -> bool:
    """Whether `key` is a scale or zero tensor (kept in fp32 whatever the model's dtype)."""
    return key.endswith(("weight_scale", "weight_zero"))


def quantized_shapes(shapes: Mapping[str, Tuple[int, ...]], config: QuantConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of a checkpoint quantized by `config`, from the unquantized full shapes."""
    out = {}
    for key, shape in shapes.items():
        if not is_quantized(key, config):
            out[key] = shape
            continue
        rows, cols = shape
        if config.mode == "int8":
            out[key] = shape
            out[scale_key(key)] = (rows,)
        else:
            out[key] = (rows, cols // 2)
            out[scale_key(key)] = (rows, cols // config.group_size)
            out[zero_key(key)] = (rows, cols // config.group_size)
    return out


def stored_dtype(key: str, config: QuantConfig) -> Optional[torch.dtype]:
    """The dtype a quantized checkpoint must hold `key` in, or None for a float weight."""
    if is_quantization_part(key):
        return torch.float32
    if is_quantized(key, config):
        return torch.int8 if config.mode == "int8" else torch.uint8
    return None


def check_fit(args: ModelArgs, config: QuantConfig, model_parallel_sizes) -> None:
    """Raise ValueError unless int4 groups divide each quantized matrix's inputs on every size given."""
    if config.mode != "int4":
        return
    head_dim = args.dim // args.n_heads
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    g = config.group_size
    for mp in sorted(set(model_parallel_sizes)):
        inputs = [("dim", args.dim), ("the attention output width (wo's inputs)", args.n_heads * head_dim // mp),
                  ("the feed-forward hidden size (w2's inputs)", hidden // mp)]
        if mp == 1:
            inputs = inputs[:1] + [(n, v) for n, v in inputs[1:]]
        for name, value in inputs:
            if value % g != 0:
                where = "" if mp == 1 else f" on each of {mp} model-parallel ranks"
                fits = [s for s in GROUP_SIZES if value % s == 0]
                hint = f"; group sizes that fit: {', '.join(map(str, fits))}" if fits else ""
                raise ValueError(f"int4 group size {g} does not divide {name} = {value}{where}{hint}")


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
    from llama.kernels import unpack_nibbles

    values = unpack_nibbles(q).float()
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


def needs_whole_rows(key: str, config: QuantConfig, model_parallel_size: int) -> bool:
    """Whether a rank's part of `key` cannot be quantized alone: int8 scales span whole
    rows, which row-parallel matrices (wo, w2) split across ranks."""
    return config.mode == "int8" and model_parallel_size > 1 and key.split(".")[-2] in _ROW_PARALLEL


def converter(config: QuantConfig, dtype: Optional[torch.dtype], model_parallel_size: int):
    """A `convert` for `checkpoint.assemble_rank`: quantizes each weight `config` covers
    (from its values as stored, in fp32), and converts the rest to `dtype`."""

    from llama.checkpoint import return_freed_memory

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
        return_freed_memory()
        return parts

    return convert


def quantize_checkpoint(src, dst, config: QuantConfig, progress: bool = True) -> Path:
    """Write `src` quantized by `config` to `dst` (new or empty), with as many shards as `src`.

    The files are written beside `dst` and renamed into place when complete
    (`llama.atomic.output_dir`): an error, Ctrl-C or SIGTERM leaves `dst` as it was.
    Raises ValueError naming a weight of `src` that is not finite (it would
    make NaN scales), as `checkpoint.load_for_rank` does.
    """
    from llama import atomic, checkpoint

    src, dst = Path(src), Path(dst)
    shards = checkpoint.find_shards(src)
    atomic.require_new_dir(dst)
    params = checkpoint.read_params(src)
    if params.get("quantization") is not None:
        raise ValueError(f"{str(src)!r} is already quantized ({config_from_params(params).describe()})")
    args = checkpoint.model_args_of_checkpoint(src, shards)
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
    from llama import checkpoint, kernels, native

    kernels.check_kernel(config.mode, device, dtype)

    def make(keys: List[str]):
        if not is_quantized(keys[0], config):
            return None
        qs = [state_dict.pop(k).to(device) for k in keys]
        scales = [state_dict.pop(scale_key(k)).to(device) for k in keys]
        q = torch.cat(qs) if len(qs) > 1 else qs[0]
        scale = torch.cat(scales) if len(scales) > 1 else scales[0]
        if config.mode == "int8":
            return kernels.Int8Linear(q, scale, dtype)
        zeros = [state_dict.pop(zero_key(k)).to(device) for k in keys]
        zero = torch.cat(zeros) if len(zeros) > 1 else zeros[0]
        if torch.device(device).type == "cpu" and dtype == torch.float32 and native.available():
            return kernels.NativeInt4Linear(q, scale, zero, config.group_size)  # read by C (llama/native.c)
        if device.type == "cpu" and q.shape[0] % 16 != 0:
            raise ValueError(
                f"int4 on CPU needs each rank's output rows in multiples of 16; {', '.join(keys)} "
                f"have {q.shape[0]} here"
            )
        return kernels.Int4Linear(q, scale, zero, config.group_size, dtype)

    def make_and_trim(keys: List[str]):
        kernel = make(keys)
        checkpoint.return_freed_memory()  # the joined parts and packing temporaries
        return kernel

    kernels.install(model, make_and_trim)
    checkpoint.load_into(model, state_dict, device, dtype, source="the quantized checkpoint")
    model.quantization = config
    checkpoint.return_freed_memory()

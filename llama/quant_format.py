"""The quantized checkpoint format, and the choices that describe it; no torch.

A quantized checkpoint keeps Meta's keys: `...wq.weight` holds int8 values
(int8) or two 4-bit values a byte (uint8, (out, in / 2), the even input
column in the low nibble). Next to it are `...wq.weight_scale` (fp32; int8:
(out,), int4: (out, in / group_size)) and, for int4, `...wq.weight_zero`.
`params.json` gains `"quantization": {"mode": ..., "group_size": ...,
"output": true|false}`. The arithmetic that makes these tensors, and the
kernels that read them, are in `llama/quantization.py` and `llama/kernels.py`;
this module sits below the checkpoint reader (`llama/checkpoint.py`), which
checks a quantized checkpoint's keys and shapes with it, and below the
command line (`python -m llama.quantize`), which lists the modes without torch.
"""

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from llama.args import ModelArgs, ffn_hidden_dim

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
# Measured on the 100M shape (benchmarks/quality.py, bench.py): see docs/compressed-weights.md.
DEFAULT_GROUP_SIZE = 32
# Measured: quantizing the output projection costs little (docs/compressed-weights.md), so it is.
DEFAULT_QUANTIZE_OUTPUT = True

_BLOCK_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_ROW_PARALLEL = ("wo", "w2")


@dataclass(frozen=True)
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


def needs_whole_rows(key: str, config: QuantConfig, model_parallel_size: int) -> bool:
    """Whether a rank's part of `key` cannot be quantized alone: int8 scales span whole
    rows, which row-parallel matrices (wo, w2) split across ranks."""
    return config.mode == "int8" and model_parallel_size > 1 and key.split(".")[-2] in _ROW_PARALLEL

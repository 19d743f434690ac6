"""Meta-format checkpoints: finding the shards, reading params.json, strict loading.

A checkpoint directory holds `params.json` and one `consolidated.NN.pth` per
model-parallel shard. Shards are read with `weights_only=True` and
memory-mapped, and their tensors are assigned to a model built on the `meta`
device, so loading holds one copy of the weights, not two.
"""

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from llama.model import ModelArgs

# Older Meta checkpoints carry the rotary table; the model computes its own.
IGNORED_KEYS = ("rope.freqs",)

# Meta's model-parallel layout: the dimension each weight is split on across
# shards. Column-parallel layers (and the output) split their output rows,
# row-parallel layers and the embedding split their input columns; the norms
# are replicated in every shard.
_SPLIT_DIMS = {
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "output": 0,
    "wo": 1,
    "w2": 1,
    "tok_embeddings": 1,
}


def split_dim(key: str) -> Optional[int]:
    """The dimension `key` is split on across model-parallel shards, or None if replicated."""
    parts = key.split(".")
    if len(parts) < 2 or parts[-1] != "weight":
        raise ValueError(f"not a Llama weight name: {key!r}")
    return _SPLIT_DIMS.get(parts[-2])

_PARAM_TYPES = {
    "dim": int,
    "n_layers": int,
    "n_heads": int,
    "n_kv_heads": (int, type(None)),
    "vocab_size": int,
    "multiple_of": int,
    "ffn_dim_multiplier": (int, float, type(None)),
    "norm_eps": (int, float),
    "max_batch_size": int,
    "max_seq_len": int,
    "rope_theta": (int, float),
}


def find_shards(ckpt_dir) -> List[Path]:
    """The `*.pth` files of `ckpt_dir`, sorted by name (shard order)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {str(ckpt_dir)!r}")
    shards = sorted(ckpt_dir.glob("*.pth"))
    if not shards:
        raise FileNotFoundError(f"no checkpoint files (*.pth) in {str(ckpt_dir)!r}")
    return shards


def read_params(ckpt_dir) -> Dict:
    """The checked contents of `ckpt_dir/params.json`."""
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"params.json not found in {str(ckpt_dir)!r}")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(params).__name__}")
    for key, value in params.items():
        if key not in _PARAM_TYPES:
            known = ", ".join(sorted(_PARAM_TYPES))
            raise ValueError(f"{str(path)!r}: unknown field {key!r} (known fields: {known})")
        if isinstance(value, bool) or not isinstance(value, _PARAM_TYPES[key]):
            raise ValueError(f"{str(path)!r}: field {key!r} has the wrong type: {value!r}")
    for key in ("dim", "n_layers", "n_heads"):
        if key in params and params[key] <= 0:
            raise ValueError(f"{str(path)!r}: {key} must be positive, got {params[key]}")
    return params


def model_args_from_params(params: Mapping, **overrides) -> ModelArgs:
    """`ModelArgs` from params.json fields, then `overrides` (max_seq_len, ...)."""
    args = ModelArgs(**{**params, **overrides})
    n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
    if args.dim % args.n_heads != 0:
        raise ValueError(f"dim {args.dim} is not a multiple of n_heads {args.n_heads}")
    if (args.dim // args.n_heads) % 2 != 0:
        raise ValueError(f"head size {args.dim // args.n_heads} must be even for rotary embeddings")
    if n_kv_heads <= 0 or args.n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads {args.n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    return args


def check_model_parallel_fit(args: ModelArgs, model_parallel_size: int) -> None:
    """Raise ValueError unless every split dimension divides by the MP size."""
    n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
    for name, value in (("n_heads", args.n_heads), ("n_kv_heads", n_kv_heads), ("dim", args.dim)):
        if value % model_parallel_size != 0:
            raise ValueError(
                f"{name} = {value} cannot be split over a model-parallel size of {model_parallel_size}"
            )


@contextlib.contextmanager
def init_on_meta():
    """Build modules with every parameter on the `meta` device: no memory, no init.

    `with torch.device("meta")` alone is not enough: fairscale's parallel
    layers allocate with the legacy `torch.Tensor(rows, cols)` constructor,
    which ignores the default device, so parameters are moved as they are
    registered.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Module.register_parameter = original


def load_shard(path) -> Dict[str, torch.Tensor]:
    """A shard's state dict, memory-mapped, with `weights_only=True`."""
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ValueError(f"cannot read checkpoint shard {str(path)!r}: {e}") from e
    if not isinstance(state_dict, dict):
        raise ValueError(f"checkpoint shard {str(path)!r} does not hold a state dict")
    return state_dict


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ValueError naming each missing, unexpected or misshaped weight."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items() if k not in IGNORED_KEYS}
    problems = []
    for key in sorted(expected.keys() - got.keys()):
        problems.append(f"missing {key} (expected shape {expected[key]})")
    for key in sorted(got.keys() - expected.keys()):
        problems.append(f"unexpected {key} (shape {got[key]})")
    for key in sorted(expected.keys() & got.keys()):
        if expected[key] != got[key]:
            problems.append(f"{key} has shape {got[key]} in the checkpoint, the model expects {expected[key]}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"checkpoint {source} does not fit the model:\n  {shown}{more}")


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    source: str,
) -> None:
    """Strictly load `state_dict` into `model` (built on `meta`) by assignment.

    Each tensor is moved to `device` and `dtype` one at a time; where it is
    already there (fp32 on disk, fp32 on CPU) it is used as it is, mmap and all.
    """
    check_state_dict(model, state_dict, source)
    converted = {}
    for key, tensor in state_dict.items():
        if key in IGNORED_KEYS:
            continue
        converted[key] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(converted, strict=True, assign=True)


def params_dict(args: ModelArgs) -> Dict:
    """params.json fields for `args`, as Meta writes them (no runtime fields)."""
    fields = dataclasses.asdict(args)
    for runtime_only in ("max_batch_size", "max_seq_len"):
        fields.pop(runtime_only)
    if fields["n_kv_heads"] is None:
        fields.pop("n_kv_heads")
    if fields["ffn_dim_multiplier"] is None:
        fields.pop("ffn_dim_multiplier")
    if fields["rope_theta"] == 10000.0:
        fields.pop("rope_theta")
    return fields

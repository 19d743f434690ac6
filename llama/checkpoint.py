"""Meta-format checkpoints: finding the shards, reading params.json, strict loading.

A checkpoint directory holds `params.json` and one `consolidated.NN.pth` per
model-parallel shard. Shards are read with `weights_only=True` and
memory-mapped, and their tensors are assigned to a model built on the `meta`
device, so loading holds one copy of the weights, not two.
"""

import contextlib
import dataclasses
import json
import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from llama.atomic import require_new_dir  # noqa: F401  (the tools import it from here)
from llama import memory, quant_format
from llama.args import (  # noqa: F401  (the tools call the fit checks from here)
    ModelArgs,
    check_model_parallel_fit,
    ffn_hidden_dim,
    is_positive_finite,
    model_parallel_problem,
    valid_model_parallel_sizes,
)

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


def split_dim(key: str, tok_embeddings_split_dim: int = 1, ndim: int = 2) -> Optional[int]:
    """The dimension `key` (of `ndim` dimensions) is split on across model-parallel
    shards, or None if replicated.

    The embedding's depends on the family (`ModelArgs.tok_embeddings_split_dim`):
    Llama 2 splits its columns, Llama 3 its vocabulary rows. A quantized
    weight's scales and zeros (`...weight_scale`, `...weight_zero`) split like
    their weight where they have that dimension: an int8 scale, one per
    output row, is replicated for a row-parallel matrix.
    """
    parts = key.split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "weight_scale", "weight_zero"):
        raise ValueError(f"not a Llama weight name: {key!r}")
    if parts[-2] == "tok_embeddings":
        return tok_embeddings_split_dim
    dim = _SPLIT_DIMS.get(parts[-2])
    return None if dim is None or dim >= ndim else dim

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
    "use_scaled_rope": bool,
    "rope_scaling_factor": (int, float),
    # Not Meta's: written by `python -m llama.quantize` (see llama/quantization.py).
    "quantization": dict,
}
# The rotary options this library implements; any other params.json field
# naming rope is an option it would silently ignore, so it is refused.
ROPE_FIELDS = ("rope_theta", "use_scaled_rope", "rope_scaling_factor")


def stored_dtype(key: str, config: quant_format.QuantConfig) -> Optional[torch.dtype]:
    """The dtype a quantized checkpoint must hold `key` in, or None for a float weight."""
    if quant_format.is_quantization_part(key):
        return torch.float32
    if quant_format.is_quantized(key, config):
        return torch.int8 if config.mode == "int8" else torch.uint8
    return None


def find_shards(ckpt_dir) -> List[Path]:
    """The `*.pth` files of `ckpt_dir`, sorted by name (shard order).

    Raises FileNotFoundError for a missing directory or no shard, and
    ValueError for a shard that is not a regular file (a FIFO would block
    the load forever).
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(_not_a_checkpoint(ckpt_dir))
    shards = sorted(ckpt_dir.glob("*.pth"))
    if not shards:
        raise FileNotFoundError(_not_a_checkpoint(ckpt_dir))
    for shard in shards:
        require_regular_file(shard, "checkpoint shard")
    return shards


def _not_a_checkpoint(path: Path) -> str:
    """Why `path` is not a Meta checkpoint directory, and what to pass instead."""
    if not path.exists():
        return f"checkpoint directory not found: {str(path)!r}"
    if not path.is_dir():
        return f"{str(path)!r} is a file; pass the directory that holds params.json and consolidated.00.pth"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return (
            f"{str(path)!r} is a HuggingFace checkpoint: convert it with "
            f"`python -m llama.convert_hf to-meta {path} {path.name}-meta` and use that directory"
        )
    models = sorted(sub.name for sub in path.iterdir() if sub.is_dir() and any(sub.glob("*.pth")))
    if models:
        return (
            f"{str(path)!r} holds model folders, not a checkpoint: {', '.join(models)}; "
            f"pass one of them, e.g. {str(path / models[0])!r}"
        )
    return f"no checkpoint files (*.pth) in {str(path)!r}"


def require_regular_file(path, what: str) -> None:
    """Raise ValueError unless `path` is a regular file (following links), and
    FileNotFoundError when it is absent. Reading a FIFO or a device would block
    or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {str(path)!r}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {str(path)!r} is not a regular file (a FIFO, device or directory?)")


def check_params(params, source: str) -> Dict:
    """Raise ValueError, naming `source` and the field, unless `params` is a
    params.json object this library can build: known fields of the right
    types, sizes positive, norm_eps, rope_theta, ffn_dim_multiplier and
    rope_scaling_factor finite and positive. Returns `params`."""
    if not isinstance(params, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(params).__name__}")
    for key, value in params.items():
        if key not in _PARAM_TYPES:
            if "rope" in key.lower():
                raise ValueError(
                    f"{source}: unknown rope option {key!r}={value!r}; this library implements "
                    f"{', '.join(ROPE_FIELDS)} (Meta's Llama 3.1 scaling) and nothing else, so it "
                    "cannot run this checkpoint as it was trained"
                )
            known = ", ".join(sorted(_PARAM_TYPES))
            raise ValueError(f"{source}: unknown field {key!r} (known fields: {known})")
        expected = _PARAM_TYPES[key]
        wrong = not isinstance(value, bool) if expected is bool else (
            isinstance(value, bool) or not isinstance(value, expected)
        )
        if wrong:
            raise ValueError(f"{source}: field {key!r} has the wrong type: {value!r}")
    for key in ("dim", "n_layers", "n_heads", "multiple_of", "max_batch_size", "max_seq_len"):
        if key in params and params[key] <= 0:
            raise ValueError(f"{source}: {key} must be positive, got {params[key]}")
    if params.get("n_kv_heads") is not None and params["n_kv_heads"] <= 0:
        raise ValueError(f"{source}: n_kv_heads must be positive, got {params['n_kv_heads']}")
    if "vocab_size" in params and params["vocab_size"] <= 0 and params["vocab_size"] != -1:
        raise ValueError(f"{source}: vocab_size must be positive, or -1 for the tokenizer's, got {params['vocab_size']}")
    # NaN, inf, 0 or a negative epsilon or base make every output NaN or
    # gibberish; json reads NaN and Infinity, so they are checked here.
    for key in ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scaling_factor"):
        if params.get(key) is not None and not is_positive_finite(params[key]):
            raise ValueError(f"{source}: {key} must be positive and finite, got {params[key]!r}")
    if "rope_scaling_factor" in params and not params.get("use_scaled_rope"):
        raise ValueError(
            f"{source}: rope_scaling_factor is set but use_scaled_rope is not true; "
            "the factor only applies to the scaled rotary embedding"
        )
    return params


def read_params(ckpt_dir) -> Dict:
    """The checked contents of `ckpt_dir/params.json`."""
    path = Path(ckpt_dir) / "params.json"
    if not path.exists():
        raise FileNotFoundError(f"params.json not found in {str(ckpt_dir)!r}")
    require_regular_file(path, "params.json")
    return check_params(read_json(path), repr(str(path)))


def read_json(path) -> object:
    """The JSON value in `path`; ValueError naming the file for anything unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
    except RecursionError:
        raise ValueError(f"{str(path)!r} is nested too deeply to be a config file") from None


def full_shapes(args: ModelArgs, quant: Optional["quant_format.QuantConfig"] = None) -> Dict[str, Tuple[int, ...]]:
    """Every weight of an unsplit (MP=1) model and its shape, in state-dict order
    (of a checkpoint quantized by `quant`, with its scales, where given)."""
    if quant is not None:
        return quant_format.quantized_shapes(full_shapes(args), quant)
    head_dim = args.dim // args.n_heads
    q_width, kv_width = args.n_heads * head_dim, args.kv_heads() * head_dim
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (q_width, args.dim)
        shapes[p + "attention.wk.weight"] = (kv_width, args.dim)
        shapes[p + "attention.wv.weight"] = (kv_width, args.dim)
        shapes[p + "attention.wo.weight"] = (args.dim, q_width)
        shapes[p + "feed_forward.w1.weight"] = (hidden, args.dim)
        shapes[p + "feed_forward.w2.weight"] = (args.dim, hidden)
        shapes[p + "feed_forward.w3.weight"] = (hidden, args.dim)
        shapes[p + "attention_norm.weight"] = (args.dim,)
        shapes[p + "ffn_norm.weight"] = (args.dim,)
    shapes["norm.weight"] = (args.dim,)
    shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def n_weights(args: ModelArgs) -> int:
    """len(full_shapes(args)), without listing them: 9 a layer, plus embedding, norm and output."""
    return 9 * args.n_layers + 3


def shard_range(key: str, full_shape: Sequence[int], args: ModelArgs, model_parallel_size: int, rank: int):
    """(dim, start, stop): the part of the full tensor `key` that `rank` holds, or None if replicated."""
    dim = split_dim(key, args.tok_embeddings_split_dim, len(full_shape))
    if dim is None:
        return None
    n_kv_heads = args.kv_heads()
    if key.endswith(("attention.wk.weight", "attention.wv.weight")) and model_parallel_size > n_kv_heads:
        # Fewer KV heads than ranks: every rank holds the one KV head that its
        # query heads (rank * n_heads / mp onwards) are grouped with.
        head_dim = args.dim // args.n_heads
        head = rank * n_kv_heads // model_parallel_size
        return dim, head * head_dim, (head + 1) * head_dim
    size = full_shape[dim] // model_parallel_size
    return dim, rank * size, (rank + 1) * size


def _local_shape(full_shape: Sequence[int], part) -> Tuple[int, ...]:
    if part is None:
        return tuple(full_shape)
    dim, start, stop = part
    return tuple(stop - start if d == dim else n for d, n in enumerate(full_shape))


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
    """A shard's state dict, memory-mapped, with `weights_only=True`.

    Raises ValueError naming the file (and the key) for a file that is not a
    regular file or not a checkpoint, and for a value that is not a dense tensor.
    """
    require_regular_file(path, "checkpoint shard")
    return _open_shard(path)


def _open_shard(path) -> Dict[str, torch.Tensor]:
    """A shard's state dict, memory-mapped (no tensor's bytes are read), checked
    to be weight names and dense tensors before anything looks into it."""
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ValueError(f"cannot read checkpoint shard {str(path)!r}: {e}") from e
    if not isinstance(state_dict, dict):
        raise ValueError(f"checkpoint shard {str(path)!r} does not hold a state dict")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ValueError(
                f"checkpoint shard {str(path)!r}: holds a key {key!r} ({type(key).__name__}), not a weight name"
            )
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"checkpoint shard {str(path)!r}: {key!r} holds a {type(value).__name__}, not a tensor "
                "(a state dict holds weights only)"
            )
        if value.layout != torch.strided:
            raise ValueError(
                f"checkpoint shard {str(path)!r}: {key!r} is a {value.layout} tensor; weights must be dense"
            )
    return state_dict


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_layer_count(keys, n_layers: int, source, field: str = "n_layers") -> None:
    """Raise ValueError when the layers named in `keys` are not 0 .. n_layers - 1.

    Run before listing every key the config implies, so that a huge layer
    count in a config fails at once rather than building millions of names.
    """
    layers = {int(m.group(1)) for key in keys if (m := _LAYER_INDEX.search(key))}
    if layers != set(range(len(layers))) or len(layers) != n_layers:
        found = f"layers 0 to {max(layers)} ({len(layers)} distinct)" if layers else "no layers"
        raise ValueError(f"{field} is {n_layers} in the config, but {str(source)!r} holds {found}")


def shard_tensor_shape(path, key: str) -> Optional[Tuple[int, ...]]:
    """The shape of `key` in a shard (None if absent), from its header alone.

    The file is memory-mapped and the tensor's bytes are never touched, so
    this reads a few kilobytes of a shard of any size. Used to tell a
    checkpoint's family before loading; `load_shard` is for loading. Raises
    ValueError as `load_shard` does for contents that are not weights.
    """
    tensor = _open_shard(path).get(key)
    return None if tensor is None else tuple(tensor.shape)


# Loading more bytes than this shows a progress bar (on the rank asked to).
PROGRESS_MIN_BYTES = 256 * 2**20

# Opens shard `index`: its state dict and a name for messages.
ShardSource = Callable[[int], Tuple[Mapping[str, torch.Tensor], str]]


def load_for_rank(
    shards: Sequence[Path],
    rank: int,
    model_parallel_size: int,
    args: ModelArgs,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    progress_min_bytes: int = PROGRESS_MIN_BYTES,
    mmap: bool = True,
    mapped_files: Optional["memory.MappedFiles"] = None,
    quant: Optional["quant_format.QuantConfig"] = None,
    convert: Optional[Callable] = None,
    check_all_weights: bool = False,
) -> Dict[str, torch.Tensor]:
    """Model-parallel rank `rank`'s state dict out of a checkpoint of any shard count.

    `shards` (k files, Meta's layout) are resharded for `model_parallel_size`
    (n) ranks, where one of k and n divides the other: a rank concatenates
    its k / n shards, or slices its part out of one shard. KV heads are
    replicated when there are fewer than ranks. Only the shards this rank
    needs are opened, memory-mapped, so only the bytes it takes are read.
    A tensor that needs no change is returned as the mapped tensor itself,
    else it is sliced, joined and converted to `device` and `dtype` (None:
    keep) one tensor at a time. With `progress`, a bar over the tensors is
    shown when the shards this rank reads hold `progress_min_bytes` or more.
    With `mmap=False` the unchanged tensors are copied too, so that nothing
    returned reads the files afterwards. `mapped_files`, if given, learns
    where each opened shard is mapped (see `memory.MappedFiles`).
    Every tensor that is copied is checked for NaN and inf on the way (the
    copy is in cache then); `check_all_weights` checks the mapped ones too,
    which reads the whole of this rank's part of the checkpoint.

    `quant` is the quantization the checkpoint holds (its params.json
    entry): its integer weights and fp32 scales are kept as they are, only
    float weights go to `dtype`. `convert(key, part, whole)` (see
    `quantization.converter`), where given, replaces each tensor by the dict it
    returns, one tensor at a time (`whole()` gives the unsplit tensor and
    the (dim, start, stop) of this rank's part in it).

    Raises ValueError when the sizes do not fit (naming sizes that do), for
    a shard that cannot be read, for a shard whose keys or shapes do not
    match params.json and the tokenizer, and for a weight that is not finite.
    """
    if not shards:
        raise FileNotFoundError("no checkpoint shards given")
    home = _home_shards(args, len(shards), model_parallel_size, rank)
    home_bytes = sum(os.path.getsize(shards[index]) for index in home)
    # The layer count is compared with a real shard before every expected key
    # is listed: a params.json claiming a million layers fails at once.
    opened_first = {home[0]: load_shard(shards[home[0]])}
    check_layer_count(opened_first[home[0]], args.n_layers, shards[home[0]])
    shapes = full_shapes(args, quant)

    def open_shard(index: int):
        state_dict = opened_first.pop(index) if index in opened_first else load_shard(shards[index])
        tie_output(state_dict, args, len(shards), shards[index])
        _check_keys(state_dict, shapes, shards[index])
        if mapped_files is not None:
            mapped_files.add(shards[index], state_dict.values())
        return state_dict, repr(str(shards[index]))

    bar = _progress_bar(len(shapes), enabled=progress and home_bytes >= progress_min_bytes)
    try:
        return assemble_rank(
            open_shard,
            len(shards),
            rank,
            model_parallel_size,
            args,
            device,
            dtype,
            bar,
            release_copied=True,
            copy_unchanged=not mmap,
            check_all_weights=check_all_weights,
            quant=quant,
            convert=convert,
        )
    finally:
        bar(None)


def assemble_rank(
    open_shard: ShardSource,
    n_shards: int,
    rank: int,
    model_parallel_size: int,
    args: ModelArgs,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    on_tensor: Callable[[int], None] = lambda count: None,
    release_copied: bool = False,
    copy_unchanged: bool = False,
    quant: Optional["quant_format.QuantConfig"] = None,
    convert: Optional[Callable] = None,
    check_all_weights: bool = False,
) -> Dict[str, torch.Tensor]:
    """`load_for_rank` over any source of shards: `open_shard(i)` is called once
    for each shard `rank` needs. Unchanged tensors are returned as they are
    (views, for slices along dim 0), or copied with `copy_unchanged`;
    `on_tensor(1)` is called after each.
    `release_copied` is for memory-mapped shards only: once a tensor has
    been copied out of one, its pages are dropped from resident memory.
    `quant` and `convert` are as for `load_for_rank`.
    Copied tensors (all, with `check_all_weights`) are checked to be finite."""
    shapes = full_shapes(args, quant)
    if quant is not None:
        quant_format.check_fit(args, quant, [n_shards, model_parallel_size])
    # Parts are looked for in this rank's own shards first, so that
    # replicated KV heads and norms come from a shard it reads anyway.
    home = _home_shards(args, n_shards, model_parallel_size, rank)
    search_order = home + [index for index in range(n_shards) if index not in home]
    opened: Dict[int, Tuple[Mapping[str, torch.Tensor], str]] = {}

    def piece(index: int, key: str, part_in_shard) -> torch.Tensor:
        if index not in opened:
            opened[index] = open_shard(index)
        state_dict, name = opened[index]
        tensor = state_dict[key]
        expected = _local_shape(shapes[key], shard_range(key, shapes[key], args, n_shards, index))
        if tuple(tensor.shape) != expected:
            hint = ""
            if key == "tok_embeddings.weight":
                split = args.tok_embeddings_split_dim
                full = shapes[key]
                other_layout = tuple(n // n_shards if d == 1 - split else n for d, n in enumerate(full))
                if n_shards > 1 and tuple(tensor.shape) == other_layout:
                    # The embedding fits but for its split axis: another family's layout.
                    hint = (
                        f" (this checkpoint's embedding is split on dim {1 - split}, where this "
                        f"model family splits it on dim {split}: wrong tokenizer for this model?)"
                    )
                elif tensor.shape[0] != expected[0]:
                    # Rows are the vocabulary, whose size comes from the tokenizer.
                    hint = " (the vocabulary size comes from the tokenizer: wrong tokenizer for this model?)"
            raise ValueError(
                f"{key} has shape {tuple(tensor.shape)} in {name}, but shard {index} of "
                f"{n_shards} of the model in params.json has {expected}{hint}"
            )
        if part_in_shard is None:
            return tensor
        dim, start, stop = part_in_shard
        return tensor.narrow(dim, start, stop - start)

    state_dict = {}
    for key, shape in shapes.items():
        want = shard_range(key, shape, args, model_parallel_size, rank)
        if want is None:  # replicated: every shard has it whole
            parts = [(search_order[0], None)]
        else:
            parts = _pieces(key, want, shape, args, n_shards, search_order)
        # Integer weights and fp32 scales of a quantized checkpoint stay as
        # stored; so does everything that `convert` will see.
        keep = convert is not None or (quant is not None and stored_dtype(key, quant) is not None)
        stored = [piece(index, key, part) for index, part in parts]
        joined = _join(stored, want, device, None if keep else dtype)
        if quant is not None and stored_dtype(key, quant) not in (None, joined.dtype):
            raise ValueError(f"{key} is {joined.dtype} in the checkpoint; its quantization needs "
                             f"{stored_dtype(key, quant)}")
        if copy_unchanged and any(_same_storage(opened[index][0][key], joined) for index, _ in parts):
            joined = joined.clone()  # mmap=False: nothing returned reads the file
        copied_from = [
            index
            for index, _ in parts
            if opened[index][0][key].untyped_storage().data_ptr() != joined.untyped_storage().data_ptr()
        ]
        names = " and ".join(opened[index][1] for index, _ in parts)
        # What `convert` reads whole anyway, and a quantized checkpoint's scales and
        # zeros (small, and NaN there would only show at the first decoding step),
        # are checked whether copied or not.
        is_scale = quant is not None and quant_format.is_quantization_part(key)
        if (copied_from or check_all_weights or convert is not None or is_scale) and joined.is_floating_point():
            require_finite(joined, key, names, stored)
        if convert is None:
            state_dict[key] = joined
        else:

            def whole(key=key, shape=shape, want=want):
                dim = split_dim(key, args.tok_embeddings_split_dim, len(shape))
                everything = (dim, 0, shape[dim])
                pieces = _pieces(key, everything, shape, args, n_shards, list(range(n_shards)))
                return _join([piece(i, key, part) for i, part in pieces], everything, device, None), want

            converted = convert(key, joined, whole)
            for name, tensor in converted.items():
                # A float weight `convert` put in another dtype may overflow it.
                if tensor.is_floating_point() and tensor.dtype != joined.dtype and name == key:
                    require_finite(tensor, name, names, [joined])
            state_dict.update(converted)
        if release_copied:
            for index, _ in parts:
                source = opened[index][0][key]
                if key not in state_dict or (
                    source.untyped_storage().data_ptr() != state_dict[key].untyped_storage().data_ptr()
                ):
                    memory.release_pages(source)
        on_tensor(1)
    return state_dict


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _home_shards(args: ModelArgs, n_shards: int, model_parallel_size: int, rank: int) -> List[int]:
    """The shards that hold `rank`'s query heads: the ones it reads in any case.

    Raises ValueError first if the shard count does not fit the model or the
    model-parallel size.
    """
    problem = model_parallel_problem(args, n_shards)
    if problem is not None:
        raise ValueError(
            f"the checkpoint's {n_shards} shard(s) do not fit the model in params.json: {problem}"
        )
    check_model_parallel_fit(args, model_parallel_size, n_shards=n_shards)
    if not 0 <= rank < model_parallel_size:
        raise ValueError(f"rank {rank} is outside the model-parallel size {model_parallel_size}")
    if n_shards >= model_parallel_size:
        per_rank = n_shards // model_parallel_size
        return list(range(rank * per_rank, (rank + 1) * per_rank))
    return [rank * n_shards // model_parallel_size]


def _pieces(key, want, shape, args, n_shards, search_order):
    """(shard, part of that shard) pairs that together make the range `want`."""
    dim, start, stop = want
    pieces = []
    while start < stop:
        for index in search_order:
            _, lo, hi = shard_range(key, shape, args, n_shards, index)
            if lo <= start < hi:
                end = min(stop, hi)
                pieces.append((index, (dim, start - lo, end - lo)))
                start = end
                break
        else:  # cannot happen for Meta's layout: the shards cover every row
            raise ValueError(f"no shard holds rows {start}:{stop} of {key}")
    return pieces


def _join(pieces: List[torch.Tensor], want, device, dtype) -> torch.Tensor:
    """One tensor from its pieces, on `device` in `dtype`, copied only when it must be."""
    pieces = [p.to(device=device, dtype=dtype) for p in pieces]
    if len(pieces) > 1:
        return torch.cat(pieces, dim=want[0])
    # A slice across columns (dim 1) is strided: give the layer a dense copy.
    return pieces[0].contiguous()


def require_finite(tensor: torch.Tensor, key: str, source: str, stored: Sequence[torch.Tensor] = ()) -> None:
    """Raise ValueError if the floating-point `tensor` holds NaN or inf.

    One read of the tensor in its own dtype and nothing allocated: min and
    max are NaN if any element is, and +-inf if any element is. `stored`
    are the tensors `tensor` was converted (and joined) from, read only when
    it is not finite: finite there, the weight is healthy and only too large
    for the new dtype (a bf16 weight above 65504 in float16), which the
    error says rather than calling the checkpoint damaged.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    largest = _largest_if_finite(stored, tensor.dtype)
    if largest is not None:
        name = str(tensor.dtype).removeprefix("torch.")
        wider = "bfloat16 or float32" if tensor.dtype == torch.float16 else "float32"
        raise ValueError(
            f"{key} in {source} has values up to {largest:g} in magnitude, beyond {name}'s range "
            f"({torch.finfo(tensor.dtype).max:g}): in {name} they would be infinite. The weight is fine as "
            f"stored ({str(stored[0].dtype).removeprefix('torch.')}); load or convert it in {wider} instead "
            "(Llama.build(dtype=...), the tools' --dtype)"
        )
    n_nan, n_inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
    if quant_format.is_quantization_part(key):
        # Quantizing finite weights gives finite scales and zeros: not a model that diverged.
        weight, kind = key.rsplit("_", 1)
        why = (
            f"{weight}'s {kind}s are not finite, as quantizing never makes them, so the quantized checkpoint "
            "is damaged; quantize it again from the unquantized checkpoint (python -m llama.quantize)"
        )
    else:
        why = "the checkpoint is damaged (or was saved from a diverged model)"
    raise ValueError(f"{key} in {source} holds {n_nan} NaN and {n_inf} infinite value(s) of {tensor.numel()}: {why}")


def _largest_if_finite(stored: Sequence[torch.Tensor], converted_to: torch.dtype) -> Optional[float]:
    """The largest magnitude in `stored` when they are all finite, of another
    floating dtype than `converted_to`; else None."""
    if not stored or not all(t.is_floating_point() and t.dtype != converted_to for t in stored):
        return None
    largest = 0.0
    for t in stored:
        if t.numel() == 0:
            continue
        low, high = (float(v) for v in torch.aminmax(t))
        if not (math.isfinite(low) and math.isfinite(high)):
            return None
        largest = max(largest, -low, high)
    return largest


def tie_output(state_dict: Dict[str, torch.Tensor], args: ModelArgs, n_shards: int, path) -> None:
    """Use the embedding as the output where a shard has no `output.weight` (and says so).

    Llama 3.2 1B and 3B tie the two; Meta's files still hold a copy, but a
    converted checkpoint may not. The two are laid out alike (vocabulary
    rows, split on dim 0) in a single shard or in Llama 3's layout; in
    Llama 2's column-split layout they are not, and the weight stays missing.
    """
    if "output.weight" in state_dict or "tok_embeddings.weight" not in state_dict:
        return
    if n_shards > 1 and split_dim("output.weight") != args.tok_embeddings_split_dim:
        return
    print(
        f"note: {str(path)!r} has no output.weight; using tok_embeddings.weight as the output "
        "(tied embeddings, as in Llama 3.2 1B and 3B)",
        file=sys.stderr,
    )
    state_dict["output.weight"] = state_dict["tok_embeddings.weight"]


def _check_keys(state_dict: Mapping[str, torch.Tensor], shapes: Mapping, path) -> None:
    keys = set(state_dict) - set(IGNORED_KEYS)
    missing, unexpected = sorted(shapes.keys() - keys), sorted(keys - shapes.keys())
    if missing or unexpected:
        problems = [f"missing {k} (full shape {shapes[k]})" for k in missing[:10]]
        problems += [f"unexpected {k} (shape {tuple(state_dict[k].shape)})" for k in unexpected[:10]]
        raise ValueError(
            f"checkpoint shard {str(path)!r} does not match params.json ({len(missing)} missing, "
            f"{len(unexpected)} unexpected weights):\n  " + "\n  ".join(problems)
        )


def _progress_bar(total: int, enabled: bool) -> Callable[[Optional[int]], None]:
    """A callback that advances a bar over `total` tensors (None closes it); a no-op when not enabled."""
    if not enabled:
        return lambda nbytes: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="tensor", desc="Loading weights")

    def advance(count: Optional[int]) -> None:
        if count is None:
            bar.close()
        else:
            bar.update(count)

    return advance


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
    A tensor that is copied is checked to be finite (ValueError if not).
    """
    check_state_dict(model, state_dict, source)
    converted = {}
    for key, tensor in state_dict.items():
        if key in IGNORED_KEYS:
            continue
        converted[key] = tensor.to(device=device, dtype=dtype)
        if converted[key] is not tensor:
            require_finite(converted[key], key, source, [tensor])
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
    if not fields["use_scaled_rope"]:
        fields.pop("use_scaled_rope")
    if fields["rope_scaling_factor"] is None:
        fields.pop("rope_scaling_factor")
    fields.pop("tok_embeddings_split_dim")  # follows from the family, not a params.json field
    return fields

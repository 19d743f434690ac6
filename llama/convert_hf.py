"""Convert between HuggingFace Llama checkpoints and Meta's format.

    python -m llama.convert_hf to-meta HF_DIR OUT_DIR [--mp N] [--dtype bfloat16]
    python -m llama.convert_hf to-hf META_DIR OUT_DIR [--dtype bfloat16]

A HuggingFace directory holds `config.json`, one or more `*.safetensors`
(with `model.safetensors.index.json` when there are several) and
`tokenizer.model` (Meta's Llama 3 repositories keep it in `original/`); a
Meta directory holds `params.json`, `consolidated.NN.pth` and
`tokenizer.model`. Llama 2 and Llama 3.x both convert: Llama 3.1's
`rope_scaling` of type `llama3` becomes `use_scaled_rope` (and
`rope_scaling_factor` when its factor is not Meta's 8), and shards are
written in the family's layout. The two differ in key names and
in the rotary layout: Meta rotates adjacent pairs (x[2i], x[2i+1]) of a
head, HuggingFace the two halves (x[i], x[i + head_dim/2]), so HuggingFace's
`q_proj` and `k_proj` hold Meta's rows in a permuted order, head by head.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, Optional, Tuple

from llama import atomic, cli  # both light: no torch

# torch, and the modules that import it, are imported where the work needs
# them, so that `python -m llama.convert_hf --help` answers at once.
if TYPE_CHECKING:
    import torch

    from llama.family import Family
    from llama.model import ModelArgs
    from llama.tokenizer import Tokenizer

# Meta key (with {i} for the layer) -> HuggingFace key.
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# The context length config.json states unless one is given: what Meta's
# HuggingFace configs of Llama 3.1 and later (scaled rope) say, as transformers'
# conversion script writes it, and Llama 2's. transformers warns when a llama3
# rope_scaling's original_max_position_embeddings (8192) is not below it.
LLAMA31_CONTEXT = 131072
LLAMA2_CONTEXT = 4096

# (multiple_of, ffn_dim_multiplier) pairs Meta's own models use, tried first
# so that their params.json comes back as Meta wrote it: Llama 2 7B and 13B,
# Llama 2 70B and Llama 3 70B, Llama 3 8B, Llama 3.2 1B, Llama 3.1 405B.
_KNOWN_FFN_PARAMS = ((256, None), (4096, 1.3), (1024, 1.3), (256, 1.5), (4096, 1.2))


def meta_to_hf_key(key: str) -> str:
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    _, layer, rest = key.split(".", 2)
    return f"model.layers.{layer}.{_LAYER_KEYS[rest]}"


def permute_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's q/k rows (pairs interleaved per head) in HuggingFace's order (halves)."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_to_meta(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_to_hf`."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def ffn_params_for(dim: int, hidden: int, hints: Tuple = ()) -> Tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's formula gives exactly `hidden`.

    `hints` (pairs to try first) and Meta's own choices are preferred; then
    the largest power of two with no multiplier; then a multiplier.
    Raises ValueError when none fits.
    """
    from llama.model import ffn_hidden_dim

    powers = [2**k for k in range(12, -1, -1)]
    candidates = list(hints) + list(_KNOWN_FFN_PARAMS) + [(m, None) for m in powers]
    base = int(2 * (4 * dim) / 3)
    for multiple_of in powers:
        if hidden % multiple_of == 0:
            ratio = hidden / base
            candidates += [(multiple_of, round(ratio, digits)) for digits in (1, 2, 3, 4, 6)]
            candidates.append((multiple_of, ratio))
    for multiple_of, multiplier in candidates:
        if multiple_of >= 1 and ffn_hidden_dim(dim, multiple_of, multiplier) == hidden:
            return multiple_of, multiplier
    raise ValueError(
        f"no multiple_of / ffn_dim_multiplier gives a feed-forward size of {hidden} for dim {dim}"
    )


def _rope_settings(config: Dict) -> Tuple[float, Optional[str], Dict]:
    """(rope_theta, rope type or None for plain RoPE, its parameters), from transformers 4 or 5 fields."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    if not isinstance(parameters, dict) or not isinstance(scaling, dict):
        raise ValueError("config.json: rope_parameters and rope_scaling must be JSON objects or null")
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    if not _is_positive_number(theta):
        raise ValueError(f"config.json: rope_theta must be a finite number > 0, got {theta!r}")
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return float(theta), (None if rope_type in (None, "default") else rope_type), {**scaling, **parameters}


def _llama3_rope() -> Dict:
    """Meta's Llama 3.1 scaling constants, as transformers names them."""
    from llama.model import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT

    return {
        "low_freq_factor": ROPE_LOW_FREQ_FACTOR,
        "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
        "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT,
    }


def _llama3_rope_problems(rope: Dict) -> list:
    return [
        f"rope_scaling {name} {rope.get(name)!r} (Meta's llama3 scaling, implemented here, uses {value:g})"
        for name, value in _llama3_rope().items()
        if rope.get(name, value) != value
    ]


def _is_positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def model_args_from_hf_config(config: Dict) -> ModelArgs:
    """`ModelArgs` equivalent to a HuggingFace `LlamaConfig` dict.

    Raises ValueError for what this model cannot represent: another model
    type or activation, biases, rope scaling, a head size of its own.
    """
    from llama import checkpoint
    from llama.args import ModelArgs

    if not isinstance(config, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(config).__name__}")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    absent = [name for name in required if not isinstance(config.get(name), int) or isinstance(config[name], bool)]
    if absent:
        raise ValueError(f"config.json lacks {', '.join(absent)} (or not as integers)")
    for name in required + ("num_key_value_heads", "head_dim"):
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"config.json: {name} must be a positive integer, got {value!r}")
    if not _is_positive_number(config.get("rms_norm_eps", 1e-6)):
        raise ValueError(f"config.json: rms_norm_eps must be a finite number > 0, got {config['rms_norm_eps']!r}")
    if config.get("model_type") != "llama":
        raise ValueError(f"config.json has model_type {config.get('model_type')!r}; only 'llama' converts")
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (this model uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            problems.append(f"{flag} is set (this model has no biases)")
    theta, rope_type, rope = _rope_settings(config)
    scaling = {}
    if rope_type == "llama3":
        from llama.model import ROPE_SCALING_FACTOR

        problems += _llama3_rope_problems(rope)
        factor = float(rope.get("factor", ROPE_SCALING_FACTOR))
        # Meta's params.json has no factor (its code hard-codes 8): written only when it differs.
        scaling = {"use_scaled_rope": True, "rope_scaling_factor": None if factor == ROPE_SCALING_FACTOR else factor}
    elif rope_type is not None:
        problems.append(
            f"rope scaling of type {rope_type!r} (this model implements plain RoPE and Meta's llama3 scaling)"
        )
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * n_heads != dim:
        problems.append(f"head_dim {head_dim} is not hidden_size / num_attention_heads = {dim // n_heads}")
    if problems:
        raise ValueError(
            "this HuggingFace config cannot be expressed in Meta's format: " + "; ".join(problems)
        )
    hints = []
    if "multiple_of" in config:  # our own to-hf output carries Meta's values
        hint = {"multiple_of": config["multiple_of"], "ffn_dim_multiplier": config.get("ffn_dim_multiplier")}
        checkpoint.check_params(hint, "config.json")
        hints = [tuple(hint.values())]
    multiple_of, multiplier = ffn_params_for(dim, config["intermediate_size"], tuple(hints))
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    params = checkpoint.check_params(
        {
            "dim": dim,
            "n_layers": config["num_hidden_layers"],
            "n_heads": n_heads,
            "n_kv_heads": None if n_kv_heads == n_heads else n_kv_heads,
            "vocab_size": config["vocab_size"],
            "multiple_of": multiple_of,
            "ffn_dim_multiplier": multiplier,
            "norm_eps": config.get("rms_norm_eps", 1e-6),
            "rope_theta": theta,
            # None: the default factor, which params.json leaves out
            **{key: value for key, value in scaling.items() if value is not None},
        },
        "config.json",
    )
    return ModelArgs.from_params(params)


def hf_family(config: Dict, hf_dir: Path) -> Family:
    """The family of a HuggingFace Llama: its tokenizer.model's kind where there is
    one, else Llama 3 for llama3 rope scaling or Llama 3's vocabulary, else Llama 2."""
    from llama import family
    from llama.tokenizer import Tokenizer

    tokenizer_path = _hf_tokenizer_model(hf_dir)
    if tokenizer_path is not None:
        return family.of_tokenizer(Tokenizer(str(tokenizer_path)))
    _, rope_type, _ = _rope_settings(config)
    return family.of_hf_config(rope_type, config.get("vocab_size"))


def _eos_token_id(tokenizer: Tokenizer):
    """EOS for config.json: the family's stop tokens, a list where there are several (Llama 3)."""
    from llama import family

    stops = family.of_tokenizer(tokenizer).stop_tokens(tokenizer)
    return stops[0] if len(stops) == 1 else stops


def max_position_embeddings_for(args: ModelArgs, given: Optional[int] = None) -> int:
    """config.json's `max_position_embeddings` for `args`: `given`, or else
    LLAMA31_CONTEXT with Llama 3.1's scaled rope and LLAMA2_CONTEXT without.

    Raises ValueError for a `given` below 1, and, with scaled rope, for one
    not above the original context that rope_scaling names (transformers
    would warn on every load).
    """
    from llama.model import ROPE_ORIGINAL_CONTEXT

    if given is None:
        return LLAMA31_CONTEXT if args.use_scaled_rope else LLAMA2_CONTEXT
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ValueError(f"max_position_embeddings must be a positive integer, got {given!r}")
    if args.use_scaled_rope and given <= ROPE_ORIGINAL_CONTEXT:
        raise ValueError(
            f"max_position_embeddings {given} must be above the original context of Llama 3.1's scaled rope, "
            f"{ROPE_ORIGINAL_CONTEXT} (rope_scaling's original_max_position_embeddings; transformers warns "
            f"otherwise); leave it out for {LLAMA31_CONTEXT}, as Meta's HuggingFace configs state"
        )
    return given


def hf_config_from_model_args(
    args: ModelArgs, dtype: torch.dtype, max_position_embeddings: int, tokenizer: Optional[Tokenizer] = None
) -> Dict:
    """A HuggingFace `LlamaConfig` dict for `args` (transformers 4 and 5 both read it).

    `multiple_of` and `ffn_dim_multiplier` ride along, unused by transformers,
    so that converting back gives the same params.json. BOS and EOS ids are
    the tokenizer's where one is given (EOS: all of its family's stop tokens).
    """
    from llama.model import ROPE_SCALING_FACTOR, ffn_hidden_dim

    rope_parameters = {"rope_type": "default", "rope_theta": args.rope_theta}
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": args.rope_scaling_factor or ROPE_SCALING_FACTOR,
            **_llama3_rope(),
        }
        rope_parameters = {**rope_scaling, "rope_theta": args.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads(),
        "head_dim": args.dim // args.n_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1 if tokenizer is None else tokenizer.bos_id,
        "eos_token_id": 2 if tokenizer is None else _eos_token_id(tokenizer),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": args.ffn_dim_multiplier,
    }


def _safetensors_files(hf_dir: Path) -> Dict[str, Path]:
    """HuggingFace key -> the file holding it, from the index file or every *.safetensors.

    Raises ValueError naming the file for an index without a `weight_map`
    object or with an entry outside `hf_dir`, and for a file that is not a
    readable `.safetensors`.
    """
    from llama import checkpoint

    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        checkpoint.require_regular_file(index, "index file")
        content = checkpoint.read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(
                f"{str(index)!r}: weight_map must be an object of weight name -> file name, got {weight_map!r:.80}"
            )
        for key, name in weight_map.items():
            # Names are relative to the folder and stay in it: an index must not make
            # the conversion read (and copy into its output) files from elsewhere.
            # Checked by name, not by resolving links: HuggingFace's cache links each
            # file to a blob outside the snapshot folder.
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(
                    f"{str(index)!r}: weight_map entry {key!r} -> {name!r} is outside {str(hf_dir)!r}; "
                    "an index names files in its own folder"
                )
        located = {key: hf_dir / name for key, name in weight_map.items()}
        for path in set(located.values()):
            checkpoint.require_regular_file(path, f"safetensors file named in {str(index)!r}")
        return located
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {str(hf_dir)!r} (.bin checkpoints are not read)")
    located = {}
    for path in files:
        with _open_safetensors(path) as f:
            located.update({key: path for key in f.keys()})
    return located


@contextlib.contextmanager
def _open_safetensors(path: Path):
    """`safe_open(path)`, with any failure to read it a ValueError naming the file."""
    from safetensors import safe_open

    from llama import checkpoint

    checkpoint.require_regular_file(path, "safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except ValueError as e:
        if str(path) in str(e):  # ours, already naming the file
            raise
        raise ValueError(f"cannot read {str(path)!r} as a .safetensors file: {e}") from e
    except Exception as e:  # SafetensorError, OSError, ...
        raise ValueError(f"cannot read {str(path)!r} as a .safetensors file: {e}") from e


def _read_hf_tensors(located: Dict[str, Path]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HuggingFace key, tensor) for every key, each checked to be finite
    (ValueError naming the key and its file): whatever the shard count or
    dtype written, nothing non-finite reaches the output."""
    from llama import checkpoint

    by_file: Dict[Path, list] = {}
    for key, path in located.items():
        by_file.setdefault(path, []).append(key)
    for path, keys in by_file.items():
        with _open_safetensors(path) as f:
            missing = sorted(set(keys) - set(f.keys()))
            if missing:
                raise ValueError(f"{str(path)!r} lacks {missing[0]!r}, which the index places there")
            for key in keys:
                tensor = f.get_tensor(key)
                checkpoint.require_finite(tensor, key, repr(str(path)))
                yield key, tensor


def hf_to_meta(hf_dir, out_dir, model_parallel_size: int = 1, dtype: Optional[torch.dtype] = None) -> Path:
    """Write a HuggingFace Llama directory as a Meta checkpoint of `model_parallel_size` shards.

    Weights keep their dtype unless `dtype` is given. Raises FileNotFoundError
    for missing files (saying so when `hf_dir` is in Meta's format already),
    FileExistsError for a non-empty `out_dir`, ValueError for a config or
    weights this model cannot represent.
    """
    from llama import checkpoint
    from llama.tiny import write_checkpoint

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        if (hf_dir / "params.json").is_file() or any(hf_dir.glob("consolidated.*.pth")):
            raise FileNotFoundError(
                f"{str(hf_dir)!r} is already in Meta's format (params.json, consolidated.*.pth), what to-meta "
                "writes; `to-hf` converts the other way: python -m llama.convert_hf to-hf SRC DST"
            )
        raise FileNotFoundError(f"config.json not found in {str(hf_dir)!r}")
    checkpoint.require_regular_file(config_path, "config.json")
    checkpoint.require_new_dir(out_dir)
    config = checkpoint.read_json(config_path)
    try:
        args = model_args_from_hf_config(config)
    except ValueError as e:
        raise ValueError(f"{str(config_path)!r}: {e}") from e
    args.tok_embeddings_split_dim = hf_family(config, hf_dir).tok_embeddings_split_dim
    checkpoint.check_model_parallel_fit(args, model_parallel_size)

    located = _safetensors_files(hf_dir)
    # Before listing every key the config implies: a config that claims a
    # million layers fails here at once.
    checkpoint.check_layer_count(located, args.n_layers, hf_dir, field="num_hidden_layers")
    expected = checkpoint.full_shapes(args)
    to_meta = {meta_to_hf_key(key): key for key in expected}
    state: Dict[str, torch.Tensor] = {}
    for hf_key, tensor in _read_hf_tensors(located):
        if hf_key.endswith(".bias"):
            raise ValueError(f"{hf_key}: this model has no biases")
        if hf_key.endswith("rotary_emb.inv_freq"):  # older exports carry the rotary table
            continue
        if hf_key not in to_meta:
            raise ValueError(f"unexpected weight {hf_key!r} in {str(hf_dir)!r}")
        key = to_meta[hf_key]
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(f"{hf_key} has shape {tuple(tensor.shape)}; config.json implies {expected[key]}")
        if key.endswith("attention.wq.weight"):
            tensor = permute_to_meta(tensor, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = permute_to_meta(tensor, args.kv_heads())
        state[key] = tensor
    if config.get("tie_word_embeddings") and "tok_embeddings.weight" in state:
        # Tied embeddings (transformers then uses the embedding as the output,
        # whatever lm_head holds): Meta's format keeps a copy of its own.
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = sorted(set(to_meta.values()) - set(state))
    if missing:
        names = ", ".join(map(meta_to_hf_key, missing[:5]))
        raise ValueError(f"{str(hf_dir)!r} lacks {len(missing)} weight(s): {names}")

    # Written beside OUT_DIR and renamed into place when complete.
    with atomic.output_dir(out_dir) as out:
        write_checkpoint(
            out, state, args, mp=model_parallel_size, dtype=dtype or state["norm.weight"].dtype, source=repr(str(hf_dir))
        )
        _copy_tokenizer(hf_dir, out)
    return out_dir


def meta_to_hf(
    meta_dir, out_dir, dtype: Optional[torch.dtype] = None, max_position_embeddings: Optional[int] = None
) -> Path:
    """Write a Meta checkpoint (any shard count) as a HuggingFace Llama directory:
    `config.json`, one `model.safetensors`, `tokenizer.model`.

    `max_position_embeddings` is the context config.json states (see
    `max_position_embeddings_for`). Raises as `checkpoint.load_for_rank`
    does, FileExistsError for a non-empty `out_dir`, and ValueError for a
    quantized checkpoint (`python -m llama.quantize`) or a
    `max_position_embeddings` that does not fit the rope scaling.
    """
    from safetensors.torch import save_file

    from llama import checkpoint, family, quantization

    meta_dir, out_dir = Path(meta_dir), Path(out_dir)
    shards = checkpoint.find_shards(meta_dir)
    checkpoint.require_new_dir(out_dir)
    quant = quantization.config_from_params(checkpoint.read_params(meta_dir), f"{str(meta_dir)!r}/params.json")
    if quant is not None:
        # Its shards hold integer weights with scales (llama/quantization.py), which
        # HuggingFace's Llama has no place for; the unquantized source converts.
        group = f", group_size={quant.group_size}" if quant.group_size else ""
        group_flag = f" --group_size {quant.group_size}" if quant.group_size else ""
        raise ValueError(
            f"{str(meta_dir)!r} is quantized ({quant.describe()}, by python -m llama.quantize), and a HuggingFace "
            "Llama holds unquantized weights: convert the unquantized checkpoint it was made from. To run it "
            f"quantized here, quantize at load instead: Llama.build(..., quantize={quant.mode!r}{group}) or the "
            f"scripts' --quantize {quant.mode}{group_flag} (docs/compressed-weights.md)"
        )
    args = family.model_args_of_checkpoint(meta_dir, shards)
    max_position_embeddings = max_position_embeddings_for(args, max_position_embeddings)
    state = checkpoint.load_for_rank(shards, 0, 1, args, dtype=dtype)
    hf_state = {}
    for key, tensor in state.items():
        if key.endswith("attention.wq.weight"):
            tensor = permute_to_hf(tensor, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = permute_to_hf(tensor, args.kv_heads())
        hf_state[meta_to_hf_key(key)] = tensor.contiguous()
    from llama.tokenizer import Tokenizer

    tokenizer_path = meta_dir / "tokenizer.model"
    tokenizer = Tokenizer(str(tokenizer_path)) if tokenizer_path.is_file() else None
    config = hf_config_from_model_args(args, state["norm.weight"].dtype, max_position_embeddings, tokenizer)
    # Written beside OUT_DIR and renamed into place when complete.
    with atomic.output_dir(out_dir) as out:
        with atomic.writing(sum(t.nbytes for t in hf_state.values())):
            save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
        # safetensors creates its file private (0600); give it the mode of the other files.
        os.chmod(out / "model.safetensors", atomic.default_file_mode())
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_tokenizer(meta_dir, out)
    return out_dir


def _hf_tokenizer_model(src: Path) -> Optional[Path]:
    """Meta's tokenizer file in a HuggingFace folder: tokenizer.model, or
    original/tokenizer.model as Meta's Llama 3 repositories keep it."""
    for candidate in (src / "tokenizer.model", src / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def _copy_tokenizer(src: Path, dst: Path) -> None:
    found = _hf_tokenizer_model(src)
    if found is not None:
        shutil.copyfile(found, dst / "tokenizer.model")
        return
    others = sorted(p.name for p in src.glob("tokenizer*.json"))
    what = f" (only {', '.join(others)}, which Llama.build does not read)" if others else ""
    print(
        f"note: no tokenizer.model in {str(src)!r}{what}. Llama.build needs Meta's tokenizer.model: "
        "a SentencePiece model for Llama 2, the tiktoken BPE file for Llama 3.x (Meta's download, or "
        f"original/tokenizer.model in Meta's HuggingFace repositories). Copy it to {str(dst)!r}.",
        file=sys.stderr,
    )


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m llama.convert_hf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True, metavar="{to-meta,to-hf}",
                                help="the direction to convert in (each has its own --help)")
    to_meta = sub.add_parser("to-meta", help="HuggingFace directory -> Meta checkpoint")
    to_meta.add_argument("src", help="HuggingFace directory to read (config.json, *.safetensors, tokenizer.model)")
    to_meta.add_argument("dst", help="new or empty directory to write the Meta checkpoint to")
    to_meta.add_argument("--mp", type=int, default=1, help="number of model-parallel shards to write")
    to_hf = sub.add_parser("to-hf", help="Meta checkpoint -> HuggingFace directory")
    to_hf.add_argument("src", help="Meta checkpoint directory to read (params.json, consolidated.NN.pth, "
                                   "tokenizer.model), not a quantized one")
    to_hf.add_argument("dst", help="new or empty directory to write the HuggingFace model to")
    to_hf.add_argument("--max-position-embeddings", type=int, default=None, metavar="N",
                       help=f"the context length config.json states; none: {LLAMA31_CONTEXT} for Llama 3.1's "
                            f"scaled rope (as Meta's HuggingFace configs), else {LLAMA2_CONTEXT}. With scaled "
                            "rope it must be above the original context, 8192")
    for p in (to_meta, to_hf):
        p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                       help="store the weights in this dtype (default: as in SRC)")
    args = parser.parse_args(argv)
    if args.direction == "to-meta" and args.mp < 1:
        parser.error("--mp must be at least 1")
    if args.direction == "to-hf" and args.max_position_embeddings is not None and args.max_position_embeddings < 1:
        parser.error("--max-position-embeddings must be at least 1")
    cli.refuse_used_destination(parser, args.dst)
    import torch  # after parsing: --help and a mistyped flag need not wait for it

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.direction == "to-meta":
        code = cli.call(hf_to_meta, args.src, args.dst, model_parallel_size=args.mp, dtype=dtype)
    else:
        code = cli.call(
            meta_to_hf, args.src, args.dst, dtype=dtype, max_position_embeddings=args.max_position_embeddings
        )
    if code == 0:
        print(f"wrote {args.dst}")
    return code


if __name__ == "__main__":
    cli.run_tool(main)

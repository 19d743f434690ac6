"""The model's shape, `ModelArgs`, and the rules a shape must follow; no torch.

`llama.model` builds the network from these (and re-exports `ModelArgs` and
`ffn_hidden_dim` under their usual names); they live apart, as in Meta's
llama-models `args.py`, so that `python -m llama.tiny` can check a shape,
and the model-parallel sizes it splits over, before it waits for torch.
"""

import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # defined later by tokenizer
    multiple_of: int = 256  # make SwiGLU hidden layer size multiple of large power of 2
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5

    max_batch_size: int = 32
    max_seq_len: int = 2048

    # Not in the Llama 2 reference; params.json may carry it (Code Llama,
    # Llama 3, converted HuggingFace checkpoints). 10000 is the Llama 2 value.
    rope_theta: float = 10000.0
    # Llama 3.1 and later: Meta's long-context scaling of the rotary
    # frequencies (`apply_scaling`). `rope_scaling_factor` is this library's
    # params.json field for a factor other than Meta's hard-coded 8 (Llama
    # 3.2 1B/3B were trained with 32; `convert_hf` writes it).
    use_scaled_rope: bool = False
    rope_scaling_factor: Optional[float] = None

    # Not a params.json field: the dimension `tok_embeddings` is split on
    # across model-parallel ranks, set from the checkpoint's family
    # (`llama.family`): 1 in Llama 2 (ParallelEmbedding), 0 in Llama 3
    # (VocabParallelEmbedding).
    tok_embeddings_split_dim: int = 1

    @classmethod
    def from_params(cls, params: Mapping, **overrides) -> "ModelArgs":
        """The checked shape of a params.json object (its fields, then `overrides`
        such as max_seq_len). The `quantization` entry describes the files, not the
        shape, and is left out. Raises ValueError as `check_shape` does."""
        fields = {k: v for k, v in params.items() if k != "quantization"}
        args = cls(**{**fields, **overrides})
        check_shape(args)
        return args

    def kv_heads(self) -> int:
        """The number of key/value heads: `n_kv_heads`, or `n_heads` where params.json has none."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def local_heads(self, model_parallel_size: int) -> Tuple[int, int]:
        """(query heads, key/value heads) one of `model_parallel_size` ranks holds.

        With more ranks than KV heads, each rank keeps a copy of the one KV
        head its query heads share, so it still holds one.
        """
        return self.n_heads // model_parallel_size, max(1, self.kv_heads() // model_parallel_size)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """The SwiGLU hidden size the reference derives from params.json."""
    return swiglu_hidden_dim(4 * dim, multiple_of, ffn_dim_multiplier)


def swiglu_hidden_dim(hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's `FeedForward` sizing: 2/3 of `hidden_dim` (the reference passes 4 * dim),
    times the multiplier, rounded up to a multiple of `multiple_of`."""
    hidden_dim = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def is_positive_finite(value) -> bool:
    """True for an int or float above 0 that is not inf or NaN (json reads both; bools are not numbers here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_shape(args: ModelArgs) -> None:
    """Raise ValueError unless `n_heads` splits `dim` into heads of an even size
    (rotary embedding turns pairs of values), the query heads group evenly over
    the KV heads and `tok_embeddings_split_dim` is 0 or 1. Sizes are taken to
    be positive (`checkpoint.check_params` checks them)."""
    n_kv_heads = args.kv_heads()
    if args.tok_embeddings_split_dim not in (0, 1):
        raise ValueError(f"tok_embeddings_split_dim must be 0 or 1, got {args.tok_embeddings_split_dim!r}")
    if args.dim % args.n_heads != 0:
        raise ValueError(f"dim {args.dim} is not a multiple of n_heads {args.n_heads}")
    if (args.dim // args.n_heads) % 2 != 0:
        raise ValueError(f"head size {args.dim // args.n_heads} must be even for rotary embeddings")
    if n_kv_heads <= 0 or args.n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads {args.n_heads} is not a multiple of n_kv_heads {n_kv_heads}")


def model_parallel_problem(args: ModelArgs, model_parallel_size: int) -> Optional[str]:
    """Why `args` cannot be split `model_parallel_size` ways, or None if it can."""
    n_kv_heads = args.kv_heads()
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    sizes = [("n_heads", args.n_heads), ("dim", args.dim), ("the feed-forward hidden size", hidden)]
    if args.vocab_size > 0:
        sizes.append(("vocab_size", args.vocab_size))
    for name, value in sizes:
        if value % model_parallel_size != 0:
            return f"{name} = {value} cannot be split over a model-parallel size of {model_parallel_size}"
    # KV heads are split when there are enough of them, and replicated (each
    # rank keeps the one its query heads share) when there are fewer than ranks.
    if n_kv_heads % model_parallel_size != 0 and model_parallel_size % n_kv_heads != 0:
        return (
            f"n_kv_heads = {n_kv_heads} can neither be split over nor replicated on a "
            f"model-parallel size of {model_parallel_size}"
        )
    return None


def valid_model_parallel_sizes(args: ModelArgs, n_shards: Optional[int] = None) -> List[int]:
    """The model-parallel sizes `args` can run on (and, given `n_shards`, that fit them)."""
    sizes = [m for m in range(1, args.n_heads + 1) if model_parallel_problem(args, m) is None]
    if n_shards is not None:
        sizes = [m for m in sizes if n_shards % m == 0 or m % n_shards == 0]
    return sizes


def check_model_parallel_fit(
    args: ModelArgs, model_parallel_size: int, n_shards: Optional[int] = None
) -> None:
    """Raise ValueError, listing the sizes that would work, unless the model can
    be split `model_parallel_size` ways (from a checkpoint of `n_shards` shards)."""
    problem = model_parallel_problem(args, model_parallel_size)
    neither_divides = n_shards is not None and n_shards % model_parallel_size and model_parallel_size % n_shards
    if problem is None and neither_divides:
        problem = (
            f"a checkpoint of {n_shards} shard(s) cannot be loaded on a model-parallel size of "
            f"{model_parallel_size}: one must divide the other"
        )
    if problem is not None:
        sizes = ", ".join(map(str, valid_model_parallel_sizes(args, n_shards)))
        hint = f"; model-parallel sizes that work: {sizes}"
        if n_shards is not None:
            hint += " (or write a copy for another size with `python -m llama.reshard SRC DST --mp N`)"
        raise ValueError(problem + hint)

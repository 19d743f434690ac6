"""What differs between Meta's Llama text families, in one place.

    family         tokenizer.model          chat format            stop tokens                        tok_embeddings split  rope
    Llama 2        SentencePiece            [INST] ... [/INST]     </s>                               dim 1 (columns)       theta 10000 (params.json may set it: Code Llama 1e6)
    Llama 3.x      tiktoken BPE (128256)    header special tokens  <|end_of_text|> <|eom_id|> <|eot_id|>  dim 0 (vocabulary)    theta 500000, use_scaled_rope (3.1+)

Code Llama is a Llama 2-family checkpoint (SentencePiece, [INST] chat,
columns split) with its own `rope_theta` in params.json.

Llama 3.0 and 3.1+ differ in one thing besides the rope: Meta's Llama 3.0
code strips each chat message's content, its llama-models (3.1, 3.2, 3.3)
encodes it as given. `LLAMA_3` is 3.1+; `for_model` gives `LLAMA_3_0` for
a checkpoint without `use_scaled_rope`, as 3.0's params.json has none.

Nobody names the family: it follows from the files. The tokenizer file
says which tokenizer (and so which chat format and stop tokens); the
checkpoint says which family it was made for, by its embedding's split axis
when it has several shards, by `use_scaled_rope` in params.json, or by its
vocabulary size. When the two disagree, `detect` raises one ValueError that
names both, before any weight is read. Callers ask the family object for
what differs; nothing else branches on the family.
"""

from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

from llama import chat_format
from llama.args import ModelArgs
from llama.tokenizer import SENTENCEPIECE, TIKTOKEN, Tokenizer, tokenizer_kind


class Family:
    """One row of the table above. Subclasses fill in the class attributes."""

    name: str
    tokenizer_kind: str  # llama.tokenizer.SENTENCEPIECE or TIKTOKEN
    tokenizer_description: str
    tok_embeddings_split_dim: int  # across model-parallel shards
    default_rope_theta: float  # when params.json has no rope_theta
    vocab_sizes: Tuple[int, ...]  # Meta's checkpoints' vocabularies: evidence of the family
    option: str  # its name on command lines (`python -m llama.tiny --family`)
    # What `python -m llama.tiny` makes for it: the shape of the family's latest models, small.
    tiny_defaults: Mapping

    def encode_dialog(self, tokenizer: Tokenizer, dialog: Sequence[chat_format.Message]) -> List[int]:
        """Prompt tokens of `dialog` in this family's chat format; ValueError for a malformed dialog."""
        raise NotImplementedError

    def refuses(self, dialog: Sequence[chat_format.Message]) -> bool:
        """True when the dialog must be answered with UNSAFE_ERROR (it holds the format's own tags)."""
        return False

    def stop_tokens(self, tokenizer: Tokenizer) -> List[int]:
        """The token ids that end a generation."""
        return [tokenizer.eos_id]

    def for_model(self, args: ModelArgs) -> "Family":
        """The version of this family that a model of `args` belongs to, where
        versions encode prompts differently (Llama 3.0 and 3.1+); else self."""
        return self

    def model_args(self, params: Mapping, **overrides) -> ModelArgs:
        """`ModelArgs` of a checkpoint of this family (checked; see `ModelArgs.from_params`)."""
        fields = {"rope_theta": self.default_rope_theta, **params, **overrides}
        fields["tok_embeddings_split_dim"] = self.tok_embeddings_split_dim
        return ModelArgs.from_params(fields)

    def __repr__(self) -> str:
        return f"<family {self.name}>"


class Llama2Family(Family):
    name = "Llama 2"
    tokenizer_kind = SENTENCEPIECE
    tokenizer_description = "a SentencePiece model"
    tok_embeddings_split_dim = 1
    default_rope_theta = 10000.0
    vocab_sizes = (32000, 32016)  # Llama 2; Code Llama with its infilling pieces
    option = "llama2"
    tiny_defaults = {"vocab_size": 512, "ffn_dim_multiplier": None, "use_scaled_rope": False}

    def encode_dialog(self, tokenizer, dialog):
        return chat_format.encode_dialog(tokenizer, dialog)

    def refuses(self, dialog):
        return chat_format.has_special_tags(dialog)


class Llama3Family(Family):
    name = "Llama 3"
    tokenizer_kind = TIKTOKEN
    tokenizer_description = "a tiktoken BPE file"
    tok_embeddings_split_dim = 0
    default_rope_theta = 500000.0  # Meta's Llama 3 ModelArgs default
    vocab_sizes = (128256,)
    option = "llama3"
    # vocab_size: BPE ranks, before the 256 special tokens. Llama 3.1's rope.
    tiny_defaults = {"vocab_size": 384, "ffn_dim_multiplier": 1.3, "use_scaled_rope": True}
    # llama-models' ChatFormat (3.1+) encodes a message's content as given.
    strips_content = False

    def encode_dialog(self, tokenizer, dialog):
        return chat_format.encode_dialog_llama3(tokenizer, dialog, strip_content=self.strips_content)

    def stop_tokens(self, tokenizer):
        return list(tokenizer.stop_tokens)

    def for_model(self, args):
        # Every 3.1+ params.json sets use_scaled_rope; 3.0's have no such field.
        return self if args.use_scaled_rope else LLAMA_3_0


class Llama30Family(Llama3Family):
    """Llama 3.0: as 3.1+, but Meta's meta-llama/llama3 strips each message's content."""

    name = "Llama 3.0"
    strips_content = True


LLAMA_2 = Llama2Family()
LLAMA_3 = Llama3Family()
LLAMA_3_0 = Llama30Family()
# The families files are told apart by; LLAMA_3_0 is a version of LLAMA_3 (`Family.for_model`).
FAMILIES = (LLAMA_2, LLAMA_3)


def by_option(option: str) -> Family:
    """The family named `option` on a command line ("llama2", "llama3")."""
    for family in FAMILIES:
        if family.option == option:
            return family
    raise ValueError(f"unknown family {option!r}; choose from {', '.join(f.option for f in FAMILIES)}")


def of_hf_config(rope_type: Optional[str], vocab_size) -> Family:
    """The family of a HuggingFace config without a tokenizer.model: Llama 3 for
    `llama3` rope scaling or Llama 3's vocabulary, else Llama 2."""
    if rope_type == "llama3" or vocab_size in LLAMA_3.vocab_sizes:
        return LLAMA_3
    return LLAMA_2


def of_tokenizer_file(model_path) -> Family:
    """The family of a tokenizer.model, from its kind alone (nothing is loaded)."""
    kind = tokenizer_kind(model_path)
    for family in FAMILIES:
        if family.tokenizer_kind == kind:
            return family
    raise ValueError(f"no Llama family uses a {kind} tokenizer")


def of_tokenizer(tokenizer: Tokenizer) -> Family:
    """The family whose tokenizer `tokenizer` is."""
    for family in FAMILIES:
        if family.tokenizer_kind == tokenizer.kind:
            return family
    raise ValueError(f"no Llama family uses a {tokenizer.kind} tokenizer")


def of_model(tokenizer: Tokenizer, args: ModelArgs) -> Family:
    """The family, and its version (Llama 3.0 or 3.1+), of a model of `args` with `tokenizer`."""
    return of_tokenizer(tokenizer).for_model(args)


def _embedding_shape(shards: Sequence[Path]) -> Optional[Tuple[int, ...]]:
    from llama import checkpoint  # torch: `python -m llama.tiny` lists the families before it loads

    return checkpoint.shard_tensor_shape(shards[0], "tok_embeddings.weight")


def checkpoint_evidence(
    params: Mapping, shards: Sequence[Path], n_words: Optional[int] = None
) -> Tuple[Optional[Family], str, Optional[int]]:
    """(family or None, why, vocabulary size or None) from params.json and the first shard's embedding shape.

    `n_words`, the tokenizer's size where there is one: a shard whose
    embedding has that many rows holds the whole vocabulary, whatever its
    shard count (a broken checkpoint the loader names), not a vocabulary split.
    """
    shape = _embedding_shape(shards)
    dim, n_shards = params.get("dim"), len(shards)
    vocab = params.get("vocab_size", -1)
    vocab = vocab if isinstance(vocab, int) and vocab > 0 else None
    family, why = None, ""
    if shape is not None and len(shape) == 2 and n_shards > 1 and isinstance(dim, int):
        rows, cols = shape
        if cols == dim and rows != n_words:
            family, why = LLAMA_3, f"its tok_embeddings is split on dim 0 (vocabulary) across {n_shards} shards"
            vocab = vocab or rows * n_shards
        elif cols * n_shards == dim:
            family, why = LLAMA_2, f"its tok_embeddings is split on dim 1 (columns) across {n_shards} shards"
            vocab = vocab or rows
    elif shape is not None and len(shape) == 2 and n_shards == 1:
        vocab = vocab or shape[0]
    if family is None and "use_scaled_rope" in params:
        family, why = LLAMA_3, "its params.json sets use_scaled_rope"
    if family is None and vocab is not None:
        for candidate in FAMILIES:
            if vocab in candidate.vocab_sizes:
                family, why = candidate, f"its vocabulary has {vocab} entries"
    return family, why, vocab


def detect(ckpt_dir, params: Mapping, shards: Sequence[Path], tokenizer: Tokenizer, tokenizer_path) -> Family:
    """The family of a checkpoint and its tokenizer, checked to agree.

    Raises ValueError, naming both sides, when the tokenizer belongs to
    another family than the checkpoint or has another vocabulary size.
    Reads only params.json and the first shard's header.
    """
    family = of_tokenizer(tokenizer)
    found, why, vocab = checkpoint_evidence(params, shards, tokenizer.n_words)
    tokenizer_side = (
        f"the tokenizer {str(tokenizer_path)!r} is {family.tokenizer_description} "
        f"({family.name} family, {tokenizer.n_words} tokens)"
    )
    if found is not None and found is not family:
        raise ValueError(
            f"{tokenizer_side}, but the checkpoint {str(ckpt_dir)!r} is a {found.name}-family checkpoint "
            f"({why}): pass the tokenizer.model that came with this checkpoint"
        )
    declared = params.get("vocab_size", -1)
    if isinstance(declared, int) and declared > 0 and declared != tokenizer.n_words:
        # (An embedding of another size, with vocab_size -1, is named by the loader.)
        raise ValueError(
            f"params.json says vocab_size {declared} but the tokenizer {str(tokenizer_path)!r} has "
            f"{tokenizer.n_words} pieces ({family.tokenizer_description}, {family.name} family): "
            f"pass the tokenizer.model that came with the checkpoint {str(ckpt_dir)!r}"
        )
    return family


def of_checkpoint(ckpt_dir, params: Mapping, shards: Sequence[Path]) -> Family:
    """The family of a checkpoint read without a tokenizer given (resharding, conversion).

    A `tokenizer.model` beside the shards decides and is checked as in
    `detect`; else the checkpoint's own evidence; else Llama 2's layout.
    """
    tokenizer_path = Path(ckpt_dir) / "tokenizer.model"
    if tokenizer_path.is_file():
        return detect(ckpt_dir, params, shards, Tokenizer(str(tokenizer_path)), tokenizer_path)
    found, _, _ = checkpoint_evidence(params, shards)
    return found or LLAMA_2


def model_args_of_checkpoint(ckpt_dir, shards: Sequence[Path]) -> ModelArgs:
    """`ModelArgs` of a checkpoint on its own, without a tokenizer given, in
    its family's layout (`of_checkpoint`): where params.json
    says vocab_size -1 (as Llama 2's do), the vocabulary comes from the
    embedding's shape."""
    from llama import checkpoint  # torch, as in _embedding_shape

    params = checkpoint.read_params(ckpt_dir)
    args = of_checkpoint(ckpt_dir, params, shards).model_args(params)
    if args.vocab_size <= 0:
        args.vocab_size = checkpoint_evidence(params, shards)[2] or -1
    if args.vocab_size <= 0:
        raise ValueError(
            f"cannot tell the vocabulary size of the checkpoint {str(ckpt_dir)!r}: params.json says "
            f"vocab_size -1 and {str(shards[0])!r} has no tok_embeddings.weight"
        )
    return args

"""Tiny random Llama checkpoints in Meta's exact format, for tests and the demo.

    python -m llama.tiny OUT_DIR [--family llama2|llama3] [--infill] [--mp N] [--dim 64] [--n-layers 2] ...

writes `params.json`, `consolidated.00.pth` ... (split by the family's
model-parallel layout) and a `tokenizer.model`: for Llama 2 a small
SentencePiece BPE model with byte fallback, for Llama 3 a small tiktoken
BPE file (byte-level merges trained here, then the 256 special tokens),
both trained on built-in text; or a copy of one given with `--tokenizer`,
whose kind then decides the family. A Llama 3 checkpoint has Llama 3.1's
rotary settings (theta 500000, scaled) and ffn_dim_multiplier 1.3. With
`--infill` it is shaped like Code Llama 7B/13B (Llama 2 family): the
SentencePiece tokenizer also holds the infilling pieces and `rope_theta` is
1e6. The weights are seeded random numbers, so the text they produce is gibberish;
what matters is that it is reproducible.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from llama import atomic, cli  # both light: no torch

# torch, and the modules that import it, are imported where the work needs
# them, so that `python -m llama.tiny --help` answers at once.
if TYPE_CHECKING:
    import torch

    from llama.model import ModelArgs

# Code Llama's rotary base (Llama 2: 10000).
CODE_LLAMA_ROPE_THETA = 1e6

# The tokenizer sizes the trainers here can make from `training_text()`, found
# by training (tests/test_tiny_cli.py trains at both ends): SentencePiece needs
# its 3 special pieces, the 256 byte pieces and the text's 71 characters, and
# runs out of merges past 1741 pieces (infilling's 4 pieces and "☺" add
# INFILL_EXTRA_PIECES to both ends); the tiktoken BPE needs the 256 bytes and
# runs out past 1354 ranks.
SENTENCEPIECE_VOCAB_SIZES = range(330, 1741 + 1)
INFILL_EXTRA_PIECES = 5
TIKTOKEN_RANKS = range(256, 1354 + 1)
# torch.Generator.manual_seed takes a signed or unsigned 64-bit seed.
SEEDS = range(-(2**63), 2**64)

_WORDS = (
    "the a an of to in and is was for on with as by at from that this it he she they we you "
    "llama model token tokens text prompt answer question reply chat user assistant system "
    "cache layer head heads weight weights shard shards rank ranks world size batch length "
    "river mountain forest city village ocean island desert valley garden market harbor "
    "red green blue yellow black white purple orange silver golden bright dark quiet loud "
    "run walk read write speak listen think learn teach build carry open close begin finish "
    "small large tiny huge quick slow early late warm cold young old new ancient modern "
    "one two three four five six seven eight nine ten hundred thousand million first last "
    "cat dog bird fish horse sheep goat cow mouse fox wolf bear lion tiger eagle owl "
    "apple bread cheese coffee tea water milk honey rice soup salt sugar butter lemon "
    "morning evening night day week month year season summer winter spring autumn "
    "café naïve résumé über façade jalapeño"
).split()


def training_text(n_lines: int = 3000, seed: int = 0):
    """Deterministic sentences to train the tiny tokenizer on."""
    rng = random.Random(seed)
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        line = " ".join(words).capitalize()
        line += rng.choice([".", ".", ".", "?", "!", ",", ":"])
        if rng.random() < 0.2:
            line += f" {rng.randint(0, 9999)}"
        yield line


def train_tokenizer(path, vocab_size: int = 512, infill: bool = False) -> None:
    """Train a SentencePiece BPE model with byte fallback, Llama's special ids
    (unk 0, bos 1, eos 2, no pad) and Llama's normalisation, into `path`.

    With `infill`, Code Llama's infilling pieces are in it too, as
    user-defined pieces (ids 3 to 6 here; 32007 to 32010 in Code Llama's:
    code finds them by piece), and the character piece "☺", which Meta's
    `encode_infilling` puts in front of a suffix and drops with the "▁"
    before it: "☺" must encode as ["▁", "☺"], as in Code Llama's vocabulary,
    for the infilling prompts here to be laid out as with the real one.
    """
    import sentencepiece as spm

    from llama.tokenizer import EOT_PIECE, MIDDLE_PIECE, PREFIX_PIECE, SUFFIX_PIECE

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_text(),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=[PREFIX_PIECE, SUFFIX_PIECE, MIDDLE_PIECE, EOT_PIECE] if infill else [],
        required_chars="☺" if infill else "",  # a character piece, as in Code Llama's vocabulary
        num_threads=1,
        minloglevel=2,
    )
    Path(path).write_bytes(model.getvalue())


def train_tiktoken_bpe(path, n_ranks: int = 384) -> None:
    """Write a tiktoken BPE file of `n_ranks` ranks: the 256 bytes, then merges.

    Byte-level BPE over the training text, split first by Meta's Llama 3
    pattern: each merge joins the most frequent adjacent pair of tokens
    within a piece (ties broken by the bytes, so the file is the same every
    time). The special tokens are not in the file; the tokenizer adds them
    after the ranks.
    """
    import regex

    from llama.tokenizer import LLAMA3_PATTERN

    if n_ranks < 256:
        raise ValueError(f"a byte-level BPE needs at least the 256 byte tokens, got n_ranks {n_ranks}")
    counts = collections.Counter()
    for line in training_text():
        counts.update(regex.findall(LLAMA3_PATTERN, line + "\n"))
    words = {tuple(bytes([b]) for b in piece.encode("utf-8")): n for piece, n in counts.items()}
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < n_ranks:
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        candidates = [(n, pair) for pair, n in pairs.items() if pair[0] + pair[1] not in ranks]
        if not candidates:
            raise ValueError(
                f"the training text has only {len(ranks)} BPE ranks in it, not n_ranks {n_ranks} "
                f"(see TIKTOKEN_RANKS)"
            )
        best = min(candidates, key=lambda c: (-c[0], c[1]))[1]  # most frequent, then by bytes
        ranks[best[0] + best[1]] = len(ranks)
        merged = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()]
    Path(path).write_text("".join(lines))


def random_weights(args: ModelArgs, seed: int = 0, device=None, dtype=None) -> Dict[str, torch.Tensor]:
    """A full (MP=1) state dict with Meta's keys and seeded random values.

    Scaled so that activations stay O(1) and the logits are spread widely
    enough that greedy choices are not decided by float rounding. Made on
    `device` (a 7B one straight on the GPU); the values depend on the device.
    `dtype` defaults to float32.
    """
    import torch

    from llama.model import ffn_hidden_dim

    dtype = torch.float32 if dtype is None else dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
    head_dim = args.dim // args.n_heads
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)

    def normal(*shape, std):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    def norm_weight():
        return 1.0 + normal(args.dim, std=0.1)

    state = {"tok_embeddings.weight": normal(args.vocab_size, args.dim, std=1.0)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        state[p + "attention.wq.weight"] = normal(args.n_heads * head_dim, args.dim, std=args.dim**-0.5)
        state[p + "attention.wk.weight"] = normal(n_kv_heads * head_dim, args.dim, std=args.dim**-0.5)
        state[p + "attention.wv.weight"] = normal(n_kv_heads * head_dim, args.dim, std=args.dim**-0.5)
        state[p + "attention.wo.weight"] = normal(args.dim, args.n_heads * head_dim, std=args.dim**-0.5)
        state[p + "feed_forward.w1.weight"] = normal(hidden, args.dim, std=args.dim**-0.5)
        state[p + "feed_forward.w2.weight"] = normal(args.dim, hidden, std=hidden**-0.5)
        state[p + "feed_forward.w3.weight"] = normal(hidden, args.dim, std=args.dim**-0.5)
        state[p + "attention_norm.weight"] = norm_weight()
        state[p + "ffn_norm.weight"] = norm_weight()
    state["norm.weight"] = norm_weight()
    state["output.weight"] = normal(args.vocab_size, args.dim, std=3.0 * args.dim**-0.5)
    return state


def shard_state_dict(
    state: Dict[str, torch.Tensor],
    mp: int,
    rank: int,
    args: ModelArgs,
    dtype: Optional[torch.dtype] = None,
    source: str = "the full state dict",
) -> Dict[str, torch.Tensor]:
    """Rank `rank`'s part of a full state dict under Meta's MP layout (KV heads
    replicated when `mp` exceeds them), in `dtype` (None: as they are), as
    tensors of their own. Raises ValueError, naming the weight and `source`,
    for one that is not finite once converted or cut (`checkpoint.require_finite`)."""
    from llama.checkpoint import assemble_rank

    part = assemble_rank(lambda index: (state, source), 1, rank, mp, args, dtype=dtype)
    # Copies where assemble_rank handed back the given tensor (or a view of it).
    return {
        key: tensor.clone() if tensor.untyped_storage().data_ptr() == state[key].untyped_storage().data_ptr()
        else tensor
        for key, tensor in part.items()
    }


def write_checkpoint(
    out_dir,
    state: Dict[str, torch.Tensor],
    args: ModelArgs,
    mp: int = 1,
    dtype: Optional[torch.dtype] = None,
    source: str = "the full state dict",
) -> None:
    """Write `params.json` and `consolidated.NN.pth` for `mp` shards into `out_dir`,
    the weights in `dtype` (default float32). Raises ValueError as
    `shard_state_dict` does, naming `source`."""
    import torch

    from llama.checkpoint import params_dict

    dtype = torch.float32 if dtype is None else dtype
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params_dict(args), indent=2) + "\n")
    for rank in range(mp):
        shard = shard_state_dict(state, mp, rank, args, dtype, source)
        # Every rank's shard holds the same shapes: the output is this one mp times over.
        with atomic.writing(mp * sum(t.nbytes for t in shard.values())):
            torch.save(shard, out_dir / f"consolidated.{rank:02d}.pth")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(
    *,
    mp,
    dim,
    n_layers,
    n_heads,
    n_kv_heads,
    multiple_of,
    ffn_dim_multiplier,
    vocab_size,
    seed,
    tokenizer,
    family_name,
    rope_theta,
    use_scaled_rope,
    rope_scaling_factor,
    infill,
    as_flags: bool = False,
) -> None:
    """Raise ValueError (FileNotFoundError for a `tokenizer` that is not there),
    naming the option and its value, unless `make_tiny_checkpoint` can write a
    checkpoint of these options that `Llama.build` loads. The options are
    `make_tiny_checkpoint`'s; `as_flags` names them as `python -m llama.tiny`
    spells them (`--n-heads`). Reads a given tokenizer; imports no torch.
    """
    from llama import family
    from llama.args import ModelArgs, check_model_parallel_fit, check_shape, ffn_hidden_dim, is_positive_finite
    from llama.tokenizer import Tokenizer, check_special_ids, llama3_special_tokens

    def name(option: str) -> str:
        if not as_flags:
            return option
        return "--" + {"family_name": "family"}.get(option, option).replace("_", "-")

    for option, value in [("mp", mp), ("dim", dim), ("n_layers", n_layers), ("n_heads", n_heads),
                          ("multiple_of", multiple_of)]:
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name(option)} must be a positive integer, got {value!r}")
    if n_kv_heads is not None and (not _is_int(n_kv_heads) or n_kv_heads < 0):
        raise ValueError(
            f"{name('n_kv_heads')} must be a positive integer, or 0 for plain multi-head attention, got {n_kv_heads!r}"
        )
    for option, value in [("ffn_dim_multiplier", ffn_dim_multiplier), ("rope_theta", rope_theta),
                          ("rope_scaling_factor", rope_scaling_factor)]:
        if value is not None and not is_positive_finite(value):
            raise ValueError(f"{name(option)} must be a positive, finite number, got {value!r}")
    if not _is_int(seed) or seed not in SEEDS:
        raise ValueError(f"{name('seed')} must be an integer from -2**63 to 2**64 - 1, got {seed!r}")

    # The vocabulary: the given tokenizer's, or the one trained here.
    if tokenizer is not None:
        if vocab_size is not None:
            raise ValueError(
                f"{name('vocab_size')} sizes the tokenizer trained here; {name('tokenizer')} "
                f"{str(tokenizer)!r} has its own size"
            )
        if not os.path.exists(tokenizer):
            raise FileNotFoundError(f"{name('tokenizer')} {str(tokenizer)!r} does not exist")
        if not os.path.isfile(tokenizer):
            raise ValueError(f"{name('tokenizer')} {str(tokenizer)!r} is not a file (a directory?)")
        try:
            given = Tokenizer(str(tokenizer))
            check_special_ids(given)  # the loader's rule: a checkpoint it would refuse is not written
        except ValueError as e:
            raise ValueError(f"{name('tokenizer')} {str(tokenizer)!r}: {e}") from None
        fam, n_words = family.of_tokenizer(given), given.n_words
    else:
        fam = family.by_option(family_name or family.LLAMA_2.option)
        if vocab_size is None:
            vocab_size = fam.tiny_defaults["vocab_size"]
        if fam is family.LLAMA_3:
            sizes, what = TIKTOKEN_RANKS, "BPE ranks (before the 256 special tokens) for the llama3 family"
            n_words = vocab_size + len(llama3_special_tokens())
        else:
            sizes, what = SENTENCEPIECE_VOCAB_SIZES, "pieces for the llama2 family"
            if infill:  # the infilling pieces come on top
                extra = INFILL_EXTRA_PIECES
                sizes, what = range(sizes.start + extra, sizes.stop + extra), what + " with infilling"
            n_words = vocab_size
        if not _is_int(vocab_size) or vocab_size not in sizes:
            raise ValueError(
                f"{name('vocab_size')} must be from {sizes[0]} to {sizes[-1]} {what} "
                f"(what the tokenizer trainer can make of the built-in text), got {vocab_size!r}"
            )

    scaled = fam.tiny_defaults["use_scaled_rope"] if use_scaled_rope is None else use_scaled_rope
    if rope_scaling_factor is not None and not scaled:
        raise ValueError(
            f"{name('rope_scaling_factor')} applies to the scaled rotary embedding (the llama3 family's), "
            "which this checkpoint does not use"
        )
    # The loader's own rules for the shape and its model-parallel split.
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or None,
                     vocab_size=n_words, multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier)
    try:
        check_shape(args)
    except ValueError as e:
        raise ValueError(
            f"{name('dim')} {dim}, {name('n_heads')} {n_heads} and {name('n_kv_heads')} {n_kv_heads} "
            f"do not make a model: {e}"
        ) from None
    if ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier) <= 0:
        raise ValueError(
            f"{name('ffn_dim_multiplier')} {ffn_dim_multiplier} leaves no feed-forward units at {name('dim')} {dim}"
        )
    try:
        check_model_parallel_fit(args, mp)
    except ValueError as e:
        raise ValueError(f"{name('mp')} {mp} does not fit this model: {e}") from None


def make_tiny_checkpoint(
    out_dir,
    mp: int = 1,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: Optional[int] = 2,
    multiple_of: int = 32,
    ffn_dim_multiplier: Optional[float] = None,
    vocab_size: Optional[int] = None,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
    tokenizer: Optional[str] = None,
    family_name: Optional[str] = None,
    rope_theta: Optional[float] = None,
    use_scaled_rope: Optional[bool] = None,
    rope_scaling_factor: Optional[float] = None,
    infill: bool = False,
) -> Path:
    """Write a complete tiny checkpoint directory (weights, params, tokenizer);
    the weights in `dtype` (default float32).

    `family_name` "llama2" (the default) or "llama3" picks the tokenizer to
    train; a `tokenizer` given decides by its kind. Unset options take the
    family's `tiny_defaults` (Llama 3: Llama 3.1's scaled rope; its
    `vocab_size` counts the BPE ranks, before the 256 special tokens) and
    its rope theta. `infill` makes it Code Llama-shaped: a tokenizer with the
    infilling pieces and `rope_theta` 1e6 unless given. `n_kv_heads` None
    or 0: plain multi-head attention. Raises ValueError (FileNotFoundError
    for a missing `tokenizer`), before writing anything, for options the
    loader would refuse (`check_options`), for `infill` with Llama 3 or with
    a given `tokenizer` that lacks the pieces.
    """
    from llama import family
    from llama.model import ModelArgs
    from llama.tokenizer import Tokenizer

    check_options(
        mp=mp, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_dim_multiplier, vocab_size=vocab_size, seed=seed, tokenizer=tokenizer,
        family_name=family_name, rope_theta=rope_theta, use_scaled_rope=use_scaled_rope,
        rope_scaling_factor=rope_scaling_factor, infill=infill,
    )
    wanted = None if family_name is None else family.by_option(family_name)
    if infill:
        from llama.infilling import check_infilling_tokenizer

        if wanted is family.LLAMA_3:
            raise ValueError("infilling is Code Llama's, a Llama 2-family model: not with the llama3 family")
        if tokenizer is not None:
            check_infilling_tokenizer(Tokenizer(str(tokenizer)))
        if rope_theta is None:
            rope_theta = CODE_LLAMA_ROPE_THETA
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out_dir / "tokenizer.model"
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tokenizer_path)
    elif wanted is family.LLAMA_3:
        n_ranks = wanted.tiny_defaults["vocab_size"] if vocab_size is None else vocab_size
        train_tiktoken_bpe(tokenizer_path, n_ranks=n_ranks)
    else:
        if vocab_size is None:
            vocab_size = family.LLAMA_2.tiny_defaults["vocab_size"]
        train_tokenizer(tokenizer_path, vocab_size=vocab_size, infill=infill)
    tok = Tokenizer(str(tokenizer_path))
    fam = family.of_tokenizer(tok)
    if wanted is not None and fam is not wanted:
        raise ValueError(f"the tokenizer {str(tokenizer)!r} is a {fam.name} tokenizer, not {wanted.name}'s")
    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads or None,
        vocab_size=tok.n_words,
        multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_dim_multiplier,
        norm_eps=1e-5,
        rope_theta=fam.default_rope_theta if rope_theta is None else rope_theta,
        use_scaled_rope=fam.tiny_defaults["use_scaled_rope"] if use_scaled_rope is None else use_scaled_rope,
        rope_scaling_factor=rope_scaling_factor,
        tok_embeddings_split_dim=fam.tok_embeddings_split_dim,
    )
    write_checkpoint(out_dir, random_weights(args, seed), args, mp=mp, dtype=dtype)
    return out_dir


def demo_cache_dir() -> Path:
    base = os.environ.get("LLAMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama"
    )
    return Path(base)


def demo_checkpoint(mp: int = 1, infill: bool = False) -> Path:
    """A tiny demo checkpoint of `mp` shards in the cache folder, made on first use
    (Code Llama-shaped, with the infilling pieces, when `infill`).

    Safe to call from every rank at once: each writes a private temporary
    copy and moves it into place; the copies are identical, the first wins.
    """
    # "infill2": the tokenizer gained Code Llama's ☺ piece; a folder made before is not reused.
    target = demo_cache_dir() / (f"demo-infill2-mp{mp}" if infill else f"demo-mp{mp}")
    if (target / "params.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".demo-mp{mp}-", dir=target.parent))
    try:
        make_tiny_checkpoint(tmp, mp=mp, infill=infill)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is not
        atomic.sync_tree(tmp)  # else a power loss could leave params.json beside empty shards
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "params.json").is_file():
                raise
        atomic.sync_directory(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m llama.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="new or empty directory to write")
    parser.add_argument("--family", default=None, choices=["llama2", "llama3"],
                        help="llama3: a tiktoken BPE tokenizer, Llama 3.1's rotary settings, vocabulary-split "
                             "embedding; none: llama2, or the kind of --tokenizer")
    parser.add_argument("--mp", type=int, default=1, help="number of model-parallel shards")
    parser.add_argument("--dim", type=int, default=64, help="model width")
    parser.add_argument("--n-layers", type=int, default=2, help="number of transformer blocks")
    parser.add_argument("--n-heads", type=int, default=4, help="attention (query) heads")
    parser.add_argument("--n-kv-heads", type=int, default=2, help="key/value heads; 0 for plain multi-head attention")
    parser.add_argument("--multiple-of", type=int, default=32, help="the feed-forward size is rounded up to this")
    parser.add_argument("--ffn-dim-multiplier", type=float, default=None,
                        help="scales the feed-forward size; none: Meta's 8/3 x dim (llama3: 1.3)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"size of the tokenizer to train (llama2: {SENTENCEPIECE_VOCAB_SIZES[0]} to "
                             f"{SENTENCEPIECE_VOCAB_SIZES[-1]}, none: 512) or of its BPE ranks before the 256 "
                             f"special tokens (llama3: {TIKTOKEN_RANKS[0]} to {TIKTOKEN_RANKS[-1]}, none: 384)")
    parser.add_argument("--infill", action="store_true",
                        help="Code Llama-shaped (llama2 family): a tokenizer with the infilling pieces, rope theta 1e6")
    parser.add_argument("--rope-theta", type=float, default=None,
                        help="none: 10000 for llama2 (1e6 with --infill), 500000 for llama3")
    parser.add_argument("--rope-scaling-factor", type=float, default=None,
                        help="llama3: write this factor into params.json (Meta's code uses 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the stored weights")
    parser.add_argument("--tokenizer", default=None,
                        help="copy this tokenizer.model (its size is the vocabulary); none: train a small one")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    cli.refuse_used_destination(parser, out)
    if args.rope_scaling_factor is not None and args.family != "llama3":
        parser.error("--rope-scaling-factor applies to --family llama3 (the family with scaled rope)")
    from llama import family

    default_multiplier = family.by_option(args.family or "llama2").tiny_defaults["ffn_dim_multiplier"]
    options = dict(
        mp=args.mp,
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        multiple_of=args.multiple_of,
        ffn_dim_multiplier=default_multiplier if args.ffn_dim_multiplier is None else args.ffn_dim_multiplier,
        vocab_size=args.vocab_size,
        seed=args.seed,
        tokenizer=args.tokenizer,
        family_name=args.family,
        rope_theta=args.rope_theta,
        rope_scaling_factor=args.rope_scaling_factor,
        infill=args.infill,
    )
    try:
        check_options(**options, use_scaled_rope=None, as_flags=True)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    import torch  # after checking: --help and a mistyped flag or shape need not wait for it

    from llama.atomic import output_dir

    def make_in_place_of_out() -> None:
        # Written beside OUT_DIR and renamed into place when complete: an
        # error, Ctrl-C or SIGTERM leaves OUT_DIR as it was.
        with output_dir(out) as tmp:
            make_tiny_checkpoint(tmp, **options, dtype=getattr(torch, args.dtype))

    code = cli.call(make_in_place_of_out)
    if code == 0:
        print(f"wrote a tiny checkpoint ({args.mp} shard(s)) to {out}")
    return code


if __name__ == "__main__":
    cli.run_tool(main)

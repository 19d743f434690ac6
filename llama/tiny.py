"""Tiny random Llama checkpoints in Meta's exact format, for tests and the demo.

    python -m llama.tiny OUT_DIR [--mp N] [--dim 64] [--n-layers 2] ...

writes `params.json`, `consolidated.00.pth` ... (split by Meta's
model-parallel layout) and a `tokenizer.model` (a small SentencePiece BPE
model with byte fallback, trained on built-in text, or a copy of one given
with `--tokenizer`). The weights are seeded random numbers, so the text they
produce is gibberish; what matters is that it is reproducible.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from llama import cli

# torch, and the modules that import it, are imported where the work needs
# them, so that `python -m llama.tiny --help` answers at once.
if TYPE_CHECKING:
    import torch

    from llama.model import ModelArgs

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


def train_tokenizer(path, vocab_size: int = 512) -> None:
    """Train a SentencePiece BPE model with byte fallback, Llama's special ids
    (unk 0, bos 1, eos 2, no pad) and Llama's normalisation, into `path`."""
    import sentencepiece as spm

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
        num_threads=1,
        minloglevel=2,
    )
    Path(path).write_bytes(model.getvalue())


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
    state: Dict[str, torch.Tensor], mp: int, rank: int, args: ModelArgs
) -> Dict[str, torch.Tensor]:
    """Rank `rank`'s part of a full state dict under Meta's MP layout (KV heads
    replicated when `mp` exceeds them), as tensors of their own."""
    from llama.checkpoint import assemble_rank

    part = assemble_rank(lambda index: (state, "the full state dict"), 1, rank, mp, args)
    return {key: tensor.clone() for key, tensor in part.items()}


def write_checkpoint(
    out_dir,
    state: Dict[str, torch.Tensor],
    args: ModelArgs,
    mp: int = 1,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Write `params.json` and `consolidated.NN.pth` for `mp` shards into `out_dir`,
    the weights in `dtype` (default float32)."""
    import torch

    from llama.checkpoint import params_dict

    dtype = torch.float32 if dtype is None else dtype
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params_dict(args), indent=2) + "\n")
    for rank in range(mp):
        shard = {k: v.to(dtype) for k, v in shard_state_dict(state, mp, rank, args).items()}
        torch.save(shard, out_dir / f"consolidated.{rank:02d}.pth")


def make_tiny_checkpoint(
    out_dir,
    mp: int = 1,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: Optional[int] = 2,
    multiple_of: int = 32,
    ffn_dim_multiplier: Optional[float] = None,
    vocab_size: int = 512,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
    tokenizer: Optional[str] = None,
) -> Path:
    """Write a complete tiny checkpoint directory (weights, params, tokenizer);
    the weights in `dtype` (default float32)."""
    from llama.model import ModelArgs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out_dir / "tokenizer.model"
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tokenizer_path)
    else:
        train_tokenizer(tokenizer_path, vocab_size=vocab_size)
    from llama.tokenizer import Tokenizer

    n_words = Tokenizer(str(tokenizer_path)).n_words
    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=n_words,
        multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_dim_multiplier,
        norm_eps=1e-5,
    )
    write_checkpoint(out_dir, random_weights(args, seed), args, mp=mp, dtype=dtype)
    return out_dir


def demo_cache_dir() -> Path:
    base = os.environ.get("LLAMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama"
    )
    return Path(base)


def demo_checkpoint(mp: int = 1) -> Path:
    """A tiny demo checkpoint of `mp` shards in the cache folder, made on first use.

    Safe to call from every rank at once: each writes a private temporary
    copy and moves it into place; the copies are identical, the first wins.
    """
    target = demo_cache_dir() / f"demo-mp{mp}"
    if (target / "params.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".demo-mp{mp}-", dir=target.parent))
    try:
        make_tiny_checkpoint(tmp, mp=mp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is not
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "params.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m llama.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="new or empty directory to write")
    parser.add_argument("--mp", type=int, default=1, help="number of model-parallel shards")
    parser.add_argument("--dim", type=int, default=64, help="model width")
    parser.add_argument("--n-layers", type=int, default=2, help="number of transformer blocks")
    parser.add_argument("--n-heads", type=int, default=4, help="attention (query) heads")
    parser.add_argument("--n-kv-heads", type=int, default=2, help="key/value heads; 0 for plain multi-head attention")
    parser.add_argument("--multiple-of", type=int, default=32, help="the feed-forward size is rounded up to this")
    parser.add_argument("--ffn-dim-multiplier", type=float, default=None,
                        help="scales the feed-forward size; none: Meta's 8/3 x dim")
    parser.add_argument("--vocab-size", type=int, default=512, help="size of the tokenizer to train")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the stored weights")
    parser.add_argument("--tokenizer", default=None,
                        help="copy this tokenizer.model; none: train a small one")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty; choose a new directory")
    import torch  # after parsing: --help and a mistyped flag need not wait for it

    code = cli.call(
        make_tiny_checkpoint,
        out,
        mp=args.mp,
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads or None,
        multiple_of=args.multiple_of,
        ffn_dim_multiplier=args.ffn_dim_multiplier,
        vocab_size=args.vocab_size,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        tokenizer=args.tokenizer,
    )
    if code == 0:
        print(f"wrote a tiny checkpoint ({args.mp} shard(s)) to {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())

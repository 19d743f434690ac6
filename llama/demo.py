"""What the example scripts share: where they find their model (the user's
checkpoint, or the demo one), and the checks they make before loading it."""

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple


def resolve_checkpoint(ckpt_dir: Optional[str], tokenizer_path: Optional[str]) -> Tuple[str, str]:
    """(ckpt_dir, tokenizer_path) to build from.

    With no `ckpt_dir`, a tiny random demo checkpoint with one shard per
    process is made (or reused) in the cache folder, and the choice is
    printed, so that the examples run on a machine with no weights. With a
    `ckpt_dir` and no `tokenizer_path`, the directory's `tokenizer.model`
    (or its parent's, as in Meta's download layout) is used.

    Raises FileNotFoundError when `ckpt_dir` is not a checkpoint directory
    (saying what it is instead) or no tokenizer is found.
    """
    if ckpt_dir is None:
        from llama.tiny import demo_checkpoint

        world_size = int(os.environ.get("WORLD_SIZE", 1))
        ckpt = demo_checkpoint(mp=world_size)
        if int(os.environ.get("RANK", 0)) == 0:
            print(
                f"No --ckpt_dir given: using the demo checkpoint in {ckpt} "
                "(tiny random weights: expect gibberish, not Llama 2's text).\n"
            )
        return str(ckpt), tokenizer_path or str(ckpt / "tokenizer.model")
    from llama.checkpoint import find_shards

    # The directory first: a wrong one is the problem to report, not its missing tokenizer.
    find_shards(ckpt_dir)
    if tokenizer_path is None:
        for candidate in (Path(ckpt_dir) / "tokenizer.model", Path(ckpt_dir).parent / "tokenizer.model"):
            if candidate.is_file():
                return ckpt_dir, str(candidate)
        raise FileNotFoundError(
            f"no tokenizer.model in {ckpt_dir!r} or its parent; pass --tokenizer_path"
        )
    return ckpt_dir, tokenizer_path


def check_request(
    tokenizer_path: str,
    max_seq_len: int,
    max_batch_size: int,
    temperature: float,
    top_p: float,
    max_gen_len: Optional[int],
    prompts: Sequence[str] = (),
    dialogs: Sequence = (),
) -> None:
    """Raise ValueError for arguments a run would fail on after loading the weights:
    sampling parameters, `max_gen_len`, more prompts than `max_batch_size`, and a
    prompt (text, or dialog in the chat format) longer than `max_seq_len`.

    Needs the tokenizer only, so a mistake costs a second, not a load.
    """
    from llama import family
    from llama.generation import _check_sampling
    from llama.tokenizer import Tokenizer

    _check_sampling(temperature, top_p)
    for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_gen_len is not None and max_gen_len < 0:  # as generate() checks it
        raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len!r}")
    count = len(prompts) + len(dialogs)
    if count > max_batch_size:
        raise ValueError(f"this example runs {count} prompts at once: max_batch_size must be at least {count}")
    tokenizer = Tokenizer(tokenizer_path)
    encoded = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    encoded += [family.of_tokenizer(tokenizer).encode_dialog(tokenizer, d) for d in dialogs]  # its chat format
    for tokens in encoded:
        if len(tokens) > max_seq_len:
            raise ValueError(
                f"a prompt of this example is {len(tokens)} tokens, longer than max_seq_len {max_seq_len}"
            )

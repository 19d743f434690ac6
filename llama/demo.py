"""What the example scripts and chat.py share: where they find their model (the
user's checkpoint, or the demo one), the checks they make before loading it, and
how they show a model's text on a terminal."""

import re
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from llama.tokenizer import Tokenizer

# C0 controls (but newline and tab), DEL and C1 controls are shown as \xNN, so
# that a model's text cannot move the cursor or send the terminal escape sequences.
_SHOWN_ESCAPED = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t"}


def printable(text: str) -> str:
    """`text` as the scripts print it: control characters other than newline and tab escaped."""
    return text.translate(_SHOWN_ESCAPED)


def resolve_checkpoint(
    ckpt_dir: Optional[str], tokenizer_path: Optional[str], infill: bool = False
) -> Tuple[str, str]:
    """(ckpt_dir, tokenizer_path) to build from.

    With no `ckpt_dir`, a tiny random demo checkpoint with one shard per
    process (Code Llama-shaped with `infill`) is made (or reused) in the
    cache folder, and the choice is printed, so that the examples run on a
    machine with no weights. With a `ckpt_dir` and no `tokenizer_path`, the
    directory's `tokenizer.model` (or its parent's, as in Meta's download
    layout) is used.

    Raises FileNotFoundError when `ckpt_dir` is not a checkpoint directory
    (saying what it is instead) or no tokenizer is found, ValueError for a
    torchrun variable (WORLD_SIZE, RANK, LOCAL_RANK) that is not a number.
    """
    from llama.distributed import check_launch_variables, launch_variable

    check_launch_variables()
    if ckpt_dir is None:
        from llama.tiny import demo_checkpoint

        ckpt = demo_checkpoint(mp=launch_variable("WORLD_SIZE", 1), infill=infill)
        if launch_variable("RANK", 0) == 0:
            print(
                f"No --ckpt_dir given: using the demo checkpoint in {ckpt} "
                f"(tiny random weights: expect gibberish, not {'Code Llama' if infill else 'Llama 2'}'s text).\n"
            )
        return str(ckpt), tokenizer_path or str(ckpt / "tokenizer.model")
    from llama.checkpoint import find_shards
    from llama.tokenizer import tokenizer_beside

    # The directory first: a wrong one is the problem to report, not its missing tokenizer.
    find_shards(ckpt_dir)
    if tokenizer_path is None:
        tokenizer_path = tokenizer_beside(ckpt_dir)
        if tokenizer_path is None:
            raise FileNotFoundError(f"no tokenizer.model in {ckpt_dir!r} or its parent; pass --tokenizer_path")
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
    infills: Sequence[Tuple[str, str]] = (),
    suffix_first: bool = False,
) -> "Tokenizer":
    """Raise ValueError for arguments a run would fail on after loading the weights:
    sampling parameters, `max_gen_len`, more prompts than `max_batch_size`, and a
    prompt (text, dialog in the chat format, or (prefix, suffix) infilling pair)
    longer than `max_seq_len`; for infilling pairs, also a tokenizer without
    Code Llama's infilling pieces.

    Needs the tokenizer only, so a mistake costs a second, not a load.
    Returns that tokenizer, for a script's own checks.
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
    count = len(prompts) + len(dialogs) + len(infills)
    if count > max_batch_size:
        raise ValueError(f"this example runs {count} prompts at once: max_batch_size must be at least {count}")
    tokenizer = Tokenizer(tokenizer_path)
    encoded = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    encoded += [family.of_tokenizer(tokenizer).encode_dialog(tokenizer, d) for d in dialogs]  # its chat format
    if infills:
        from llama.infilling import infilling_prompt_tokens

        encoded += [infilling_prompt_tokens(tokenizer, pre, suf, suffix_first) for pre, suf in infills]
    for tokens in encoded:
        if len(tokens) > max_seq_len:
            raise ValueError(
                f"a prompt of this example is {len(tokens)} tokens, longer than max_seq_len {max_seq_len}"
            )
    return tokenizer


def check_device(device: Optional[str]) -> None:
    """Raise ValueError unless `device` is None (the default choice), "cpu", "cuda" or
    "cuda:N" for a GPU this process sees: the devices the library runs on."""
    if device is None:
        return
    import torch

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"device {device!r} is not one this library runs on: use cpu, cuda or cuda:N")
    if device == "cpu":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA GPU here; use cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise ValueError(
            f"device {device!r} was asked for, but torch sees {count} GPU{'s' if count > 1 else ''}: "
            f"use cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}"
        )

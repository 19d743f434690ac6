"""Where the example scripts find their model: the user's checkpoint, or the demo one."""

import os
from pathlib import Path
from typing import Optional, Tuple


def resolve_checkpoint(
    ckpt_dir: Optional[str], tokenizer_path: Optional[str], infill: bool = False
) -> Tuple[str, str]:
    """(ckpt_dir, tokenizer_path) to build from.

    With no `ckpt_dir`, a tiny random demo checkpoint with one shard per
    process (Code Llama-shaped with `infill`) is made (or reused) in the
    cache folder, and the choice is printed, so that the examples run on a
    machine with no weights. With a
    `ckpt_dir` and no `tokenizer_path`, the directory's `tokenizer.model`
    (or its parent's, as in Meta's download layout) is used.
    """
    if ckpt_dir is None:
        from llama.tiny import demo_checkpoint

        world_size = int(os.environ.get("WORLD_SIZE", 1))
        ckpt = demo_checkpoint(mp=world_size, infill=infill)
        if int(os.environ.get("RANK", 0)) == 0:
            print(
                f"No --ckpt_dir given: using the demo checkpoint in {ckpt} "
                f"(tiny random weights: expect gibberish, not {'Code Llama' if infill else 'Llama 2'}'s text).\n"
            )
        return str(ckpt), tokenizer_path or str(ckpt / "tokenizer.model")
    if tokenizer_path is None:
        for candidate in (Path(ckpt_dir) / "tokenizer.model", Path(ckpt_dir).parent / "tokenizer.model"):
            if candidate.is_file():
                return ckpt_dir, str(candidate)
        raise FileNotFoundError(
            f"no tokenizer.model in {ckpt_dir!r} or its parent; pass --tokenizer_path"
        )
    return ckpt_dir, tokenizer_path

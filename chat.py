"""Chat with a Llama 2 model in the terminal.

    python chat.py [--ckpt_dir DIR] [--system "You are ..."] [--max_seq_len 512] ...
    torchrun --nproc_per_node N chat.py --ckpt_dir DIR_WITH_N_SHARDS ...

Without --ckpt_dir it chats with a tiny random demo model (gibberish, made
once in ~/.cache/llama or $LLAMA_CACHE); --tokenizer_path defaults to the
tokenizer.model in --ckpt_dir or its parent. /reset starts over, /exit or
Ctrl-D leaves, Ctrl-C stops a reply.
"""

from typing import Optional

import fire

from llama import Llama
from llama.chat_repl import run_chat
from llama.demo import resolve_checkpoint


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_gen_len: Optional[int] = None,
    seed: int = 1,
    device: Optional[str] = None,
    heartbeat_s: float = 60.0,
    quantize: Optional[str] = None,  # "int8" or "int4": weight-only quantization (docs/quant.md)
    group_size: Optional[int] = None,  # int4 only: 32, 64, 128 or 256
):
    ckpt_dir, tokenizer_path = resolve_checkpoint(ckpt_dir, tokenizer_path)
    llama = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=1,
        seed=seed,
        device=device,
        quantize=quantize,
        group_size=group_size,
    )
    run_chat(
        llama,
        # fire turns a value such as "42" into an int; a system prompt is text.
        system=None if system is None else str(system),
        temperature=temperature,
        top_p=top_p,
        max_gen_len=max_gen_len,
        heartbeat_s=heartbeat_s,
    )


if __name__ == "__main__":
    fire.Fire(main)

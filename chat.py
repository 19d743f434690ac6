"""Chat with a Llama model (Llama 2 or 3.x chat format) in the terminal.

    python chat.py [--ckpt_dir DIR] [--system "You are ..."] [--max_seq_len 512] ...
    torchrun --nproc_per_node N chat.py --ckpt_dir DIR_WITH_N_SHARDS ...

Without --ckpt_dir it chats with a tiny random demo model (gibberish, made
once in ~/.cache/llama or $LLAMA_CACHE); --tokenizer_path defaults to the
tokenizer.model in --ckpt_dir or its parent. /reset starts over, /exit or
Ctrl-D leaves, Ctrl-C stops a reply.
"""

from typing import Literal, Optional

from llama.cli import run  # it also says so when a folder named llama beside this script hides the package


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
    collective_timeout_s: float = 120.0,
    quantize: Optional[Literal["int8", "int4"]] = None,
    group_size: Optional[int] = None,
):
    """Chat with a Llama 2, Llama 3.x or Code Llama Instruct model in the terminal. /reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops a reply.

    Args:
        ckpt_dir: checkpoint directory (params.json, consolidated.NN.pth); none: a tiny random demo checkpoint
        tokenizer_path: tokenizer.model; none: the one in --ckpt_dir or its parent
        system: system prompt, kept at the start of the conversation
        temperature: sampling temperature; 0 is greedy
        top_p: nucleus sampling: sample from the tokens that make up this much probability
        max_seq_len: longest conversation the model sees, in tokens; older turns are dropped to fit
        max_gen_len: longest reply, in tokens; none: half of max_seq_len
        seed: random seed, the same on every rank
        device: cpu, cuda or cuda:N; none: this process's GPU if there is one, else the CPU
        heartbeat_s: under torchrun, how often rank 0 wakes the other ranks while it waits for input
        collective_timeout_s: under torchrun, how long a rank waits for another before all stop, naming it
        quantize: store the weight matrices as int8 or int4 (docs/compressed-weights.md); none: as loaded
        group_size: int4 only: inputs per scale, 32, 64, 128 or 256; none: 32
    """
    from llama import Llama, family
    from llama.chat_repl import Conversation, check_heartbeat, check_room, reply_length, run_chat
    from llama.demo import check_device, check_request, resolve_checkpoint
    from llama.distributed import exit_when_a_peer_is_lost
    from llama.generation import check_seed

    check_device(device)
    check_seed(seed)
    ckpt_dir, tokenizer_path = resolve_checkpoint(ckpt_dir, tokenizer_path)
    # Everything that needs no weights is checked before they load.
    tokenizer = check_request(tokenizer_path, max_seq_len, 1, temperature, top_p, max_gen_len)
    reply_length(max_gen_len, max_seq_len)
    conversation = Conversation(system, family.of_tokenizer(tokenizer))  # the chat format follows the tokenizer
    check_room(conversation, tokenizer, max_seq_len)  # else every message would be refused
    check_heartbeat(heartbeat_s, collective_timeout_s)
    llama = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=1,
        seed=seed,
        device=device,
        # A frozen rank: after this long, rank 0 names it and every rank exits.
        collective_timeout_s=collective_timeout_s,
        quantize=quantize,
        group_size=group_size,
    )
    with exit_when_a_peer_is_lost():
        run_chat(
            llama,
            system=system,
            temperature=temperature,
            top_p=top_p,
            max_gen_len=max_gen_len,
            heartbeat_s=heartbeat_s,
        )


if __name__ == "__main__":
    run(main)

"""Answer a few dialogs with a Llama chat checkpoint (Llama 2, Llama 3.x or Code Llama Instruct).

    torchrun --nproc_per_node 1 example_chat_completion.py \
        --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model

Without --ckpt_dir it runs on a tiny random demo checkpoint.
"""

from typing import Literal, Optional

from llama.cli import run  # it also says so when a folder named llama beside this script hides the package

DIALOGS = [
    # A single turn.
    [{"role": "user", "content": "What are three things to pack for a day of hiking?"}],
    # Several turns: the last question depends on the earlier answer.
    [
        {"role": "user", "content": "Suggest a name for a grey cat."},
        {"role": "assistant", "content": "How about Pebble? It suits a small grey cat."},
        {"role": "user", "content": "Why does that name suit it?"},
    ],
    # A system prompt that sets the assistant's manner.
    [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "How does a rainbow form?"},
    ],
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
    max_gen_len: Optional[int] = None,
    collective_timeout_s: float = 120.0,
    quantize: Optional[Literal["int8", "int4"]] = None,
    group_size: Optional[int] = None,
):
    """Answer a few dialogs with a Llama chat checkpoint (a tiny random demo one without --ckpt_dir).

    Args:
        ckpt_dir: checkpoint directory (params.json, consolidated.NN.pth); none: a tiny random demo checkpoint
        tokenizer_path: tokenizer.model; none: the one in --ckpt_dir or its parent
        temperature: sampling temperature; 0 is greedy
        top_p: nucleus sampling: sample from the tokens that make up this much probability
        max_seq_len: longest dialog plus answer, in tokens
        max_batch_size: most dialogs run at once (this example has 3)
        max_gen_len: most tokens per answer; none: up to max_seq_len
        collective_timeout_s: under torchrun, how long a rank waits for another before all stop, naming it
        quantize: store the weight matrices as int8 or int4 (docs/compressed-weights.md); none: as loaded
        group_size: int4 only: inputs per scale, 32, 64, 128 or 256; none: 32
    """
    from llama import Llama
    from llama.demo import check_request, printable, resolve_checkpoint
    from llama.distributed import exit_when_a_peer_is_lost

    ckpt_dir, tokenizer_path = resolve_checkpoint(ckpt_dir, tokenizer_path)
    # Everything that needs no weights is checked before they load.
    check_request(tokenizer_path, max_seq_len, max_batch_size, temperature, top_p, max_gen_len, dialogs=DIALOGS)
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        # A frozen rank: after this long, rank 0 names it and every rank exits.
        collective_timeout_s=collective_timeout_s,
        quantize=quantize,
        group_size=group_size,
    )
    with exit_when_a_peer_is_lost():
        results = generator.chat_completion(
            DIALOGS,
            max_gen_len=max_gen_len,
            temperature=temperature,
            top_p=top_p,
        )

    for dialog, result in zip(DIALOGS, results):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: {printable(result['generation']['content'])}")
        print("\n==================================\n")


if __name__ == "__main__":
    run(main)

"""Complete a few prompts with a Llama checkpoint.

    torchrun --nproc_per_node 1 example_text_completion.py \
        --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model

Without --ckpt_dir it runs on a tiny random demo checkpoint.
"""

from typing import Literal, Optional

from llama.cli import run  # it also says so when a folder named llama beside this script hides the package

PROMPTS = [
    # A plain completion: the model continues the sentence.
    "The best way to learn a new language is",
    # A few-shot prompt: the pattern tells the model what to produce.
    """Name the capital city of each country.

France: Paris
Japan: Tokyo
Kenya: Nairobi
Canada:""",
    # A few-shot translation in the style of the reference's example.
    """English to Spanish:

good morning => buenos días
thank you => gracias
the red house =>""",
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: Optional[int] = 64,
    max_batch_size: int = 4,
    collective_timeout_s: float = 120.0,
    quantize: Optional[Literal["int8", "int4"]] = None,
    group_size: Optional[int] = None,
):
    """Complete a few prompts with a Llama checkpoint (a tiny random demo one without --ckpt_dir).

    Args:
        ckpt_dir: checkpoint directory (params.json, consolidated.NN.pth); none: a tiny random demo checkpoint
        tokenizer_path: tokenizer.model; none: the one in --ckpt_dir or its parent
        temperature: sampling temperature; 0 is greedy
        top_p: nucleus sampling: sample from the tokens that make up this much probability
        max_seq_len: longest prompt plus generation, in tokens
        max_gen_len: most tokens generated per prompt; none: up to max_seq_len
        max_batch_size: most prompts run at once (this example has 3)
        collective_timeout_s: under torchrun, how long a rank waits for another before all stop, naming it
        quantize: store the weight matrices as int8 or int4 (docs/compressed-weights.md); none: as loaded
        group_size: int4 only: inputs per scale, 32, 64, 128 or 256; none: 32
    """
    from llama import Llama
    from llama.demo import check_request, printable, resolve_checkpoint
    from llama.distributed import exit_when_a_peer_is_lost

    ckpt_dir, tokenizer_path = resolve_checkpoint(ckpt_dir, tokenizer_path)
    # Everything that needs no weights is checked before they load.
    check_request(tokenizer_path, max_seq_len, max_batch_size, temperature, top_p, max_gen_len, prompts=PROMPTS)
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
        results = generator.text_completion(
            PROMPTS,
            max_gen_len=max_gen_len,
            temperature=temperature,
            top_p=top_p,
        )
    for prompt, result in zip(PROMPTS, results):
        print(prompt)
        print(f"> {printable(result['generation'])}")
        print("\n==================================\n")


if __name__ == "__main__":
    run(main)

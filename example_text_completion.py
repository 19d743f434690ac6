"""Complete a few prompts with a Llama checkpoint.

    torchrun --nproc_per_node 1 example_text_completion.py \
        --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model

Without --ckpt_dir it runs on a tiny random demo checkpoint.
"""

from typing import Optional

import fire

from llama import Llama
from llama.demo import resolve_checkpoint


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    quantize: Optional[str] = None,  # "int8" or "int4": weight-only quantization (docs/quant.md)
    group_size: Optional[int] = None,  # int4 only: 32, 64, 128 or 256
):
    ckpt_dir, tokenizer_path = resolve_checkpoint(ckpt_dir, tokenizer_path)
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        quantize=quantize,
        group_size=group_size,
    )

    prompts = [
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
    results = generator.text_completion(
        prompts,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)

"""Fill in the middle of a few code snippets with a Code Llama checkpoint.

    torchrun --nproc_per_node 1 example_infilling.py \
        --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model

Infilling needs a model trained for it: CodeLlama-7b, CodeLlama-13b and their
Instruct models. Without --ckpt_dir it runs on a tiny random demo checkpoint
with Code Llama's infilling pieces.
"""

from typing import Literal, Optional

from llama.cli import run  # it also says so when a folder named llama beside this script hides the package

# The model writes the text at <FILL>, given what comes before and after it.
FILL = "<FILL>"
PROMPTS = [
    # A function body, from its name and its return statement.
    '''def mean(values):
    """The arithmetic mean of a non-empty list."""
<FILL>
    return total / len(values)
''',
    # A missing argument list, from how the class is used below.
    """class Point:
    def __init__(<FILL>
        self.x = x
        self.y = y

origin = Point(x=0, y=0)
""",
    # A shell command inside documentation.
    """To run the tests:

```bash
<FILL>
```
""",
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.0,
    top_p: float = 0.9,
    max_seq_len: int = 192,
    max_gen_len: Optional[int] = 128,
    max_batch_size: int = 4,
    suffix_first: bool = False,
    quantize: Optional[Literal["int8", "int4"]] = None,
    group_size: Optional[int] = None,
):
    """Fill in the middle of a few code snippets with Code Llama (a tiny random demo one without --ckpt_dir).

    Args:
        ckpt_dir: checkpoint directory (params.json, consolidated.NN.pth); none: a tiny random demo checkpoint
        tokenizer_path: tokenizer.model; none: the one in --ckpt_dir or its parent
        temperature: sampling temperature; 0 is greedy
        top_p: nucleus sampling: sample from the tokens that make up this much probability
        max_seq_len: longest prompt plus generation, in tokens
        max_gen_len: most tokens generated per snippet; none: up to max_seq_len
        max_batch_size: most snippets run at once (this example has 3)
        suffix_first: lay the prompt out suffix-prefix-middle instead of prefix-suffix-middle
        quantize: store the weight matrices as int8 or int4 (docs/compressed-weights.md); none: as loaded
        group_size: int4 only: inputs per scale, 32, 64, 128 or 256; none: 32
    """
    from llama import Llama
    from llama.demo import check_request, printable, resolve_checkpoint

    infills = [tuple(prompt.split(FILL, 1)) for prompt in PROMPTS]
    ckpt_dir, tokenizer_path = resolve_checkpoint(ckpt_dir, tokenizer_path, infill=True)
    # Everything that needs no weights (the tokenizer's infilling pieces too) is checked before they load.
    check_request(tokenizer_path, max_seq_len, max_batch_size, temperature, top_p, max_gen_len,
                  infills=infills, suffix_first=suffix_first)
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        quantize=quantize,
        group_size=group_size,
    )
    results = generator.text_infilling(
        prefixes=[prefix for prefix, _ in infills],
        suffixes=[suffix for _, suffix in infills],
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
        suffix_first=suffix_first,
    )
    for prompt, result in zip(PROMPTS, results):
        print(prompt)
        print(f"> filled in: {result['generation']!r}\n")
        print(printable(result["full_text"]))
        print("\n==================================\n")


if __name__ == "__main__":
    run(main)

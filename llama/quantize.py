"""Write a weight-only quantized copy of a Meta-format checkpoint.

    python -m llama.quantize SRC DST --quantize int8|int4 [--group-size N] [--keep-output]

`Llama.build(DST, ...)` then loads the int8 or int4 weights directly,
without quantizing at every start. The format and the arithmetic are in
`llama/quant_format.py` and `llama/quantization.py`; this module is the command line only, so that
`--help` and a mistyped flag answer before torch is imported.
"""


from llama import cli
from llama.quant_format import GROUP_SIZES, MODES  # no torch


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m llama.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint directory to read (params.json, consolidated.NN.pth)")
    parser.add_argument("dst", help="new or empty directory to write")
    parser.add_argument("--quantize", required=True, choices=MODES, help="int8: per output channel; int4: grouped")
    parser.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES,
                        help="int4 only: inputs per scale; none: 32")
    parser.add_argument("--keep-output", action="store_true", help="leave the output projection unquantized")
    opts = parser.parse_args(argv)
    cli.refuse_used_destination(parser, opts.dst)
    from llama import quantization  # imports torch: after parsing

    def write() -> None:
        config = quantization.make_config(opts.quantize, opts.group_size, False if opts.keep_output else None)
        quantization.quantize_checkpoint(opts.src, opts.dst, config)
        print(f"wrote {opts.dst} ({config.describe()})")

    return cli.call(write)


if __name__ == "__main__":
    cli.run_tool(main)

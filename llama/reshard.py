"""Write a copy of a Meta-format checkpoint for another model-parallel size.

    python -m llama.reshard SRC DST --mp N [--dtype bfloat16]

`Llama.build` already reshards at load time; a copy saves that work on
every start and lets each rank read one file. DST must be new or empty; SRC
is only read. `params.json` and `tokenizer.model` are copied alongside.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from llama import cli

if TYPE_CHECKING:
    import torch


def reshard(
    src, dst, model_parallel_size: int, dtype: Optional[torch.dtype] = None, progress: bool = True
) -> Path:
    """Write `src` resharded into `model_parallel_size` shards in `dst`; returns `dst`.

    Raises FileExistsError if `dst` is a non-empty directory (or a file),
    ValueError if the model cannot be split that way, and whatever
    reading `src` raises (see `checkpoint.load_for_rank`).
    """
    import torch  # here, not at the top: `--help` need not wait for it

    from llama import atomic, checkpoint, family, quantization

    src, dst = Path(src), Path(dst)
    shards = checkpoint.find_shards(src)
    checkpoint.require_new_dir(dst)
    args = family.model_args_of_checkpoint(src, shards)
    checkpoint.check_model_parallel_fit(args, model_parallel_size, n_shards=len(shards))
    # A quantized checkpoint (llama/quantization.py) keeps its integer weights and scales as they are.
    quant = quantization.config_from_params(checkpoint.read_params(src), f"{str(src)!r}/params.json")
    if quant is not None:
        quantization.check_fit(args, quant, [len(shards), model_parallel_size])

    n_tensors = checkpoint.n_weights(args)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=n_tensors * model_parallel_size, unit="tensor", desc=f"Resharding to MP={model_parallel_size}"
        )
    try:
        # Written beside DST and renamed into place when complete: an error,
        # Ctrl-C or SIGTERM leaves DST as it was.
        with atomic.output_dir(dst) as out:
            for rank in range(model_parallel_size):
                part = checkpoint.load_for_rank(
                    shards,
                    rank,
                    model_parallel_size,
                    args,
                    dtype=dtype,
                    progress=False,
                    quant=quant,
                )
                # clone(): a slice saved as it is would drag its whole source storage along.
                shard = {key: tensor.clone() for key, tensor in part.items()}
                # Every rank's shard holds the same shapes: the output is this one N times over.
                with atomic.writing(model_parallel_size * sum(t.nbytes for t in shard.values())):
                    torch.save(shard, out / f"consolidated.{rank:02d}.pth")
                del part, shard
                if bar is not None:
                    bar.update(n_tensors)
            shutil.copyfile(src / "params.json", out / "params.json")
            if (src / "tokenizer.model").is_file():
                shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
    finally:
        if bar is not None:
            bar.close()
    return dst


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m llama.reshard", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint directory to read (params.json, consolidated.NN.pth)")
    parser.add_argument("dst", help="new or empty directory to write")
    parser.add_argument("--mp", type=int, required=True, help="number of model-parallel shards to write")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="store the weights in this dtype (default: as in SRC)")
    args = parser.parse_args(argv)
    if args.mp < 1:
        parser.error("--mp must be at least 1")
    cli.refuse_used_destination(parser, args.dst)
    import torch  # after parsing: --help and a mistyped flag need not wait for it

    dtype = getattr(torch, args.dtype) if args.dtype else None
    code = cli.call(reshard, args.src, args.dst, args.mp, dtype=dtype)
    if code == 0:
        print(f"wrote {args.mp} shard(s) to {args.dst}")
    return code


if __name__ == "__main__":
    cli.run_tool(main)

"""Milliseconds of one C decode step (`native.DecodeStep`) at several batch sizes, for one or
more git revisions side by side.

    python benchmarks/batch_step.py .                        # this checkout's llama/, as built in place
    python benchmarks/batch_step.py main .                   # main (exported, compiled) against this checkout
    python benchmarks/batch_step.py main HEAD --batches 1,4,8,16 --steps 30 --rounds 3 --quantize int8

Each revision other than "." is exported and compiled as `ablate.py` does it. Every round runs
each revision once, in its own process and in turn (each round starting with the next one), so
that a busy machine's load falls on all of them alike; a run builds the shape from the same seeded random weights (as `bench.py`'s
OurRunner), warms up, then times `steps` calls of the step at each batch size, at positions
`--position` onwards, on `--threads` threads fixed (LLAMA_NATIVE_THREADS, so that the adaptive
count does not move between revisions). Prints the median of every step timed at each batch size
and each revision's ratio to the first (above 1: faster).

    python benchmarks/batch_step.py . --against /tmp/old/_native.cpython-311-x86_64-linux-gnu.so

With `--against LIBRARY` (one revision), a step of that revision's library and one of LIBRARY
(another build of llama/native.c whose llama_model is laid out as this one's: ABI 8 or 9) take
turns in the same process, on the same model and cache, both called as llama_decode_step: the
steps are then timed side by side, which separates a few percent where a shared machine's load
moves whole processes by more.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# Run inside each revision's process: it uses only what every revision with a C step has.
WORKER = r"""
import json, sys, time, torch
from llama import checkpoint, distributed, native
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.tiny import random_weights
from llama.tokenizer import Tokenizer

shape, batches, position, steps, threads, tokenizer_path, quantize, group_size, dtype, against = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
torch.set_num_threads(threads)
args = ModelArgs(**shape, max_seq_len=position + steps + 8, max_batch_size=max(batches))
distributed.init_distributed(torch.device("cpu"), 1)
with checkpoint.init_on_meta():
    model = Transformer(args)
options = {}
if quantize:  # as bench.py does: quantized from the fp32 values
    from llama import quantization
    config = quantization.make_config(quantize, group_size)
    state, parts = random_weights(args, seed=0), {}
    convert = quantization.converter(config, torch.float32, 1)
    for key in list(state):
        parts.update(convert(key, state.pop(key), None))
    quantization.install(model, parts, config, torch.device("cpu"), torch.float32)
    options["fast_layout"] = False  # the quantized kernels are the layout
else:
    checkpoint.load_into(model, random_weights(args, seed=0), torch.device("cpu"), dtype, source="random")
generator = Llama.from_model(model, Tokenizer(tokenizer_path), **options)
step = generator.step.one_token
if not isinstance(step, native.DecodeStep):
    sys.exit(f"the C step does not run this model: {native.unavailable_reason()}")
tokens = torch.randint(3, args.vocab_size, (max(batches), 1), generator=torch.Generator().manual_seed(1))
times = {}
if against is None:
    with torch.inference_mode():
        for bsz in batches:
            for pos in range(position, position + 3):  # warm-up
                step(tokens[:bsz], pos)
            times[bsz] = []
            for pos in range(position, position + steps):
                start = time.perf_counter()
                step(tokens[:bsz], pos)
                times[bsz].append(time.perf_counter() - start)
    print(json.dumps({"times": times, "kernels": native.variant()}))
    sys.exit()

import ctypes
libraries = {"ours": native._load(), "against": ctypes.CDLL(against)}
libraries["against"].llama_native_abi.restype = ctypes.c_int64
if libraries["against"].llama_native_abi() not in (8, 9):
    sys.exit(f"{against}: ABI {libraries['against'].llama_native_abi()}, whose llama_model may differ from ABI 8 and 9's")
for lib in libraries.values():
    lib.llama_decode_step.restype = ctypes.c_int64
    lib.llama_decode_step.argtypes = native._load().llama_decode_step.argtypes
with torch.inference_mode():
    step(tokens[:1], 0)  # binds the C model to the model's tensors
ids = tokens.view(-1).contiguous()
for bsz in batches:
    logits = torch.empty(bsz, args.vocab_size)
    scratch = torch.empty(native._load().llama_scratch_floats(ctypes.byref(step._model), bsz))
    times[bsz] = {"ours": [], "against": []}
    for i, pos in enumerate(list(range(position, position + 3)) + list(range(position, position + steps))):
        for name in (("ours", "against") if i % 2 else ("against", "ours")):
            start = time.perf_counter()
            status = libraries[name].llama_decode_step(ctypes.byref(step._model), ids.data_ptr(), bsz, pos,
                                                      logits.data_ptr(), scratch.data_ptr(), threads)
            if status != 0:
                sys.exit(f"llama_decode_step of {name} returned {status}")
            if i >= 3:  # after the warm-up
                times[bsz][name].append(time.perf_counter() - start)
libraries["against"].llama_native_variant.restype = ctypes.c_char_p
print(json.dumps({"times": times, "kernels": native.variant(),
                  "against_kernels": libraries["against"].llama_native_variant().decode()}))
"""


def main(argv=None) -> int:
    from ablate import export
    from bench import LLAMA2_TOKENIZER, SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs="+", help='git revisions, or "." for this checkout; the first is the baseline')
    parser.add_argument("--shape", default="100M", choices=sorted(SHAPES))
    parser.add_argument("--batches", default="1,4,8,16", help="comma-separated batch sizes")
    parser.add_argument("--position", type=int, default=32, help="the position of the first step timed")
    parser.add_argument("--steps", type=int, default=20, help="steps timed at each batch size in each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None)
    parser.add_argument("--group-size", type=int, default=None, help="with --quantize int4")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the model's dtype (without --quantize)")
    parser.add_argument("--json", type=Path, default=None, help="also write every step's time here")
    parser.add_argument("--against", type=Path, default=None,
                        help="a built llama/native.c (ABI 8 or 9) whose steps take turns with the revision's")
    opts = parser.parse_args(argv)
    batches = [int(b) for b in opts.batches.split(",")]
    if opts.against is not None and len(opts.revs) != 1:
        parser.error("--against compares one revision with the library it names")
    # The series timed, the baseline first: each revision, or LIBRARY and the revision.
    names = [str(opts.against), opts.revs[0]] if opts.against is not None else list(opts.revs)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = LLAMA2_TOKENIZER
        if not tokenizer.is_file():
            from llama.tiny import train_tokenizer

            tokenizer = Path(tmp) / "tokenizer.model"
            train_tokenizer(tokenizer)
        folders = {rev: REPO if rev == "." else export(rev, Path(tmp)) for rev in opts.revs}
        job = [SHAPES[opts.shape], batches, opts.position, opts.steps, opts.threads, str(tokenizer),
               opts.quantize, opts.group_size, opts.dtype,
               None if opts.against is None else str(opts.against.resolve())]
        times = {name: {b: [] for b in batches} for name in names}
        kernels = {}
        for round_ in range(opts.rounds):
            order = list(folders)[round_ % len(folders):] + list(folders)[:round_ % len(folders)]
            for rev in order:  # each revision first in turn, so that none always follows another
                folder = folders[rev]
                env = {**os.environ, "PYTHONPATH": str(folder), "LLAMA_NATIVE_THREADS": str(opts.threads)}
                proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job)], env=env,
                                      capture_output=True, text=True, cwd=tmp)
                if proc.returncode != 0:
                    sys.exit(f"{rev} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                for b in batches:
                    if opts.against is None:
                        times[rev][b] += result["times"][str(b)]
                    else:
                        times[rev][b] += result["times"][str(b)]["ours"]
                        times[names[0]][b] += result["times"][str(b)]["against"]
                kernels[rev] = result["kernels"]
                if opts.against is not None:
                    kernels[names[0]] = result["against_kernels"]
            print(f"round {round_ + 1}: " + "; ".join(
                f"{rev} " + ", ".join(f"b{b} {1e3 * statistics.median(t[b][-opts.steps:]):.1f}" for b in batches)
                for rev, t in times.items()) + " ms", flush=True)

    mode = opts.quantize or opts.dtype
    print(f"\n{opts.shape} {mode}, {opts.threads} threads, median ms/step of {opts.rounds} x {opts.steps} steps "
          f"(tokens/s; speed against {names[0]}" + (", in turn in one process)" if opts.against else ")"))
    print("| revision | kernels | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    for name in names:
        cells = []
        for b in batches:
            median = statistics.median(times[name][b])
            ratio = statistics.median(times[names[0]][b]) / median
            cells.append(f"{1e3 * median:.2f} ({b / median:.0f} tok/s, {ratio:.2f}x)")
        print(f"| {name} | {kernels[name]} | " + " | ".join(cells) + " |")
    if opts.json is not None:
        options = {key: str(value) if isinstance(value, Path) else value for key, value in vars(opts).items()}
        opts.json.write_text(json.dumps({"options": options, "kernels": kernels, "times": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

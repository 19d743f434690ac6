"""Decode speed of this library at several git revisions, side by side.

    python benchmarks/ablate.py main HEAD                 # the reference-style code against now
    python benchmarks/ablate.py main HEAD --shape 15M --batch 8 --rounds 7
    python benchmarks/ablate.py 5b078ad HEAD --quantize int4     # quantized while loading, each revision's way
    python benchmarks/ablate.py HEAD~1 HEAD --dtype bf16         # a bf16 model
    python benchmarks/ablate.py HEAD~1 HEAD --prefill --prompt-len 47  # the prompt instead of the steps
    python benchmarks/ablate.py HEAD~1 HEAD --temperature 0.6 --top-p 0.9  # sampled, as text_completion's defaults
    LLAMA_NATIVE_ISA=portable python benchmarks/ablate.py HEAD  # the revisions' C step on other kernels

Each revision's `llama/` package is exported (`git archive`) to a temporary
folder, with its `llama/native.c` (where it has one) compiled there with the
flags of the revision's own setup.py; every round runs each revision once, in its own process and in turn,
so that the load of a busy machine falls on all of them alike. A run builds
the shape from the same seeded random weights, warms up, then times greedy
decoding (with --temperature, sampled, torch's generator seeded alike in every
run) through the revision's own `generate` loop (with --prefill, the
time from the start to the first token instead: the prompt's forward and
one draw). Prints the median milliseconds per decode step (or per prompt)
and each revision's speed relative to the first,
and each one's fastest round (on a busy machine a round can be many times
slower than the others: two OpenMP threads on two shared cores wait for each
other at every product).
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

# Run inside each revision's process: it must work with every revision's API.
WORKER = r"""
import json, sys, time, torch
from llama import checkpoint, distributed
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.tiny import random_weights
from llama.tokenizer import Tokenizer

shape, batch, prompt_len, gen_len, threads, tokenizer_path, options, quantize, group_size, dtype, prefill, temperature, top_p = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
torch.set_num_threads(threads)
args = ModelArgs(**shape, max_seq_len=prompt_len + gen_len, max_batch_size=batch)
distributed.init_distributed(torch.device("cpu"), 1)
with checkpoint.init_on_meta():
    model = Transformer(args)
if quantize:  # as bench.py does: quantized from the fp32 values, in the revision's default dtype
    from llama import quantization
    config = quantization.make_config(quantize, group_size)
    dtype = quantization.default_dtype(torch.device("cpu"))
    state, parts = random_weights(args, seed=0), {}
    convert = quantization.converter(config, dtype, 1)
    for key in list(state):
        parts.update(convert(key, state.pop(key), None))
    quantization.install(model, parts, config, torch.device("cpu"), dtype)
else:
    checkpoint.load_into(model, random_weights(args, seed=0), torch.device("cpu"), dtype, source="random")
tokenizer = Tokenizer(tokenizer_path)
if hasattr(Llama, "from_model"):
    generator = Llama.from_model(model, tokenizer, **options)
else:  # the revisions before from_model: build's own tail
    model.setup_caches(device=torch.device("cpu"), dtype=dtype)
    model.eval()
    generator = Llama(model, tokenizer)
prompts = torch.randint(3, args.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()

def run():
    stamps = []
    with torch.inference_mode():
        torch.manual_seed(0)  # the same draws in every run and revision
        start = time.perf_counter()
        state = generator._start_decoding(prompts, gen_len, temperature, top_p, False)
        for _ in generator._decode_steps(state):
            stamps.append(time.perf_counter())
            if prefill:  # the prompt's forward and its draw
                return stamps[0] - start
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

run()
try:  # the C step's kernels, where the revision names them
    from llama.native import variant
    kernels = variant()
except ImportError:
    kernels = None
print(json.dumps({"step_s": min(run() for _ in range(2)), "kernels": kernels}))
"""


def export(rev: str, into: Path) -> Path:
    folder = into / rev.replace("/", "_")
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "llama", "setup.py"], check=True,
                             capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    source = folder / "llama" / "native.c"
    if source.is_file():  # the revision's C step, built with its setup.py's flags
        import sysconfig

        target = folder / "llama" / ("_native" + sysconfig.get_config_var("EXT_SUFFIX"))
        subprocess.run([os.environ.get("CC", "cc"), *compile_flags(folder / "setup.py"), "-shared", "-fPIC",
                        str(source), "-o", str(target)], check=True)
    return folder


def compile_flags(setup_py: Path) -> list:
    """The `extra_compile_args` of the native Extension in a revision's setup.py, read as a literal."""
    import ast

    for node in ast.walk(ast.parse(setup_py.read_text())):
        if isinstance(node, ast.keyword) and node.arg == "extra_compile_args":
            return ast.literal_eval(node.value)
    raise ValueError(f"{setup_py} has no extra_compile_args")


def main(argv=None) -> int:
    from bench import LLAMA2_TOKENIZER, SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs="+", help="git revisions; the first is the baseline")
    parser.add_argument("--shape", default="100M", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="build the revisions that accept it with compile=True")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="quantize the weights (revisions that have llama/quantization.py)")
    parser.add_argument("--group-size", type=int, default=None, help="with --quantize int4")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the model's dtype (without --quantize)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (the default here): greedy; text_completion's default is 0.6")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature; text_completion's default is 0.9")
    parser.add_argument("--prefill", action="store_true",
                        help="time the prompt (start to first token) instead of the decode steps")
    opts = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = LLAMA2_TOKENIZER
        if not tokenizer.is_file():
            from llama.tiny import train_tokenizer

            tokenizer = Path(tmp) / "tokenizer.model"
            train_tokenizer(tokenizer)
        folders = {rev: export(rev, Path(tmp)) for rev in opts.revs}
        options = {"compile": True} if opts.compile else {}
        job = [SHAPES[opts.shape], opts.batch, opts.prompt_len, opts.gen_len, opts.threads, str(tokenizer), options,
               opts.quantize, opts.group_size, opts.dtype, opts.prefill, opts.temperature, opts.top_p]
        steps = {rev: [] for rev in opts.revs}
        kernels = {}
        for round_ in range(opts.rounds):
            for rev, folder in folders.items():
                env = {**os.environ, "PYTHONPATH": str(folder)}
                proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job)], env=env,
                                      capture_output=True, text=True, cwd=tmp)
                if proc.returncode != 0:
                    sys.exit(f"{rev} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                steps[rev].append(result["step_s"])
                kernels[rev] = result.get("kernels")
            print(f"round {round_ + 1}: " + ", ".join(f"{r} {1e3 * s[-1]:.1f} ms" for r, s in steps.items()), flush=True)

    base = statistics.median(steps[opts.revs[0]])
    mode = opts.quantize or opts.dtype
    what, unit, tokens = ("prompt", "ms/prompt", opts.batch * opts.prompt_len) if opts.prefill else ("decode", "ms/step",
                                                                                                      opts.batch)
    sampled = f", sampled at temperature {opts.temperature}, top-p {opts.top_p}" if opts.temperature > 0 else ""
    print(f"\n{opts.shape} {mode}, batch {opts.batch}, {what}{sampled}"
          f"{f' of {opts.prompt_len} tokens' if opts.prefill else ''}, {opts.threads} threads, median of {opts.rounds} rounds")
    for rev in opts.revs:
        median = statistics.median(steps[rev])
        named = f"  (C kernels: {kernels[rev]})" if kernels.get(rev) else ""
        print(f"{rev:>12}: {1e3 * median:7.2f} {unit}  {tokens / median:7.1f} tok/s  {base / median:5.2f}x"
              f"  (fastest round {1e3 * min(steps[rev]):.2f} ms){named}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

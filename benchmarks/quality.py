"""How far bf16, int8 and int4 move the model from fp32, teacher-forced, on random weights.

    python benchmarks/quality.py                       # 100M shape, every mode
    python benchmarks/quality.py --modes bf16,int8 --shape 15M --sequences 2

It writes one seeded random Meta-format checkpoint (fp32; each matrix with
standard deviation 1/sqrt(fan-in), so activations keep their scale through
the layers; the output layer scaled by `--logit-std` so that the
next-token distributions are peaked as a trained model's are), builds it
once per mode through `Llama.build` (quantizing while loading, or from an
offline checkpoint for the "output kept" variants), and reports against the
fp32 build on the same fixed token sequences:

- mean and p99 over positions of KL(fp32 || mode) of the next-token distribution;
- top-1 agreement: the fraction of positions whose most likely next token is fp32's;
- greedy continuation: each mode's own 128 greedy tokens after a prompt,
  against fp32's: the fraction of the 128 that match position by position,
  and the mean number of tokens before the first difference.

Free-running greedy text diverges after the first near-tie and then stays
apart, so the teacher-forced figures are the ones that measure the error.

"bf16-weights" is a diagnosis rather than a mode: the fp32 model with every
weight rounded to bf16 (activations, norms and cache in fp32), which parts
bf16's error into what its weights and what its activations contribute.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama import Llama, distributed, quantization  # noqa: E402
from llama import quantize as quantize_cli  # noqa: E402
from llama.model import ModelArgs  # noqa: E402
from llama.tiny import random_weights, train_tokenizer, write_checkpoint  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

SHAPES = {
    "15M": dict(dim=288, n_layers=6, n_heads=6, multiple_of=32),
    "100M": dict(dim=768, n_layers=12, n_heads=12, multiple_of=256),
}
import os  # noqa: E402

LLAMA2_TOKENIZER = Path(os.environ.get("LLAMA2_TOKENIZER") or REPO.parent / "shared" / "data" / "llama2-tokenizer.model")
ALL_MODES = ["bf16", "bf16-weights", "int8", "int8-keep-output", "int4-32", "int4-64", "int4-128", "int4-256", "int4-64-keep-output"]


def mode_build(mode: str, ckpt: Path, workdir: Path) -> dict:
    """(checkpoint dir, build options) for a mode name."""
    if mode == "fp32":
        return dict(ckpt=ckpt, dtype=torch.float32)
    if mode == "bf16":
        return dict(ckpt=ckpt, dtype=torch.bfloat16)
    if mode == "bf16-weights":  # fp32 weights rounded to bf16 and back, run in fp32
        dst = workdir / mode
        if not dst.is_dir():
            dst.mkdir()
            for path in ckpt.iterdir():
                if path.suffix == ".pth":
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    torch.save({k: v.to(torch.bfloat16).float() for k, v in state.items()}, dst / path.name)
                else:
                    shutil.copyfile(path, dst / path.name)
        return dict(ckpt=dst, dtype=torch.float32)
    parts = mode.split("-")
    kind, group = parts[0], int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    if mode.endswith("keep-output"):
        # Offline, with the output projection left in its stored dtype.
        dst = workdir / mode
        if not dst.is_dir():
            args = [str(ckpt), str(dst), "--quantize", kind, "--keep-output"]
            if group:
                args += ["--group-size", str(group)]
            if quantize_cli.main(args) != 0:
                raise SystemExit(f"quantizing for {mode} failed")
            shutil.copyfile(ckpt / "tokenizer.model", dst / "tokenizer.model")
        return dict(ckpt=dst)
    return dict(ckpt=ckpt, quantize=kind, group_size=group)


def build(mode, ckpt, workdir, max_seq_len, max_batch_size) -> Llama:
    options = mode_build(mode, ckpt, workdir)
    path = options.pop("ckpt")
    return Llama.build(str(path), str(path / "tokenizer.model"), max_seq_len=max_seq_len,
                       max_batch_size=max_batch_size, device="cpu", **options)


@torch.inference_mode()
def teacher_forced_log_probs(generator: Llama, sequences: torch.Tensor) -> torch.Tensor:
    """log p(next token) at every position of every sequence: (n, seqlen, vocab), fp32."""
    out = []
    for row in sequences:
        logits = generator.model.forward(row[None], 0)
        out.append(torch.log_softmax(logits[0].float(), dim=-1))
    return torch.stack(out)


def greedy(generator: Llama, prompts, gen_len: int):
    tokens, _ = generator.generate(prompts, max_gen_len=gen_len, temperature=0)
    return tokens


def compare(ref_logp, logp, ref_greedy, got_greedy, gen_len):
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).flatten()  # KL(fp32 || mode) per position
    top1 = (ref_logp.argmax(-1) == logp.argmax(-1)).float().mean().item()
    matches, prefixes = [], []
    for want, got in zip(ref_greedy, got_greedy):
        n = min(len(want), len(got), gen_len)
        same = [a == b for a, b in zip(want[:n], got[:n])]
        matches.append(sum(same) / gen_len)
        prefixes.append(same.index(False) if False in same else n)
    return {
        "kl_mean": kl.mean().item(),
        "kl_p99": torch.quantile(kl, 0.99).item(),
        "top1_agreement": top1,
        "greedy_match": statistics.mean(matches),
        "greedy_first_difference": statistics.mean(prefixes),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="100M", choices=list(SHAPES))
    parser.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma-separated, from {', '.join(ALL_MODES)}")
    parser.add_argument("--sequences", type=int, default=4, help="teacher-forced sequences (and greedy prompts)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per teacher-forced sequence")
    parser.add_argument("--gen-len", type=int, default=128, help="greedy continuation length")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--logit-std", type=float, default=6.0,
                        help="standard deviation of the logits the output layer gives a unit-RMS input")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="quality.json")
    opts = parser.parse_args(argv)
    modes = opts.modes.split(",")
    for mode in modes:
        if mode not in ALL_MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(ALL_MODES)}")
    torch.set_num_threads(opts.threads)

    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        workdir = Path(tmp)
        ckpt = workdir / "fp32"
        ckpt.mkdir()
        if LLAMA2_TOKENIZER.is_file():
            shutil.copyfile(LLAMA2_TOKENIZER, ckpt / "tokenizer.model")
        else:
            print("note: no Llama 2 tokenizer found (set LLAMA2_TOKENIZER to its path for vocab 32000); "
                  "a trained tokenizer of 512 pieces")
            train_tokenizer(ckpt / "tokenizer.model", vocab_size=512)
        vocab = Tokenizer(str(ckpt / "tokenizer.model")).n_words
        args = ModelArgs(**SHAPES[opts.shape], vocab_size=vocab)
        state = random_weights(args, seed=0)
        # random_weights gives the output std 3/sqrt(dim); peaked logits want more.
        state["output.weight"] *= opts.logit_std / 3.0
        write_checkpoint(ckpt, state, args)
        del state

        gen = torch.Generator().manual_seed(1)
        sequences = torch.randint(3, vocab, (opts.sequences, opts.seq_len), generator=gen)
        prompts = sequences[:, : opts.prompt_len].tolist()
        max_seq_len = max(opts.seq_len, opts.prompt_len + opts.gen_len)

        distributed.init_distributed(torch.device("cpu"), 1)
        reference = build("fp32", ckpt, workdir, max_seq_len, opts.sequences)
        ref_logp = teacher_forced_log_probs(reference, sequences)
        ref_greedy = greedy(reference, prompts, opts.gen_len)
        top_p = ref_logp.exp().amax(-1)
        print(f"{opts.shape} shape, {opts.sequences} sequences x {opts.seq_len} tokens, vocab {vocab}; "
              f"fp32's most likely next token has probability {top_p.mean():.2f} on average "
              f"(median {top_p.median():.2f})", flush=True)
        del reference

        results = {}
        for mode in modes:
            start = time.perf_counter()
            generator = build(mode, ckpt, workdir, max_seq_len, opts.sequences)
            logp = teacher_forced_log_probs(generator, sequences)
            results[mode] = compare(ref_logp, logp, ref_greedy, greedy(generator, prompts, opts.gen_len),
                                    opts.gen_len)
            del generator, logp
            r = results[mode]
            print(f"  {mode:<20} KL mean {r['kl_mean']:.2e} p99 {r['kl_p99']:.2e}  top-1 {r['top1_agreement']:.3f}  "
                  f"greedy {r['greedy_match']:.2f} (first difference at {r['greedy_first_difference']:.0f})  "
                  f"[{time.perf_counter() - start:.0f} s]", flush=True)

    print(f"\n| mode | mean KL | p99 KL | top-1 agreement | greedy {opts.gen_len} match | first difference |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['kl_mean']:.2e} | {r['kl_p99']:.2e} | {r['top1_agreement']:.3f} | "
              f"{r['greedy_match']:.2f} | {r['greedy_first_difference']:.0f} |")
    Path(opts.json).write_text(json.dumps({"options": vars(opts), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

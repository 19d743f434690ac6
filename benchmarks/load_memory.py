"""Peak resident memory of loading a checkpoint: `Llama.build` against a plain load.

    python benchmarks/load_memory.py [--workdir DIR] [--keep]

Writes a ~130M-parameter fp32 checkpoint (dim 768, 12 layers, 12 heads,
vocab 32000 with the real Llama 2 tokenizer when LLAMA2_TOKENIZER names it),
then measures, each in a fresh subprocess:

- `build`: `Llama.build` (meta-device model, mmap'd shard, weights assigned);
- `reference`: what Meta's reference does: a model allocated by its layers,
  `torch.load` of the whole shard, `load_state_dict` copying into it;
- `build bf16->fp32`: `Llama.build` of a bf16 copy of the same weights,
  converted tensor by tensor to fp32 (how Meta's real checkpoints load on CPU);
- `build MP=2->1`: `Llama.build` of a two-shard copy, joined on one process;
- `build int8`, `build int4`: `Llama.build(quantize=...)` of the fp32
  checkpoint, quantizing tensor by tensor as it reads them;
- `build int8 offline`: `Llama.build` of a copy written by `python -m llama.quantize`.

For the quantized loads the limit is 1.25x the quantized model plus the
largest fp32 tensor (the one being quantized at the worst moment).

For each: the peak of resident memory (VmHWM, reset just before) above the
resident memory before the load, as a multiple of the larger of the shard
bytes and the loaded model's bytes; the peak of anonymous memory (sampled),
the part that cannot be given back to the page cache; and the resident
memory after every weight has been read once, as the first forward pass
does (a mapped weight becomes resident only when read).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = dict(dim=768, n_layers=12, n_heads=12, multiple_of=256, norm_eps=1e-5)
REAL_TOKENIZER = Path(os.environ.get("LLAMA2_TOKENIZER") or REPO.parent / "shared" / "data" / "llama2-tokenizer.model")
LIMIT = 1.25


def real_tokenizer():
    """The Llama 2 tokenizer named by LLAMA2_TOKENIZER (or in the developers'
    workspace beside the checkout), or None."""
    for candidate in (os.environ.get("LLAMA2_TOKENIZER"), REPO.parent / "shared" / "data" / "llama2-tokenizer.model"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class AnonPeak:
    """Samples RssAnon every millisecond in a thread; `.peak` in KiB."""

    def __init__(self):
        self.peak = status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kib("RssAnon"))
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kib("RssAnon"))


def weight_bytes(model) -> int:
    """Bytes of the model's weights as held: parameters and kernel buffers, not caches."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for name, b in model.named_buffers():
        if name.split(".")[-1] not in ("cache_k", "cache_v", "rope", "fused"):
            total += b.numel() * b.element_size()
    return total


def measure(method: str, ckpt_dir: Path, tokenizer: Path, quantize: str = "none") -> dict:
    """Run one load in this (fresh) process; figures in bytes."""
    import torch

    from llama import Llama, checkpoint, distributed
    from llama.model import Transformer

    torch.set_num_threads(2)
    shards = checkpoint.find_shards(ckpt_dir)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    rss_before, anon_before = status_kib("VmRSS"), status_kib("RssAnon")
    with AnonPeak() as anon:
        if method == "reference":
            device = distributed.choose_device("cpu")
            distributed.init_distributed(device)
            args = checkpoint.model_args_from_params(
                checkpoint.read_params(ckpt_dir), max_seq_len=128, max_batch_size=1
            )
            model = Transformer(args)  # weights allocated by the layers, then overwritten
            state_dict = torch.load(shards[0], map_location="cpu", weights_only=True)
            state_dict.pop("rope.freqs", None)
            model.load_state_dict(state_dict, strict=True)
            del state_dict
        else:
            generator = Llama.build(str(ckpt_dir), str(tokenizer), max_seq_len=128, max_batch_size=1, device="cpu",
                                    quantize=None if quantize == "none" else quantize)
            model = generator.model
    peak_rss = status_kib("VmHWM")
    model_bytes = weight_bytes(model)
    checksum = sum(float(p.double().sum()) for p in model.parameters())  # reads every weight once
    largest_fp32 = max(
        t.numel() * 4 for t in checkpoint.load_shard(shards[0]).values()
    ) if quantize != "none" or "quantization" in checkpoint.read_params(ckpt_dir) else 0
    return {
        "method": method,
        "shard_bytes": sum(s.stat().st_size for s in shards),
        "model_bytes": model_bytes,
        "peak_rss_above": (peak_rss - rss_before) * 1024,
        "peak_anon_above": (anon.peak - anon_before) * 1024,
        "rss_after_reading_all": (status_kib("VmRSS") - rss_before) * 1024,
        "checksum": checksum,
        "quantized": quantize != "none" or "quantization" in checkpoint.read_params(ckpt_dir),
        "largest_fp32_tensor": largest_fp32,
    }


def write_checkpoints(workdir: Path) -> tuple:
    import torch

    from llama.model import ModelArgs
    from llama.reshard import reshard
    from llama.tiny import random_weights, train_tokenizer, write_checkpoint
    from llama.tokenizer import Tokenizer

    tokenizer = workdir / "tokenizer.model"
    if real_tokenizer() is not None:
        shutil.copyfile(real_tokenizer(), tokenizer)
    else:
        print("note: no Llama 2 tokenizer found (set LLAMA2_TOKENIZER to its path for vocab 32000); "
              "using a trained tokenizer of 512 pieces")
        train_tokenizer(tokenizer, vocab_size=512)
    args = ModelArgs(**SHAPE, vocab_size=Tokenizer(str(tokenizer)).n_words)
    fp32 = workdir / "fp32"
    if not fp32.is_dir():
        write_checkpoint(fp32, random_weights(args, seed=0), args, mp=1, dtype=torch.float32)
    bf16 = workdir / "bf16"
    if not bf16.is_dir():
        reshard(fp32, bf16, 1, dtype=torch.bfloat16, progress=False)
    mp2 = workdir / "mp2"
    if not mp2.is_dir():
        reshard(fp32, mp2, 2, progress=False)
    int8 = workdir / "int8"
    if not int8.is_dir():
        from llama import quantization

        quantization.quantize_checkpoint(fp32, int8, quantization.make_config("int8"), progress=False)
    return tokenizer, {"build": (fp32, "none"), "reference": (fp32, "none"), "build bf16->fp32": (bf16, "none"),
                       "build MP=2->1": (mp2, "none"), "build int8": (fp32, "int8"),
                       "build int4": (fp32, "int4"), "build int8 offline": (int8, "none")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for another run")
    parser.add_argument("--measure", nargs=4, metavar=("METHOD", "CKPT", "TOKENIZER", "QUANTIZE"),
                        help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.measure:
        method, ckpt, tokenizer, quantize = opts.measure
        print(json.dumps(measure(method, Path(ckpt), Path(tokenizer), quantize)))
        return

    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="load-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer, ckpts = write_checkpoints(workdir)
        env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
        rows = []
        for method, (ckpt, quantize) in ckpts.items():
            proc = subprocess.run(
                [sys.executable, __file__, "--measure", method.split()[0], str(ckpt), str(tokenizer), quantize],
                capture_output=True, text=True, env=env, check=True,
            )
            rows.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "method": method})
    finally:
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    mib = 2**20
    first = rows[0]
    print(f"checkpoint: {first['model_bytes'] / 4 / 1e6:.0f}M parameters, {SHAPE}, "
          f"fp32 shard {first['shard_bytes'] / mib:.0f} MiB")
    print(f"{'method':<18} {'shard MiB':>9} {'model MiB':>9} {'peak RSS MiB':>12} {'x larger':>8} "
          f"{'peak anon MiB':>13} {'x larger':>8} {'RSS after reading all MiB':>25} {'x larger':>8}")
    for row in rows:
        larger = max(row["shard_bytes"], row["model_bytes"])
        print(f"{row['method']:<18} {row['shard_bytes'] / mib:>9.0f} {row['model_bytes'] / mib:>9.0f} "
              f"{row['peak_rss_above'] / mib:>12.0f} {row['peak_rss_above'] / larger:>8.2f} "
              f"{row['peak_anon_above'] / mib:>13.0f} {row['peak_anon_above'] / larger:>8.2f} "
              f"{row['rss_after_reading_all'] / mib:>25.0f} {row['rss_after_reading_all'] / larger:>8.2f}")
    checksums = {round(row["checksum"], 3) for row in rows if "bf16" not in row["method"] and not row["quantized"]}
    if len(checksums) != 1:
        sys.exit(f"the loads disagree on the weights: {checksums}")
    build = rows[0]
    ratio = build["peak_rss_above"] / max(build["shard_bytes"], build["model_bytes"])
    print(f"build peak above before: {ratio:.2f}x the larger of shard and model (limit {LIMIT}x): "
          f"{'ok' if ratio <= LIMIT else 'OVER'}")
    for row in rows:
        if row["quantized"]:
            bound = row["model_bytes"] + row["largest_fp32_tensor"]
            ratio = row["peak_rss_above"] / bound
            print(f"{row['method']} peak above before: {ratio:.2f}x the quantized model ({row['model_bytes'] / mib:.0f} "
                  f"MiB) plus the largest fp32 tensor ({row['largest_fp32_tensor'] / mib:.0f} MiB) "
                  f"(limit {LIMIT}x): {'ok' if ratio <= LIMIT else 'OVER'}")


if __name__ == "__main__":
    main()

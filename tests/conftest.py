"""Shared fixtures: tiny Meta-format checkpoints made on the fly, and runners.

Nothing here downloads anything. The real Llama 2 tokenizer is used where the
workspace has it (`../shared/data/llama2-tokenizer.model`, or the path in
LLAMA2_TOKENIZER); tests that need it fall back to hand-checked expectations
for the tiny tokenizer trained here.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.tiny import make_tiny_checkpoint, train_tokenizer

REPO = Path(__file__).resolve().parents[1]

# The shape every tiny test model has unless a test says otherwise:
# two layers, dim 64, grouped-query attention (4 query heads, 2 KV heads).
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=512, seed=0)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def real_llama2_tokenizer():
    """Path of the real Llama 2 tokenizer, or None when this machine has none."""
    candidates = [os.environ.get("LLAMA2_TOKENIZER"), REPO.parent / "shared" / "data" / "llama2-tokenizer.model"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(path, vocab_size=TINY["vocab_size"])
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_tokenizer) -> Path:
    """A one-shard fp32 tiny checkpoint directory (with its tokenizer.model)."""
    out = tmp_path_factory.mktemp("ckpt_mp1")
    return make_tiny_checkpoint(out, mp=1, tokenizer=tiny_tokenizer, **_shape())


@pytest.fixture(scope="session")
def tiny_ckpt_mp2(tmp_path_factory, tiny_tokenizer) -> Path:
    """The same weights as `tiny_ckpt`, in two model-parallel shards."""
    out = tmp_path_factory.mktemp("ckpt_mp2")
    return make_tiny_checkpoint(out, mp=2, tokenizer=tiny_tokenizer, **_shape())


@pytest.fixture(scope="session")
def tiny_infill_ckpt(tmp_path_factory) -> Path:
    """A one-shard Code Llama-shaped tiny checkpoint: infilling pieces in its
    tokenizer, rope_theta 1e6 (`python -m llama.tiny --infill`)."""
    out = tmp_path_factory.mktemp("ckpt_infill")
    return make_tiny_checkpoint(out, mp=1, infill=True, **_shape())


def _shape():
    return {k: v for k, v in TINY.items() if k != "vocab_size"}


@pytest.fixture(scope="session")
def generator(tiny_ckpt):
    """A Llama built on `tiny_ckpt` (fp32, CPU), shared by read-only tests."""
    from llama import Llama

    return Llama.build(
        ckpt_dir=str(tiny_ckpt),
        tokenizer_path=str(tiny_ckpt / "tokenizer.model"),
        max_seq_len=128,
        max_batch_size=8,
        device="cpu",
    )


def bpe_file_without_bytes(source: Path, dest: Path, missing: bytes) -> Path:
    """A copy of the tiktoken BPE file `source` without the single-byte ranks of `missing`, renumbered."""
    import base64

    from llama.tokenizer import read_tiktoken_ranks

    kept = [token for token, _ in sorted(read_tiktoken_ranks(source).items(), key=lambda item: item[1])
            if not (len(token) == 1 and token in missing)]
    dest.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(kept)))
    return dest


def chat_on_input(llama, typed: bytes, **options) -> str:
    """What `run_chat` shows for the lines `typed` (read from a pipe, then the end of the input)."""
    import io

    from llama.chat_repl import run_chat

    read_end, write_end = os.pipe()
    os.write(write_end, typed)
    os.close(write_end)
    output = io.StringIO()
    try:
        run_chat(llama, input_fd=read_end, output=output, **options)
    finally:
        os.close(read_end)
    return output.getvalue()


def interruptible() -> None:
    """`preexec_fn` of a child process that a test interrupts: SIGINT back to its default.

    A shell starts a background job (`nohup pytest &`) with SIGINT ignored, and children
    inherit that; a Python started so installs no KeyboardInterrupt handler, and the
    interrupt the test sends would do nothing while the test waits for the child to end.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def rewrite_shard(ckpt: Path, change) -> Path:
    """Apply `change` to the state dict of `ckpt`'s first shard, in place; returns the shard's path."""
    path = ckpt / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, args, extra=()) -> list:
    """The command line of `torchrun --standalone --nproc_per_node nproc ARGS`."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc),
        # The launcher picks a free port itself: no race with other tests.
        "--standalone",
        *extra,
        *[str(a) for a in args],
    ]


def run_torchrun(nproc: int, args, timeout: float = 300, env=None, extra=()) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node nproc ARGS` on CPU; fails the test on a non-zero exit."""
    return run_checked(torchrun_cmd(nproc, args, extra), timeout=timeout, env=env)


def subprocess_env(env=None) -> dict:
    """The environment a test's child process runs in: CPU only, one thread, this checkout first."""
    # PYTHONFAULTHANDLER: a child killed by a signal (SIGABRT, SIGSEGV) prints every thread's
    # Python stack, so that a rare crash in CI says where it happened.
    full_env = {
        **os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})
    }
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    return full_env


def run_checked(cmd, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    full_env = subprocess_env(env)
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc

"""`python -m llama.tiny` and `make_tiny_checkpoint` refuse a shape the loader
would refuse (or that would crash on the way), before importing torch and
before writing anything; the shapes they take, odd or not, still load."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, bpe_file_without_bytes, subprocess_env
from llama.tiny import (
    INFILL_EXTRA_PIECES,
    SENTENCEPIECE_VOCAB_SIZES,
    TIKTOKEN_RANKS,
    make_tiny_checkpoint,
    train_tiktoken_bpe,
    train_tokenizer,
)


def run_tiny(*args, timeout=120) -> subprocess.CompletedProcess:
    # -X importtime lists every module imported, on stderr, so a test can see that torch was not.
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "llama.tiny", *map(str, args)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def imported_modules(proc: subprocess.CompletedProcess):
    return {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


def shown_lines(proc: subprocess.CompletedProcess):
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.strip() and not line.startswith("import time:")]


# (flags, what the error line must hold: the flag and the value)
BAD_FLAGS = {
    "no heads": (["--n-heads", "0"], ["--n-heads must be a positive integer, got 0"]),
    "negative dim": (["--dim", "-4"], ["--dim must be a positive integer, got -4"]),
    "negative mp": (["--mp", "-1"], ["--mp must be a positive integer, got -1"]),
    "no shards": (["--mp", "0"], ["--mp must be a positive integer, got 0"]),
    "no layers": (["--n-layers", "0"], ["--n-layers must be a positive integer, got 0"]),
    "multiple-of 0": (["--multiple-of", "0"], ["--multiple-of", "got 0"]),
    "negative kv heads": (["--n-kv-heads", "-1"], ["--n-kv-heads", "got -1"]),
    "kv heads do not divide heads": (["--n-kv-heads", "3"], ["--n-kv-heads 3", "n_heads 4 is not a multiple of"]),
    "dim not split by heads": (["--dim", "63"], ["--dim 63", "not a multiple of n_heads 4"]),
    "odd head size": (["--dim", "12"], ["--dim 12", "must be even"]),
    "mp does not split heads": (["--mp", "3"], ["--mp 3", "sizes that work: 1, 2, 4"]),
    "mp does not split the vocabulary": (["--family", "llama3", "--vocab-size", "257", "--mp", "2"],
                                         ["--mp 2", "vocab_size = 513"]),
    "vocab too small": (["--vocab-size", "10"], ["--vocab-size must be from 330 to 1741", "got 10"]),
    "vocab 0": (["--vocab-size", "0"], ["--vocab-size must be from 330", "got 0"]),
    "vocab too large": (["--vocab-size", "1742"], ["--vocab-size", "got 1742"]),
    "vocab too small for infilling": (["--infill", "--vocab-size", "333"], ["--vocab-size must be from 335 to 1746"]),
    "llama3 vocab too small": (["--family", "llama3", "--vocab-size", "255"],
                               ["--vocab-size must be from 256 to 1354"]),
    "llama3 vocab too large": (["--family", "llama3", "--vocab-size", "1355"], ["--vocab-size", "got 1355"]),
    "ffn multiplier 0": (["--ffn-dim-multiplier", "0"], ["--ffn-dim-multiplier must be a positive", "got 0.0"]),
    "ffn multiplier leaves nothing": (["--ffn-dim-multiplier", "0.001"], ["--ffn-dim-multiplier 0.001"]),
    "rope theta 0": (["--rope-theta", "0"], ["--rope-theta must be a positive", "got 0.0"]),
    "rope theta nan": (["--rope-theta", "nan"], ["--rope-theta", "got nan"]),
    "rope scaling factor 0": (["--family", "llama3", "--rope-scaling-factor", "0"],
                              ["--rope-scaling-factor", "got 0.0"]),
    "seed past 64 bits": (["--seed", str(2**64)], ["--seed", str(2**64)]),
    "missing tokenizer": (["--tokenizer", "{tmp}/nowhere.model"], ["--tokenizer", "nowhere.model", "does not exist"]),
    "tokenizer is a directory": (["--tokenizer", "{tmp}"], ["--tokenizer", "is not a file"]),
    "vocab size with a tokenizer": (["--tokenizer", "{tok}", "--vocab-size", "512"], ["--vocab-size", "--tokenizer"]),
}


def assert_refused_in_one_line(proc: subprocess.CompletedProcess, out, *needles, start="error: --tokenizer") -> None:
    """Status 2, one line starting with `start` and holding each needle, no torch imported, nothing written."""
    lines = shown_lines(proc)
    assert proc.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith(start), lines
    for needle in needles:
        assert needle in lines[0]
    assert "torch" not in imported_modules(proc)
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_shape_is_refused_in_one_line_before_torch(case, tmp_path, tiny_tokenizer):
    flags, wanted = BAD_FLAGS[case]
    flags = [flag.format(tmp=tmp_path, tok=tiny_tokenizer) for flag in flags]
    out = tmp_path / "out"
    assert_refused_in_one_line(run_tiny(out, *flags), out, *wanted, start="error: ")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(n_heads=0), "n_heads must be a positive integer, got 0"),
        (dict(dim=63), "dim 63 is not a multiple of n_heads 4"),
        (dict(mp=0), "mp must be a positive integer, got 0"),
        (dict(mp=3), "mp 3 does not fit"),
        (dict(n_kv_heads=3), "n_heads 4 is not a multiple of n_kv_heads 3"),
        (dict(vocab_size=0), "vocab_size must be from 330 to 1741"),
        (dict(family_name="llama3", rope_scaling_factor=-1.0), "rope_scaling_factor must be a positive"),
        (dict(rope_scaling_factor=8.0), "rope_scaling_factor applies to the scaled rotary embedding"),
    ],
)
def test_make_tiny_checkpoint_refuses_before_writing(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_checkpoint(tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_an_odd_but_valid_shape_still_loads(tmp_path):
    """Plain multi-head attention (--n-kv-heads 0) in two shards."""
    out = tmp_path / "mha"
    proc = run_tiny(out, "--n-kv-heads", "0", "--mp", "2", "--n-layers", "1")
    assert proc.returncode == 0, shown_lines(proc)
    assert sorted(p.name for p in out.glob("consolidated.*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert "n_kv_heads" not in json.loads((out / "params.json").read_text())
    from llama import Llama

    generator = Llama.build(ckpt_dir=str(out), tokenizer_path=str(out / "tokenizer.model"), max_seq_len=16,
                            max_batch_size=1, device="cpu")
    assert generator.model.params.n_kv_heads is None
    assert len(generator.text_completion(["a"], max_gen_len=2, temperature=0)[0]["generation"]) > 0


@pytest.mark.parametrize("infill", [False, True])
def test_sentencepiece_vocab_range_is_what_the_trainer_makes(tmp_path, infill):
    extra = INFILL_EXTRA_PIECES if infill else 0  # the infilling pieces and "☺"
    low, high = SENTENCEPIECE_VOCAB_SIZES[0] + extra, SENTENCEPIECE_VOCAB_SIZES[-1] + extra
    for size in (low, high):
        train_tokenizer(tmp_path / f"{size}.model", vocab_size=size, infill=infill)
    for size in (low - 1, high + 1):
        with pytest.raises(RuntimeError, match="Vocabulary size"):
            train_tokenizer(tmp_path / f"{size}.model", vocab_size=size, infill=infill)


def test_tiktoken_ranks_range_is_what_the_trainer_makes(tmp_path):
    with pytest.raises(ValueError, match="at least the 256 byte tokens"):
        train_tiktoken_bpe(tmp_path / "low", n_ranks=TIKTOKEN_RANKS[0] - 1)
    # Merging until the text has nothing left finds exactly the last rank allowed.
    with pytest.raises(ValueError, match=f"has only {TIKTOKEN_RANKS[-1]} BPE ranks"):
        train_tiktoken_bpe(tmp_path / "high", n_ranks=TIKTOKEN_RANKS[-1] + 1)
    assert not (tmp_path / "high").exists()


# --- tokenizers the loader could not use (issue 19) ---


def test_a_bpe_file_missing_single_bytes_is_refused_in_one_line(tmp_path):
    full = tmp_path / "full.model"
    train_tiktoken_bpe(full, n_ranks=300)
    bad = bpe_file_without_bytes(full, tmp_path / "bad.model", b"\x00\x01")
    out = tmp_path / "out"
    assert_refused_in_one_line(run_tiny(out, "--tokenizer", bad), out, "lack 2 of the 256 single bytes")


def test_a_tokenizer_without_bos_is_refused_in_one_line(tmp_path):
    import sentencepiece as spm

    from llama.tiny import training_text

    path = tmp_path / "no_bos.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_text(), model_prefix=str(path.with_suffix("")), model_type="bpe",
        vocab_size=400, byte_fallback=True, unk_id=0, bos_id=-1, eos_id=1, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    out = tmp_path / "out"
    assert_refused_in_one_line(run_tiny(out, "--tokenizer", path), out, "has no BOS token (bos_id = -1)")

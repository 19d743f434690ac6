"""Where the tokenizer comes from: Llama.build without a tokenizer_path finds the
one beside the checkpoint as the scripts do, and a directory given as the
tokenizer is named as one."""

import shutil

import pytest

from llama import Llama, Tokenizer


def test_build_without_a_tokenizer_path_uses_the_one_beside_the_checkpoint(tiny_ckpt, tmp_path):
    generator = Llama.build(ckpt_dir=str(tiny_ckpt), tokenizer_path=None, max_seq_len=32, max_batch_size=1,
                            device="cpu")
    assert generator.tokenizer.n_words == Tokenizer(str(tiny_ckpt / "tokenizer.model")).n_words

    # Meta's Llama 2 download: the tokenizer beside the model folders, in their parent.
    model = tmp_path / "download" / "llama-2-7b"
    model.mkdir(parents=True)
    for f in tiny_ckpt.iterdir():
        (tmp_path / "download" / f.name if f.name == "tokenizer.model" else model / f.name).symlink_to(f)
    Llama.build(ckpt_dir=str(model), tokenizer_path=None, max_seq_len=32, max_batch_size=1, device="cpu")


def test_build_without_any_tokenizer_says_to_pass_one(tiny_ckpt, tmp_path):
    bare = tmp_path / "a" / "bare"
    bare.mkdir(parents=True)
    for f in tiny_ckpt.iterdir():
        if f.name != "tokenizer.model":
            (bare / f.name).symlink_to(f)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.model in '.*bare' or its parent; pass tokenizer_path"):
        Llama.build(ckpt_dir=str(bare), tokenizer_path=None, max_seq_len=32, max_batch_size=1, device="cpu")


def test_a_directory_given_as_the_tokenizer_is_named_as_one(tiny_ckpt, tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a tokenizer model file; "
                                                r"did you mean '.*/tokenizer.model'\?"):
        Tokenizer(str(tiny_ckpt))
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a tokenizer model file$"):
        Tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="a tokenizer model path is required"):
        Tokenizer(None)

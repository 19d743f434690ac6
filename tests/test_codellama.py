"""Code Llama: infilling pieces, the infilling prompt in both orders, stopping
at <EOT>, rope_theta 1e6 against transformers, and the infilling example."""

import json
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from conftest import REPO, real_llama2_tokenizer, run_checked, run_torchrun, subprocess_env
from llama import Llama, convert_hf
from llama.infilling import check_infilling_tokenizer, infilling_prompt_tokens
from llama.tiny import main as tiny_main
from llama.tiny import make_tiny_checkpoint, train_tiktoken_bpe
from llama.tokenizer import Tokenizer

INFILL_PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")


def build(ckpt, max_seq_len=64, max_batch_size=4) -> Llama:
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=max_seq_len,
                       max_batch_size=max_batch_size, device="cpu")


@pytest.fixture(scope="module")
def infiller(tiny_infill_ckpt) -> Llama:
    return build(tiny_infill_ckpt)


def pieces_text(tokenizer, ids):
    """The tokens' pieces joined, with SentencePiece's space mark made a space
    (so a leading space SentencePiece added shows)."""
    return "".join(tokenizer.sp_model.id_to_piece(i) for i in ids).replace("▁", " ")


# --- the tokenizer --------------------------------------------------------------


def test_infill_pieces_are_found_by_piece(tiny_infill_ckpt, tiny_tokenizer):
    tokenizer = Tokenizer(str(tiny_infill_ckpt / "tokenizer.model"))
    ids = (tokenizer.prefix_id, tokenizer.suffix_id, tokenizer.middle_id, tokenizer.eot_id)
    assert [tokenizer.sp_model.id_to_piece(i) for i in ids] == list(INFILL_PIECES)
    assert len(set(ids)) == 4 and tokenizer.n_words == 512
    # Llama 2's tokenizer has none of them.
    plain = Tokenizer(str(tiny_tokenizer))
    assert (plain.prefix_id, plain.suffix_id, plain.middle_id, plain.eot_id) == (None, None, None, None)


@pytest.mark.parametrize("text", ["is red.", " is red.", "\n    return total\n", "  two spaces", "", "café x"])
def test_encode_infilling_drops_only_the_implicit_leading_space(infiller, text):
    tokenizer = infiller.tokenizer
    ids = tokenizer.encode_infilling(text)
    assert tokenizer.decode_infilling(ids) == text
    if text and all(c.isascii() and (c.isalpha() or c in " .") for c in text):
        # The pieces spell the text exactly: no space in front that the text lacks.
        assert pieces_text(tokenizer, ids) == text
    if text:  # Ordinary encoding adds a space in front, as if the text were " " + text.
        assert tokenizer.encode(text, bos=False, eos=False) == tokenizer.encode_infilling(" " + text)


def test_tiny_infill_tokenizer_has_code_llamas_marker(infiller, tiny_tokenizer):
    # Meta's encode_infilling encodes "☺" + text and drops 2 ids: "▁" and "☺",
    # as Code Llama's vocabulary splits "☺". The tiny one must split it so too.
    sp = infiller.tokenizer.sp_model
    assert sp.encode("☺", out_type=str) == ["▁", "☺"]
    assert sp.encode("☺is red.", out_type=str)[:2] == ["▁", "☺"]
    assert Tokenizer(str(tiny_tokenizer)).sp_model.piece_to_id("☺") == 0  # unknown without --infill


def metas_encode_infilling(sp, text):
    """Meta's Code Llama `Tokenizer.encode_infilling`: "☺" + text, the first 2 ids dropped."""
    return sp.encode("☺" + text)[2:]


@pytest.mark.parametrize("suffix_first", [False, True])
@pytest.mark.parametrize("prefix, suffix", [
    ("the cat", "is red."),
    ("def f(x):\n    ", "\n    return y\n"),
    ("a", " b"),
    ("", ""),
    ("café", "naïve 42"),
])
def test_infilling_prompt_is_metas_layout(infiller, prefix, suffix, suffix_first):
    # Meta's infilling_prompt_tokens (codellama llama/generation.py), written out:
    #   PSM: [BOS, <PRE>] + encode(prefix) + [<SUF>] + encode_infilling(suffix) + [<MID>]
    #   SPM: [BOS, <PRE>, <SUF>] + encode_infilling(suffix) + [<MID>] + encode(prefix)
    tok = infiller.tokenizer
    sp = tok.sp_model
    bos, pre, suf, mid = sp.bos_id(), *(sp.piece_to_id(p) for p in INFILL_PIECES[:3])
    prefix_ids, suffix_ids = sp.encode(prefix), metas_encode_infilling(sp, suffix)
    if suffix_first:
        expected = [bos, pre, suf] + suffix_ids + [mid] + prefix_ids
    else:
        expected = [bos, pre] + prefix_ids + [suf] + suffix_ids + [mid]
    assert infilling_prompt_tokens(tok, prefix, suffix, suffix_first=suffix_first) == expected


# --- the prompt layout ----------------------------------------------------------


PREFIX, SUFFIX = "the cat", "is red."


def test_prefix_suffix_middle_layout(infiller):
    # Meta's documented PSM layout:
    #   [BOS, <PRE>] + encode(prefix) + [<SUF>] + suffix without its implicit space + [<MID>]
    tok = infiller.tokenizer
    sp = tok.sp_model
    prompt = infilling_prompt_tokens(tok, PREFIX, SUFFIX)
    pre, suf, mid = (sp.piece_to_id(p) for p in INFILL_PIECES[:3])
    assert prompt[:2] == [tok.bos_id, pre] and prompt[-1] == mid
    prefix_ids = prompt[2 : prompt.index(suf)]
    suffix_ids = prompt[prompt.index(suf) + 1 : -1]
    assert pieces_text(tok, prefix_ids) == " the cat"  # the prefix keeps SentencePiece's leading space
    assert pieces_text(tok, suffix_ids) == "is red."  # the suffix does not get one
    assert prompt == [tok.bos_id, pre] + tok.encode(PREFIX, False, False) + [suf] + suffix_ids + [mid]


def test_suffix_prefix_middle_layout(infiller):
    # Meta's SPM layout: [BOS, <PRE>, <SUF>] + suffix without its implicit space + [<MID>] + encode(prefix)
    tok = infiller.tokenizer
    sp = tok.sp_model
    prompt = infilling_prompt_tokens(tok, PREFIX, SUFFIX, suffix_first=True)
    pre, suf, mid = (sp.piece_to_id(p) for p in INFILL_PIECES[:3])
    assert prompt[:3] == [tok.bos_id, pre, suf]
    suffix_ids = prompt[3 : prompt.index(mid)]
    prefix_ids = prompt[prompt.index(mid) + 1 :]
    assert pieces_text(tok, suffix_ids) == "is red."
    assert pieces_text(tok, prefix_ids) == " the cat"
    assert prompt == [tok.bos_id, pre, suf] + suffix_ids + [mid] + tok.encode(PREFIX, False, False)


@pytest.mark.parametrize("suffix_first", [False, True])
def test_text_infilling_runs_the_documented_prompt(infiller, suffix_first):
    tok = infiller.tokenizer
    prefixes, suffixes = ["the cat", "def f(x):\n    "], [" is red.", "\n    return y\n"]
    results = infiller.text_infilling(prefixes, suffixes, temperature=0, max_gen_len=12, suffix_first=suffix_first)
    for prefix, suffix, result in zip(prefixes, suffixes, results):
        prompt = infilling_prompt_tokens(tok, prefix, suffix, suffix_first=suffix_first)
        (expected,), _ = infiller.generate([prompt], max_gen_len=12, temperature=0)
        if tok.eot_id in expected:
            expected = expected[: expected.index(tok.eot_id)]
        assert result["generation"] == tok.decode_infilling(expected)
        assert result["full_text"] == prefix + result["generation"] + suffix
        assert set(result) == {"generation", "full_text"}


def test_infilling_logprobs_are_the_middles_not_codellamas_zeros(infiller):
    # Meta's Code Llama reports 0.0 for each generated token (its loss is taken
    # before the token is written); here, as in Meta's Llama 2 and 3 code, each is
    # log p(token | what precedes it) (README, "Differences from the reference").
    tok = infiller.tokenizer
    (result,) = infiller.text_infilling([PREFIX], [SUFFIX], temperature=0, max_gen_len=6, logprobs=True)
    prompt = infilling_prompt_tokens(tok, PREFIX, SUFFIX)
    (middle,), _ = infiller.generate([prompt], max_gen_len=6, temperature=0)
    middle = middle[: middle.index(tok.eot_id)] if tok.eot_id in middle else middle
    tokens = prompt + middle
    with torch.inference_mode():
        logits = infiller.model.forward(torch.tensor([tokens]), 0)[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(middle)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(result["logprobs"]), expected, atol=1e-4, rtol=1e-4)
    assert all(logprob < 0 for logprob in result["logprobs"])


# --- stopping at <EOT> ----------------------------------------------------------


@pytest.fixture(scope="module")
def eot_ckpt(tiny_infill_ckpt, tmp_path_factory):
    """The tiny Code Llama with two output rows swapped, so that the greedy
    middle for PREFIX/SUFFIX is <EOT> at its 4th token and unchanged before it."""
    generator = build(tiny_infill_ckpt)
    tok = generator.tokenizer
    prompt = infilling_prompt_tokens(tok, PREFIX, SUFFIX)
    (greedy,), _ = generator.generate([prompt], max_gen_len=12, temperature=0)
    assert tok.eot_id not in greedy
    stop_at = next(k for k in range(3, len(greedy)) if greedy[k] not in greedy[:k])
    out = tmp_path_factory.mktemp("ckpt_eot")
    for name in ("params.json", "tokenizer.model"):
        shutil.copyfile(tiny_infill_ckpt / name, out / name)
    state = torch.load(tiny_infill_ckpt / "consolidated.00.pth", weights_only=True)
    output = state["output.weight"].clone()
    output[[tok.eot_id, greedy[stop_at]]] = output[[greedy[stop_at], tok.eot_id]]
    state["output.weight"] = output
    torch.save(state, out / "consolidated.00.pth")
    return out, greedy[:stop_at]


def test_generation_stops_at_eot(eot_ckpt):
    ckpt, middle = eot_ckpt
    generator = build(ckpt)
    tok = generator.tokenizer
    calls = []
    forward = generator._forward
    generator._forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    (result,) = generator.text_infilling([PREFIX], [SUFFIX], temperature=0, max_gen_len=12, logprobs=True)
    assert result["generation"] == tok.decode_infilling(middle)
    assert len(result["tokens"]) == len(result["logprobs"]) == len(middle)
    assert "".join(result["tokens"]) == result["generation"]
    # The loop ended at <EOT> (prompt pass + one step a token), not at max_gen_len.
    assert len(calls) == len(middle) + 1
    # Ordinary generation still stops at EOS only: <EOT> is generated and kept there.
    prompt = infilling_prompt_tokens(tok, PREFIX, SUFFIX)
    (tokens,), _ = generator.generate([prompt], max_gen_len=12, temperature=0)
    assert tokens[: len(middle) + 1] == middle + [tok.eot_id]
    # In a batch, the row that reached <EOT> is cut there; the other runs on.
    both = generator.text_infilling([PREFIX, "a dog"], [SUFFIX, " is"], temperature=0, max_gen_len=6)
    assert both[0]["generation"] == result["generation"]


# --- errors ---------------------------------------------------------------------


def test_infilling_without_infill_pieces_is_one_clear_error(generator, tmp_path):
    with pytest.raises(ValueError, match=r"this tokenizer has no infilling pieces \(▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT> missing\)"):
        generator.text_infilling(["def f("], ["):\n"])
    # A tokenizer of another family, without the attributes at all.
    with pytest.raises(ValueError, match="no infilling pieces"):
        check_infilling_tokenizer(object())
    # Llama 3's tokenizer has an eot_id (<|eot_id|>) but none of the pieces.
    train_tiktoken_bpe(tmp_path / "llama3.model", n_ranks=300)
    llama3 = Tokenizer(str(tmp_path / "llama3.model"))
    assert llama3.eot_id is not None
    with pytest.raises(ValueError, match=r"no infilling pieces \(▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT> missing\)"):
        infilling_prompt_tokens(llama3, "a", "b")
    # The instance keeps working.
    assert generator.text_completion(["the cat"], max_gen_len=2, temperature=0)[0]["generation"]


def test_infilling_arguments_are_checked(infiller):
    with pytest.raises(ValueError, match="2 prefixes but 1 suffixes"):
        infiller.text_infilling(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="prefixes must be a list of strings"):
        infiller.text_infilling("a", ["c"])
    with pytest.raises(TypeError, match="infilling suffix must be a str"):
        infiller.text_infilling(["a"], [3])
    with pytest.raises(ValueError, match="top_p"):
        infiller.text_infilling(["a"], ["b"], top_p=0)
    assert infiller.text_infilling([], []) == []


# --- python -m llama.tiny --infill ----------------------------------------------


def test_tiny_infill_option(tmp_path, tiny_tokenizer, capsys):
    assert tiny_main([str(tmp_path / "cl"), "--infill", "--n-layers", "1"]) == 0
    params = json.loads((tmp_path / "cl" / "params.json").read_text())
    assert params["rope_theta"] == 1e6 and params["n_layers"] == 1
    tokenizer = Tokenizer(str(tmp_path / "cl" / "tokenizer.model"))
    check_infilling_tokenizer(tokenizer)
    # A tokenizer without the pieces is refused, in one line, before anything is written.
    assert tiny_main([str(tmp_path / "bad"), "--infill", "--tokenizer", str(tiny_tokenizer)]) == 1
    assert capsys.readouterr().err.startswith("error: this tokenizer has no infilling pieces")
    assert not (tmp_path / "bad").exists()
    # Infilling is Code Llama's, a Llama 2-family model.
    assert tiny_main([str(tmp_path / "bad3"), "--infill", "--family", "llama3"]) == 1
    assert "not with the llama3 family" in capsys.readouterr().err
    assert not (tmp_path / "bad3").exists()


# --- Code Llama's own vocabulary layout ------------------------------------------

# The 16 pieces Code Llama 7B/13B add to Llama 2's 32000, ids 32000-32015: the
# four infilling pieces at 32007-32010, amid the BPE merges that build them.
CODE_LLAMA_ADDED_PIECES = [
    "▁<SU", "▁<SUF", "▁<PRE", "▁<M", "▁<MID", "▁<E", "▁<EOT", "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>",
] + ["▁" + "<EOT>" * n for n in range(2, 7)]


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def _proto_field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def code_llama_like_tokenizer(llama2_path, out_path) -> None:
    """Llama 2's tokenizer with Code Llama's 16 added pieces appended (32016 pieces).

    A SentencePiece model is a protobuf whose repeated field 1 holds the
    pieces, so appending field-1 records adds pieces at the end.
    """
    data = bytearray(open(llama2_path, "rb").read())
    for i, piece in enumerate(CODE_LLAMA_ADDED_PIECES):
        text = piece.encode()
        message = _proto_field(1, 2, _varint(len(text)) + text) + _proto_field(2, 5, struct.pack("<f", -40000.0 - i))
        data += _proto_field(1, 2, _varint(len(message)) + message)
    open(out_path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def code_llama_vocab_ckpt(tmp_path_factory):
    llama2 = real_llama2_tokenizer()
    if llama2 is None:
        pytest.skip("needs the real Llama 2 tokenizer: set LLAMA2_TOKENIZER to its path")
    tmp = tmp_path_factory.mktemp("codellama_vocab")
    code_llama_like_tokenizer(llama2, tmp / "codellama.model")
    return make_tiny_checkpoint(tmp / "ckpt", tokenizer=str(tmp / "codellama.model"), infill=True,
                                dim=64, n_layers=1, n_heads=4, n_kv_heads=None, multiple_of=32)


def test_code_llama_vocabulary_and_meta_suffix_encoding(code_llama_vocab_ckpt):
    params = json.loads((code_llama_vocab_ckpt / "params.json").read_text())
    assert (params["vocab_size"], params["rope_theta"]) == (32016, 1e6)
    generator = build(code_llama_vocab_ckpt, max_seq_len=48, max_batch_size=2)
    tok = generator.tokenizer
    assert (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id) == (32007, 32008, 32009, 32010)
    sp = tok.sp_model
    smiley = sp.piece_to_id("☺")
    for text in ["\n    return result\n", " x = 1", "x = 1", "    ```"]:
        # Meta's own expressions with this vocabulary: drop the two tokens of "☺".
        assert tok.encode_infilling(text) == sp.encode("☺" + text)[2:]
        ids = tok.encode_infilling(text)
        assert tok.decode_infilling(ids) == sp.decode([smiley] + ids)[1:] == text
    prompt = infilling_prompt_tokens(tok, "def f(", "):\n")
    assert prompt == [1, 32007] + sp.encode("def f(") + [32008] + sp.encode("☺):\n")[2:] + [32009]
    (result,) = generator.text_infilling(["def f("], ["):\n"], temperature=0, max_gen_len=4)
    assert result["full_text"].startswith("def f(") and result["full_text"].endswith("):\n")


# --- rope_theta 1e6 against transformers -------------------------------------------


PARITY_PROMPT = [1, 3, 45, 300, 12, 4, 99, 7, 250, 5, 61, 8, 400, 17, 230, 42, 311, 90, 33, 120]


def hf_model(hf_dir):
    transformers = pytest.importorskip("transformers", reason="pip install -e .[test] for transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_greedy(model, prompt, n):
    tokens = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(n):
            next_token = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[0, len(prompt) :].tolist()


def test_code_llama_rope_theta_matches_transformers(tmp_path, tiny_infill_ckpt):
    assert json.loads((tiny_infill_ckpt / "params.json").read_text())["rope_theta"] == 1e6
    convert_hf.meta_to_hf(tiny_infill_ckpt, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_theta"] == 1e6
    hf = hf_model(tmp_path / "hf")

    generator = build(tiny_infill_ckpt, max_seq_len=64, max_batch_size=1)
    prompt = torch.tensor([PARITY_PROMPT])
    with torch.inference_mode():
        ours = generator.model.forward(prompt, 0)
        theirs = hf(prompt).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    (tokens,), _ = generator.generate([PARITY_PROMPT], max_gen_len=24, temperature=0)
    assert len(tokens) == 24 and tokens == hf_greedy(hf, PARITY_PROMPT, 24)

    # The comparison sees the theta: at Llama 2's 10000 transformers' logits differ.
    config["rope_theta"] = 10000.0
    if "rope_parameters" in config:
        config["rope_parameters"]["rope_theta"] = 10000.0
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with torch.inference_mode():
        other = hf_model(tmp_path / "hf")(prompt).logits
    assert (other - ours).abs().max() > 1e-2


# --- the example ------------------------------------------------------------------


def test_infilling_example_on_the_demo_checkpoint(tmp_path):
    out = run_torchrun(1, ["example_infilling.py", "--max_gen_len", "4"],
                       env={"LLAMA_CACHE": str(tmp_path)}).stdout
    assert "using the demo checkpoint" in out and "demo-infill2-mp1" in out
    assert out.count("> filled in: ") == 3
    assert "def mean(values):" in out and "    return total / len(values)\n" in out


def test_infilling_example_with_a_checkpoint_and_suffix_first(tiny_infill_ckpt):
    out = run_checked([sys.executable, "example_infilling.py", "--ckpt_dir", str(tiny_infill_ckpt),
                       "--max_gen_len", "4", "--suffix_first"]).stdout
    assert "demo checkpoint" not in out
    assert out.count("> filled in: ") == 3


def test_infilling_example_on_a_llama2_checkpoint_fails_in_one_line_before_loading(tiny_ckpt):
    proc = subprocess.run([sys.executable, "example_infilling.py", "--ckpt_dir", str(tiny_ckpt)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: this tokenizer has no infilling pieces") and proc.stderr.count("\n") == 1
    assert "Loaded in" not in proc.stdout

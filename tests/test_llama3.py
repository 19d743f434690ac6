"""Llama 3.x: the tiktoken tokenizer, the chat format, stop tokens, scaled RoPE,
the vocabulary-split embedding, the family checks, and parity with transformers."""

import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

import logits_worker
from conftest import REPO, TINY, bpe_file_without_bytes, run_checked, run_torchrun
from llama import Llama, checkpoint, convert_hf, family
from llama.chat_format import encode_dialog_llama3
from llama.model import ModelArgs, apply_scaling, ffn_hidden_dim, precompute_freqs_cis
from llama.reshard import reshard
from llama.tiny import main as tiny_main
from llama.tiny import make_tiny_checkpoint, train_tiktoken_bpe
from llama.tokenizer import (
    LLAMA3_PATTERN,
    IncrementalDecoder,
    Llama3Tokenizer,
    Tokenizer,
    llama3_special_tokens,
    split_long_runs,
)

# Llama 3.1-shaped, tiny: grouped-query attention, ffn_dim_multiplier 1.3, theta 500000, scaled RoPE.
SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3, seed=0)
N_RANKS = 384  # the tiny BPE's ranks; the special tokens follow


def real_llama3_tokenizer():
    candidates = [os.environ.get("LLAMA3_TOKENIZER"), REPO.parent / "shared" / "data" / "llama3-tokenizer.model"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


needs_real_tokenizer = pytest.mark.skipif(
    real_llama3_tokenizer() is None, reason="the real Llama 3 tokenizer is not on this machine (LLAMA3_TOKENIZER)"
)


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok3") / "tokenizer.model"
    train_tiktoken_bpe(path, n_ranks=N_RANKS)
    return path


@pytest.fixture(scope="module")
def tok3(tiktoken_file) -> Llama3Tokenizer:
    return Tokenizer(str(tiktoken_file))


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory, tiktoken_file) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("l3_mp1"), mp=1, tokenizer=tiktoken_file, **SHAPE)


@pytest.fixture(scope="module")
def ckpt3_mp2(tmp_path_factory, tiktoken_file) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("l3_mp2"), mp=2, tokenizer=tiktoken_file, **SHAPE)


@pytest.fixture(scope="module")
def hf3(tmp_path_factory, ckpt3) -> Path:
    out = tmp_path_factory.mktemp("l3_hf") / "hf"
    convert_hf.meta_to_hf(ckpt3, out)
    return out


def build(ckpt, tokenizer=None, **kwargs):
    tokenizer = tokenizer or Path(ckpt) / "tokenizer.model"
    return Llama.build(str(ckpt), str(tokenizer), max_seq_len=64, max_batch_size=2, device="cpu", **kwargs)


CORPUS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 3:14 pm; they'll say we've won 12345678 times.",
    "  leading and trailing spaces   \n\n\ttabs\r\nand CRLF\n",
    "café naïve résumé über façade jalapeño — “quotes” ‘single’ …",
    "中文字符，日本語のテキスト、한국어 텍스트",
    "emoji 😀🦙👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A: pass",
    "<|begin_of_text|> <|eot_id|><|start_header_id|>user<|end_header_id|> [INST] <<SYS>>",
    "ALL CAPS WORDS DON'T I'M YOU'RE",
    "a" * 30 + " " * 30 + "\u00a0\u2003\u3000",
    "numbers 0 00 000 0000 1.5e-10 -42",
]


# --- the tokenizer file and the tokenizer ---


def test_tiny_tiktoken_file_is_bytes_then_merges(tiktoken_file, tok3):
    lines = tiktoken_file.read_text().splitlines()
    assert len(lines) == N_RANKS
    assert [int(line.split()[1]) for line in lines] == list(range(N_RANKS))
    assert isinstance(tok3, Llama3Tokenizer) and tok3.kind == "tiktoken"
    assert tok3.n_words == N_RANKS + 256
    # Merges were learned: common words take fewer tokens than bytes.
    assert len(tok3.encode(" the llama model", bos=False, eos=False)) < len(" the llama model")


def test_special_tokens_follow_the_ranks_with_metas_names(tok3):
    names = llama3_special_tokens()
    assert len(names) == 256 and len(set(names)) == 256
    expected = {
        "<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|reserved_special_token_0|>": 2,
        "<|reserved_special_token_1|>": 3, "<|finetune_right_pad_id|>": 4, "<|step_id|>": 5,
        "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9,
        "<|python_tag|>": 10, "<|reserved_special_token_2|>": 11, "<|reserved_special_token_246|>": 255,
    }
    for name, offset in expected.items():
        assert tok3.special_tokens[name] == N_RANKS + offset, name
    assert (tok3.bos_id, tok3.eos_id, tok3.pad_id) == (N_RANKS, N_RANKS + 1, N_RANKS + 4)
    assert tok3.stop_tokens == [N_RANKS + 1, N_RANKS + 8, N_RANKS + 9]
    assert tok3.encode("hi", bos=True, eos=True)[0] == tok3.bos_id
    assert tok3.encode("hi", bos=True, eos=True)[-1] == tok3.eos_id


@pytest.mark.parametrize("text", CORPUS)
def test_tiny_round_trip_and_pieces(tok3, text):
    ids = tok3.encode(text, bos=False, eos=False)
    assert all(0 <= i < N_RANKS for i in ids)  # no special token out of plain text
    assert tok3.decode(ids) == text
    pieces = tok3.decode_pieces(ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)  # no half characters


def test_special_token_text_is_plain_text_unless_allowed(tok3):
    text = "a<|eot_id|>b"
    plain = tok3.encode(text, bos=False, eos=False)
    assert tok3.special_tokens["<|eot_id|>"] not in plain
    assert tok3.decode(plain) == text
    allowed = tok3.encode(text, bos=False, eos=False, allowed_special="all")
    assert tok3.special_tokens["<|eot_id|>"] in allowed


def test_streaming_decoder_holds_back_split_characters(tok3):
    ids = tok3.encode("é😀x", bos=False, eos=False)
    assert len(ids) > 3  # byte-level: the emoji's 4 bytes are separate tokens here
    stream = IncrementalDecoder(tok3)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "é😀x"
    assert "😀" in pieces and not any("\ufffd" in p for p in pieces)


def _metas_slices(s, max_len):
    # Meta's slicing, transcribed as a character loop (the reference the fast version must equal).
    slices, start, run_len = [], 0, 0
    run_is_space = s[0].isspace() if s else False
    for i, char in enumerate(s):
        if char.isspace() != run_is_space:
            run_len, run_is_space = 1, char.isspace()
        else:
            run_len += 1
            if run_len > max_len:
                slices.append(s[start:i])
                start, run_len = i, 1
    return slices + [s[start:]]


def test_long_runs_are_sliced_as_meta_slices_them():
    rng = random.Random(0)
    for _ in range(300):
        s = "".join(rng.choice("ab \n\u00a0\u2003x\x1c") for _ in range(rng.randint(0, 60)))
        max_len = rng.randint(1, 6)
        assert list(split_long_runs(s, max_len)) == _metas_slices(s, max_len), (s, max_len)


def test_long_input_is_encoded_in_slices(tok3):
    text = "ab" * 20_000 + " " + "word " * 10
    ids = tok3.encode(text, bos=False, eos=False)
    expected = tok3.model.encode(text[:25_000]) + tok3.model.encode(text[25_000:])
    assert ids == expected
    assert tok3.decode(ids) == text


@needs_real_tokenizer
def test_real_tokenizer_equals_tiktoken_with_metas_pattern_and_specials():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path = real_llama3_tokenizer()
    ranks = load_tiktoken_bpe(str(path))
    specials = (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
         "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
         "<|eot_id|>", "<|python_tag|>"]
        + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]
    )
    metas_pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
        r"\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    reference = tiktoken.Encoding(
        name="meta-llama3", pat_str=metas_pattern, mergeable_ranks=ranks,
        special_tokens={name: len(ranks) + i for i, name in enumerate(specials)},
    )
    ours = Tokenizer(str(path))
    assert ours.n_words == 128256 and LLAMA3_PATTERN == metas_pattern
    assert (ours.bos_id, ours.eos_id) == (128000, 128001)
    assert [ours.special_tokens[n] for n in ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>")] == [
        128006, 128007, 128008, 128009
    ]
    for text in CORPUS + ["The capital of France is Paris."]:
        ids = ours.encode(text, bos=False, eos=False)
        assert ids == reference.encode(text, disallowed_special=()), text
        assert ours.decode(ids) == reference.decode(ids) == text
    assert ours.encode("Hello world", bos=True, eos=False) == [128000, 9906, 1917]


@needs_real_tokenizer
def test_real_chat_format_token_ids():
    tok = Tokenizer(str(real_llama3_tokenizer()))
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    ids = family.LLAMA_3.encode_dialog(tok, dialog)
    # <|begin_of_text|> <|start_header_id|>system<|end_header_id|>\n\n Be brief.<|eot_id|>
    # <|start_header_id|>user<|end_header_id|>\n\n Hello world<|eot_id|> <|start_header_id|>assistant<|end_header_id|>\n\n
    be_brief = tok.encode("Be brief.", bos=False, eos=False)
    assert ids == (
        [128000, 128006, 9125, 128007, 271] + be_brief + [128009]
        + [128006, 882, 128007, 271, 9906, 1917, 128009]
        + [128006, 78191, 128007, 271]
    )


def metas_llama3_prompt(tok, dialog, strip_content):
    """The prompt ids Meta's code builds for `dialog`, written out from its format:
    <|begin_of_text|>, then per message <|start_header_id|>role<|end_header_id|> "\n\n"
    content <|eot_id|>, then the assistant's header. Meta's meta-llama/llama3
    (Llama 3.0) strips the content (`ChatFormat.encode_message`); llama-models
    (3.1+) encodes it as given (`ChatFormat.encode_message` / `_encode_content`)."""
    if tok.n_words == 128256:  # the real tokenizer: the ids themselves
        bos, start, end, blank_line, eot = 128000, 128006, 128007, [271], 128009
        role_ids = {"system": [9125], "user": [882], "assistant": [78191]}
    else:
        sp = tok.special_tokens
        bos, start, end, eot = sp["<|begin_of_text|>"], sp["<|start_header_id|>"], sp["<|end_header_id|>"], sp["<|eot_id|>"]
        blank_line = tok.encode("\n\n", bos=False, eos=False)
        role_ids = {role: tok.encode(role, bos=False, eos=False) for role in ("system", "user", "assistant")}
    ids = [bos]
    for message in dialog:
        content = message["content"].strip() if strip_content else message["content"]
        ids += [start] + role_ids[message["role"]] + [end] + blank_line
        ids += tok.encode(content, bos=False, eos=False) + [eot]
    return ids + [start] + role_ids["assistant"] + [end] + blank_line


@pytest.fixture(scope="module")
def chat3_tokenizer(tok3):
    """The real Llama 3 tokenizer where present, else the tiny one (a fresh clone)."""
    real = real_llama3_tokenizer()
    return Tokenizer(str(real)) if real else tok3


def test_llama31_keeps_message_whitespace_and_llama30_strips_it(chat3_tokenizer):
    tok = chat3_tokenizer
    dialog = [
        {"role": "system", "content": " Be brief.\n"},
        {"role": "user", "content": "\n  Hello world  "},
        {"role": "assistant", "content": " Hi. "},
        {"role": "user", "content": "the llama\n\n"},
    ]
    as_given = family.LLAMA_3.encode_dialog(tok, dialog)
    assert as_given == metas_llama3_prompt(tok, dialog, strip_content=False)
    stripped = family.LLAMA_3_0.encode_dialog(tok, dialog)
    assert stripped == metas_llama3_prompt(tok, dialog, strip_content=True)
    assert as_given != stripped
    # Without surrounding whitespace the two versions agree.
    plain = [{"role": m["role"], "content": m["content"].strip()} for m in dialog]
    assert family.LLAMA_3.encode_dialog(tok, plain) == family.LLAMA_3_0.encode_dialog(tok, plain) == stripped


def test_llama3_version_follows_use_scaled_rope(tok3):
    # Llama 3.0's params.json has no use_scaled_rope; every 3.1+ one sets it true.
    llama30 = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 640, "multiple_of": 32,
               "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0}
    llama31 = {**llama30, "use_scaled_rope": True}
    assert family.of_model(tok3, family.LLAMA_3.model_args(llama30)) is family.LLAMA_3_0
    assert family.of_model(tok3, family.LLAMA_3.model_args(llama31)) is family.LLAMA_3
    assert not family.LLAMA_3.strips_content and family.LLAMA_3_0.strips_content
    # The 3.0 version is Llama 3 in everything else.
    assert family.LLAMA_3_0.stop_tokens(tok3) == family.LLAMA_3.stop_tokens(tok3)
    assert family.LLAMA_3_0.tok_embeddings_split_dim == family.LLAMA_3.tok_embeddings_split_dim == 0
    assert family.LLAMA_3_0 not in family.FAMILIES  # files never say "3.0"; the params do


def test_a_built_llama_takes_its_version_from_the_checkpoint(ckpt3, tmp_path):
    # The tiny llama3 checkpoint is 3.1-shaped (use_scaled_rope); the same without it is 3.0.
    assert build(ckpt3).family is family.LLAMA_3
    llama30 = tmp_path / "l30"
    shutil.copytree(ckpt3, llama30)
    params = json.loads((llama30 / "params.json").read_text())
    params.pop("use_scaled_rope")
    params.pop("rope_scaling_factor", None)
    (llama30 / "params.json").write_text(json.dumps(params))
    generator = build(llama30)
    assert generator.family is family.LLAMA_3_0
    dialog = [{"role": "user", "content": "  the river  "}]
    stripped = [{"role": "user", "content": "the river"}]
    assert generator.family.encode_dialog(generator.tokenizer, dialog) == \
        family.LLAMA_3.encode_dialog(generator.tokenizer, stripped)


def test_llama2_has_one_version(tiny_tokenizer):
    tok = Tokenizer(str(tiny_tokenizer))
    assert family.of_model(tok, ModelArgs()) is family.LLAMA_2
    assert family.of_model(tok, ModelArgs(use_scaled_rope=True)) is family.LLAMA_2


# --- the chat format and the stop tokens, with the tiny tokenizer ---


def test_chat_format_layout(tok3):
    sp = tok3.special_tokens
    dialog = [{"role": "user", "content": "[INST] <<SYS>> <|eot_id|> hi"}]
    ids = encode_dialog_llama3(tok3, dialog, strip_content=False)
    content = tok3.encode("[INST] <<SYS>> <|eot_id|> hi", bos=False, eos=False)
    header = lambda role: [sp["<|start_header_id|>"]] + tok3.encode(role, False, False) + [sp["<|end_header_id|>"]]
    nl = tok3.encode("\n\n", False, False)
    assert ids == [tok3.bos_id] + header("user") + nl + content + [sp["<|eot_id|>"]] + header("assistant") + nl
    assert ids.count(sp["<|eot_id|>"]) == 1  # the content's text stayed text
    assert not family.LLAMA_3.refuses(dialog) and family.LLAMA_2.refuses(dialog)


class ScriptedModel(torch.nn.Module):
    """Stands in for a Transformer: the next token after position p is script[p]."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.params = ModelArgs(vocab_size=vocab_size, max_seq_len=32, max_batch_size=2)
        self.model_parallel_size = 1
        self.tok_embeddings = torch.nn.Embedding(1, 1)
        self.script, self.calls = script, 0

    def forward(self, tokens, start_pos, last_logits_only=False):
        self.calls += 1
        bsz, seqlen = tokens.shape
        logits = torch.zeros(bsz, seqlen, self.params.vocab_size)
        for k in range(seqlen):
            logits[:, k, self.script[start_pos + k]] = 1.0
        return logits[:, -1:] if last_logits_only else logits


@pytest.mark.parametrize("stop", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
def test_generation_stops_at_each_stop_token(tok3, stop):
    prompt = tok3.encode("the llama", bos=True, eos=False)
    answer = tok3.encode(" red green", bos=False, eos=False)
    after = tok3.encode(" never seen", bos=False, eos=False)
    script = [0] * (len(prompt) - 1) + answer + [tok3.special_tokens[stop]] + after + [0] * 32
    model = ScriptedModel(script, tok3.n_words)
    generator = Llama(model, tok3)
    tokens, _ = generator.generate([prompt], max_gen_len=20, temperature=0)
    assert tokens == [answer]
    assert model.calls == len(answer) + 1  # the loop ended at the stop token
    assert list(generator.stream_generate(prompt, max_gen_len=20, temperature=0)) == answer
    assert "".join(generator.stream_text_completion("the llama", max_gen_len=20, temperature=0)) == " red green"


def test_llama2_family_does_not_stop_at_llama3_ids(tiny_tokenizer):
    tok = Tokenizer(str(tiny_tokenizer))
    assert family.of_tokenizer(tok) is family.LLAMA_2
    assert family.LLAMA_2.stop_tokens(tok) == [tok.eos_id]


def test_chat_completion_end_to_end(ckpt3):
    generator = build(ckpt3)
    assert generator.family is family.LLAMA_3
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi [INST]"}]
    result = generator.chat_completion([dialog], max_gen_len=8, temperature=0, logprobs=True)[0]
    prompt = family.LLAMA_3.encode_dialog(generator.tokenizer, dialog)
    tokens, _ = generator.generate([prompt], max_gen_len=8, temperature=0)
    assert result["generation"]["content"] == generator.tokenizer.decode(tokens[0])
    assert "".join(result["tokens"]) == result["generation"]["content"]
    streamed = "".join(generator.stream_chat_completion(dialog, max_gen_len=8, temperature=0))
    assert streamed == result["generation"]["content"]


def test_chat_repl_conversation_uses_the_llama3_format(tok3):
    from llama.chat_repl import Conversation

    conversation = Conversation("use <<SYS>> freely", family.LLAMA_3)  # Llama 2's tags are text here
    dialog, dropped, reply_len = conversation.fit(tok3, "hello", max_seq_len=64, max_gen_len=8)
    assert dropped == 0 and reply_len == 8
    assert dialog[-1] == {"role": "user", "content": "hello"}
    with pytest.raises(ValueError, match="own tags"):
        Conversation("<<SYS>>", family.LLAMA_2)


def test_chat_script_with_llama3(ckpt3):
    # chat.py, unchanged, on a Llama 3 checkpoint: its system prompt may hold
    # Llama 2's tags, and each reply is streamed in the Llama 3 format.
    import subprocess

    from conftest import subprocess_env

    proc = subprocess.run(
        [sys.executable, "chat.py", "--ckpt_dir", str(ckpt3), "--max_seq_len", "64", "--max_gen_len", "4",
         "--system", "no [INST] here", "--temperature", "0"],
        input="hello\nthe river\n/exit\n", capture_output=True, text=True, timeout=120, cwd=REPO,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[system prompt: no [INST] here]" in proc.stdout and "[bye]" in proc.stdout
    assert proc.stdout.count(">>> ") >= 3


# --- rotary scaling ---


def _metas_scaling(freqs, factor):
    # Meta's apply_scaling, element by element.
    low_wavelen, high_wavelen = 8192 / 1, 8192 / 4
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_scaled_frequencies_match_meta_and_transformers(factor):
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    ours = apply_scaling(base, factor)
    torch.testing.assert_close(ours, _metas_scaling(base, factor), rtol=1e-6, atol=0)
    assert not torch.equal(ours, base)
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(ours, inv_freq.float(), rtol=1e-6, atol=0)
    # The complex table uses the scaled frequencies.
    table = precompute_freqs_cis(128, 4, 500000.0, use_scaled=True, scale_factor=factor)
    torch.testing.assert_close(torch.angle(table[1]), ours, rtol=1e-6, atol=0)


# --- parity with transformers, MP 1 and 2 and resharded ---


def hf_reference(hf_dir, prompt, max_gen_len, stop_tokens):
    transformers = pytest.importorskip("transformers", reason="pip install -e .[test] for transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    tokens = list(prompt)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0]
        for _ in range(max_gen_len):
            next_token = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
            if next_token in stop_tokens:
                break
            tokens.append(next_token)
    return logits, tokens[len(prompt):]


@pytest.fixture(scope="module")
def hf3_reference(hf3, tok3):
    return hf_reference(hf3, logits_worker.PROMPT, logits_worker.MAX_GEN_LEN, tok3.stop_tokens)


def assert_matches_hf(result, reference):
    logits, greedy = reference
    torch.testing.assert_close(torch.tensor(result["logits"]), logits, atol=1e-5, rtol=0)
    assert result["greedy"] == greedy


def test_converted_config_is_llama3(hf3):
    config = json.loads((hf3 / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert config["rope_theta"] == 500000.0 and config["num_key_value_heads"] == 2
    assert config["bos_token_id"] == N_RANKS
    assert config["eos_token_id"] == [N_RANKS + 1, N_RANKS + 8, N_RANKS + 9]  # transformers stops at each


def test_parity_with_transformers_mp1(ckpt3, hf3_reference):
    assert_matches_hf(logits_worker.results(build(ckpt3)), hf3_reference)


def test_scaled_rope_matters_here(ckpt3, tmp_path):
    # The parity above would not hold without the scaling: the logits move.
    plain = tmp_path / "plain"
    shutil.copytree(ckpt3, plain)
    params = json.loads((plain / "params.json").read_text())
    del params["use_scaled_rope"]
    (plain / "params.json").write_text(json.dumps(params))
    scaled = torch.tensor(logits_worker.results(build(ckpt3))["logits"])
    unscaled = torch.tensor(logits_worker.results(build(plain))["logits"])
    assert (scaled - unscaled).abs().max() > 1e-4


def test_parity_with_transformers_mp2_and_resharded(ckpt3_mp2, hf3_reference, tok3, tmp_path):
    shard = torch.load(ckpt3_mp2 / "consolidated.00.pth", weights_only=True)
    assert tuple(shard["tok_embeddings.weight"].shape) == (tok3.n_words // 2, 64)  # vocabulary-parallel
    reshard(ckpt3_mp2, tmp_path / "mp1", 1, progress=False)
    assert torch.load(tmp_path / "mp1" / "consolidated.00.pth", weights_only=True)["tok_embeddings.weight"].shape == (
        tok3.n_words, 64
    )
    assert_matches_hf(logits_worker.results(build(tmp_path / "mp1")), hf3_reference)

    # Two ranks: on the 2-shard checkpoint, and on the resharded one (each rank
    # then slices its vocabulary rows out of the single shard).
    worker = REPO / "tests" / "logits_worker.py"
    run_torchrun(2, [worker, tmp_path / "out.json", ckpt3_mp2, tmp_path / "mp1"], timeout=240)
    results = json.loads((tmp_path / "out.json").read_text())
    assert [r["model_parallel_size"] for r in results] == [2, 2]
    for result in results:
        assert_matches_hf(result, hf3_reference)


def test_hf_llama32_config_converts_with_its_factor_and_tied_output(tmp_path, tiktoken_file, tok3):
    transformers = pytest.importorskip("transformers", reason="pip install -e .[test] for transformers")
    config = transformers.LlamaConfig(
        vocab_size=tok3.n_words, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "original").mkdir()
    shutil.copyfile(tiktoken_file, tmp_path / "hf" / "original" / "tokenizer.model")  # where Meta's repos keep it

    convert_hf.hf_to_meta(tmp_path / "hf", tmp_path / "meta", model_parallel_size=2)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 32.0
    assert ffn_hidden_dim(64, params["multiple_of"], params.get("ffn_dim_multiplier")) == 256
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    assert torch.equal(shard["output.weight"], shard["tok_embeddings.weight"])  # tied, vocabulary-split alike
    generator = build(tmp_path / "meta")
    with torch.inference_mode():
        ours = generator.model.forward(torch.tensor([logits_worker.PROMPT]), 0)[0]
    theirs, _ = hf_reference(tmp_path / "hf", logits_worker.PROMPT, 0, [])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    # And back: the factor is written into config.json again.
    convert_hf.meta_to_hf(tmp_path / "meta", tmp_path / "hf2")
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["rope_scaling"]["factor"] == 32.0


def test_hf_folder_with_only_tokenizer_json_says_what_is_missing(tmp_path, hf3, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(hf3, hf)
    (hf / "tokenizer.model").unlink()
    (hf / "tokenizer.json").write_text("{}")
    convert_hf.hf_to_meta(hf, tmp_path / "meta")
    err = capsys.readouterr().err
    assert "no tokenizer.model" in err and "tokenizer.json" in err and "original/tokenizer.model" in err
    assert (tmp_path / "meta" / "params.json").is_file()
    # Without a tokenizer.model, the rope scaling still marks the family: shards in Llama 3's layout.
    convert_hf.hf_to_meta(hf, tmp_path / "meta2", model_parallel_size=2)
    shard = torch.load(tmp_path / "meta2" / "consolidated.00.pth", weights_only=True)
    assert shard["tok_embeddings.weight"].shape[1] == 64


def test_meta_to_hf_to_meta_is_bit_identical_for_llama3(tmp_path, ckpt3_mp2):
    convert_hf.meta_to_hf(ckpt3_mp2, tmp_path / "hf")
    convert_hf.hf_to_meta(tmp_path / "hf", tmp_path / "back", model_parallel_size=2)
    assert (tmp_path / "back" / "params.json").read_text() == (ckpt3_mp2 / "params.json").read_text()
    for rank in range(2):
        original = torch.load(ckpt3_mp2 / f"consolidated.{rank:02d}.pth", weights_only=True)
        back = torch.load(tmp_path / "back" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], original[k]) for k in original)


# --- errors ---


def test_llama3_tokenizer_with_llama2_checkpoint(tiny_ckpt_mp2, tiny_ckpt, tiktoken_file, monkeypatch):
    # Before any weight is read.
    monkeypatch.setattr(checkpoint, "load_shard", lambda path: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"tiktoken BPE file \(Llama 3 family.*is a Llama 2-family checkpoint "
                                         r"\(its tok_embeddings is split on dim 1"):
        build(tiny_ckpt_mp2, tokenizer=tiktoken_file)
    with pytest.raises(ValueError, match=r"vocab_size 512 but the tokenizer .* has 640 pieces \(a tiktoken BPE file, "
                                         r"Llama 3 family\)"):
        build(tiny_ckpt, tokenizer=tiktoken_file)


def test_llama2_tokenizer_with_llama3_checkpoint(ckpt3_mp2, ckpt3, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(checkpoint, "load_shard", lambda path: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"SentencePiece model \(Llama 2 family.*is a Llama 3-family checkpoint "
                                         r"\(its tok_embeddings is split on dim 0"):
        build(ckpt3_mp2, tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"Llama 3-family checkpoint \(its params.json sets use_scaled_rope\)"):
        build(ckpt3, tokenizer=tiny_tokenizer)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unknown rope option 'rope_scaling'"),
        ({"rope_type": "dynamic"}, "unknown rope option 'rope_type'"),
        ({"use_scaled_rope": "yes"}, "field 'use_scaled_rope' has the wrong type"),
        ({"use_scaled_rope": False, "rope_scaling_factor": 32.0}, "rope_scaling_factor is set but use_scaled_rope"),
        ({"rope_scaling_factor": -1.0}, "rope_scaling_factor must be positive"),
    ],
)
def test_llama3_checkpoint_with_an_unknown_rope_option(tmp_path, ckpt3, change, message):
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt3, broken)
    params = {**json.loads((broken / "params.json").read_text()), **change}
    (broken / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=message):
        build(broken)


# --- shards, shapes, tied output ---


def test_tied_output_is_taken_from_the_embedding(tmp_path, ckpt3, ckpt3_mp2, capsys):
    expected = logits_worker.results(build(ckpt3))
    for source, n in ((ckpt3, 1), (ckpt3_mp2, 2)):
        tied = tmp_path / f"tied{n}"
        shutil.copytree(source, tied)
        for rank in range(n):
            path = tied / f"consolidated.{rank:02d}.pth"
            shard = torch.load(path, weights_only=True)
            shard["output.weight"] = shard["tok_embeddings.weight"]  # what a tied model's weights are
            torch.save(shard, path)
        with_output = logits_worker.results(build(tied))
        for rank in range(n):
            path = tied / f"consolidated.{rank:02d}.pth"
            shard = torch.load(path, weights_only=True)
            del shard["output.weight"]
            torch.save(shard, path)
        capsys.readouterr()
        without = logits_worker.results(build(tied))
        assert "no output.weight; using tok_embeddings.weight" in capsys.readouterr().err
        assert without == with_output and without["logits"] != expected["logits"]


def test_tied_output_is_not_guessed_in_llama2s_split_layout(tmp_path, tiny_ckpt_mp2):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt_mp2, broken)
    for rank in range(2):
        path = broken / f"consolidated.{rank:02d}.pth"
        shard = torch.load(path, weights_only=True)
        del shard["output.weight"]
        torch.save(shard, path)
    with pytest.raises(ValueError, match="missing output.weight"):
        build(broken)


@pytest.mark.parametrize(
    "dim, multiple_of, multiplier, hidden",
    [
        (4096, 1024, 1.3, 14336),  # Llama 3 / 3.1 8B
        (8192, 4096, 1.3, 28672),  # Llama 3 / 3.1 / 3.3 70B
        (16384, 4096, 1.2, 53248),  # Llama 3.1 405B
        (2048, 256, 1.5, 8192),  # Llama 3.2 1B
        (3072, 256, 1.0, 8192),  # Llama 3.2 3B
    ],
)
def test_llama3_feed_forward_sizes(dim, multiple_of, multiplier, hidden):
    assert ffn_hidden_dim(dim, multiple_of, multiplier) == hidden
    assert ffn_hidden_dim(dim, *convert_hf.ffn_params_for(dim, hidden)) == hidden


def test_8b_shapes():
    args = family.LLAMA_3.model_args(
        {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
         "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}
    )
    shapes = checkpoint.full_shapes(args)
    assert shapes["tok_embeddings.weight"] == shapes["output.weight"] == (128256, 4096)
    assert shapes["layers.0.attention.wk.weight"] == (1024, 4096)
    assert shapes["layers.0.feed_forward.w1.weight"] == (14336, 4096)
    assert shapes["layers.31.feed_forward.w2.weight"] == (4096, 14336)


@pytest.mark.parametrize("n_shards", [8, 16])
def test_405b_shape_fits_8_and_16_shards(n_shards):
    # Meta's 405B: 126 layers of dim 16384, 128 query heads, 16 KV heads in its 16-shard release.
    args = family.LLAMA_3.model_args(
        {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 16, "vocab_size": 128256,
         "multiple_of": 4096, "ffn_dim_multiplier": 1.2, "norm_eps": 1e-05, "rope_theta": 500000.0,
         "use_scaled_rope": True}
    )
    checkpoint.check_model_parallel_fit(args, n_shards)
    shapes = checkpoint.full_shapes(args)
    for rank in (0, n_shards - 1):
        dim, start, stop = checkpoint.shard_range("tok_embeddings.weight", shapes["tok_embeddings.weight"], args, n_shards, rank)
        assert (dim, stop - start) == (0, 128256 // n_shards)  # 16032 or 8016 vocabulary rows a shard
        dim, start, stop = checkpoint.shard_range("layers.0.attention.wk.weight", shapes["layers.0.attention.wk.weight"], args, n_shards, rank)
        assert (dim, start, stop) == (0, rank * 16 // n_shards * 128, (rank + 1) * 16 // n_shards * 128)
    # Loading on another world size follows from the same ranges: 16 shards on 8, 32 ranks on 16 shards.
    assert 8 in checkpoint.valid_model_parallel_sizes(args, 16)
    assert 32 in checkpoint.valid_model_parallel_sizes(args, 16)  # KV heads replicated on 2 ranks each
    with pytest.raises(ValueError, match="cannot be split"):
        checkpoint.check_model_parallel_fit(args, 3)


@pytest.mark.parametrize("n_shards, world", [(4, 1), (4, 2), (2, 4), (1, 8), (8, 4)])
def test_vocab_split_resharding_at_tiny_size(n_shards, world):
    # The 405B's pattern at tiny size: 8 query heads, 4 KV heads, vocabulary-split
    # embedding; any shard count on any world size that one of them divides.
    args = family.LLAMA_3.model_args(
        {"dim": 64, "n_layers": 1, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 64, "multiple_of": 32,
         "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "use_scaled_rope": True}
    )
    from llama.tiny import random_weights, shard_state_dict

    full = random_weights(args, seed=1)
    shards = [shard_state_dict(full, n_shards, r, args) for r in range(n_shards)]
    assert shards[0]["tok_embeddings.weight"].shape == (64 // n_shards, 64)
    for rank in range(world):
        part = checkpoint.assemble_rank(lambda i: (shards[i], f"shard {i}"), n_shards, rank, world, args)
        for key, tensor in part.items():
            want = checkpoint.shard_range(key, full[key].shape, args, world, rank)
            expected = full[key] if want is None else full[key].narrow(want[0], want[1], want[2] - want[1])
            assert torch.equal(tensor, expected), (key, rank)


def test_tiny_cli_llama3(tmp_path):
    assert tiny_main([str(tmp_path / "t"), "--family", "llama3", "--mp", "2", "--rope-scaling-factor", "32"]) == 0
    params = json.loads((tmp_path / "t" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 32.0
    assert params["rope_theta"] == 500000.0 and params["n_kv_heads"] == 2 and params["vocab_size"] == 640
    tok = Tokenizer(str(tmp_path / "t" / "tokenizer.model"))
    assert isinstance(tok, Llama3Tokenizer) and tok.n_words == 640
    generator = build(tmp_path / "t")
    assert generator.model.tok_embeddings.__class__.__name__ in ("VocabParallelEmbedding", "ParallelEmbedding")
    assert generator.model.params.rope_scaling_factor == 32.0 and generator.model.params.tok_embeddings_split_dim == 0


def test_tokenizer_copies_keep_their_kind(tok3):
    import copy

    twin = copy.copy(tok3)
    assert isinstance(twin, Llama3Tokenizer) and twin.encode("the llama", True, False) == tok3.encode("the llama", True, False)


# --- hostile tokenizer files and text (issue 19) ---


def test_a_bpe_file_missing_single_bytes_is_refused_at_load(tmp_path, tiktoken_file):
    # Accepted, such a file made tiktoken panic (pyo3_runtime.PanicException, a BaseException
    # that `except Exception` lets through) on the first text holding a missing byte.
    path = bpe_file_without_bytes(tiktoken_file, tmp_path / "tokenizer.model", bytes([0x00, 0xFE, 0xFF]))
    with pytest.raises(ValueError, match=r"lack 3 of the 256 single bytes \(b'\\x00', b'\\xfe', b'\\xff'\)"):
        Tokenizer(str(path))
    with pytest.raises(ValueError, match="lack 3 of the 256 single bytes"):
        Llama3Tokenizer(str(path))


def test_llama3_encode_refuses_a_lone_surrogate_as_the_sentencepiece_tokenizer_does(tok3, tiny_tokenizer):
    message = r"the text to encode holds a lone surrogate '\\ud800' at position 2"
    with pytest.raises(ValueError, match=message):
        tok3.encode("ab\ud800", bos=True, eos=False)  # it was replaced with U+FFFD
    with pytest.raises(ValueError, match=message):
        Tokenizer(str(tiny_tokenizer)).encode("ab\ud800", bos=True, eos=False)
    with pytest.raises(TypeError, match="the text to encode must be a str, got bytes"):
        tok3.encode(b"ab", bos=True, eos=False)

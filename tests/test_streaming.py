"""Streaming generation: the pieces join to the non-streamed result, token by token."""

import pytest
import torch

from llama import Llama
from llama.chat_format import UNSAFE_ERROR, encode_dialog
from llama.model import ModelArgs
from llama.tiny import random_weights, write_checkpoint
from llama.tokenizer import Tokenizer

def _chat(content):
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("seed, prompt", [(0, "the river"), (1, "Café naïve über"), (2, "one two three")])
def test_stream_joins_to_completion(generator, seed, prompt):
    torch.manual_seed(seed)
    expected = generator.text_completion([prompt], temperature=0.9, top_p=0.9, max_gen_len=16)
    rng_after = torch.get_rng_state()
    torch.manual_seed(seed)
    pieces = list(generator.stream_text_completion(prompt, temperature=0.9, top_p=0.9, max_gen_len=16))
    assert "".join(pieces) == expected[0]["generation"]
    # The same random numbers were drawn, so what comes next is the same too.
    assert torch.equal(torch.get_rng_state(), rng_after)

    torch.manual_seed(seed)
    expected = generator.chat_completion([_chat(prompt)], temperature=0.9, top_p=0.9, max_gen_len=16)
    torch.manual_seed(seed)
    pieces = list(generator.stream_chat_completion(_chat(prompt), temperature=0.9, top_p=0.9, max_gen_len=16))
    assert "".join(pieces) == expected[0]["generation"]["content"]


def test_stream_yields_one_piece_per_token_and_stops_at_max_gen_len(generator):
    prompt_tokens = generator.tokenizer.encode("the river", bos=True, eos=False)
    expected, _ = generator.generate([prompt_tokens], max_gen_len=7, temperature=0)
    assert expected[0] and generator.tokenizer.eos_id not in expected[0]
    assert list(generator.stream_generate(prompt_tokens, max_gen_len=7, temperature=0)) == expected[0]
    assert len(list(generator.stream_text_completion("the river", max_gen_len=7, temperature=0))) == 7


def test_stream_runs_each_step_in_inference_mode_and_releases_it(generator, monkeypatch):
    modes = []
    forward = generator.model.forward

    def recording_forward(*args, **kwargs):
        modes.append(torch.is_inference_mode_enabled())
        return forward(*args, **kwargs)

    monkeypatch.setattr(generator.model, "forward", recording_forward)
    between_steps = [torch.is_inference_mode_enabled() for _ in generator.stream_text_completion("the", max_gen_len=5)]
    assert modes and all(modes)
    assert between_steps and not any(between_steps)


def test_closing_a_stream_early_leaves_the_next_call_intact(generator):
    torch.manual_seed(3)
    full = generator.text_completion(["the river"], max_gen_len=20)[0]["generation"]

    stream = generator.stream_text_completion("a quiet village", max_gen_len=50)
    assert len([next(stream) for _ in range(3)]) == 3
    stream.close()
    for piece in generator.stream_text_completion("one two", max_gen_len=50):
        break  # leaving a for loop drops the stream half-way too

    torch.manual_seed(3)
    assert "".join(generator.stream_text_completion("the river", max_gen_len=20)) == full
    torch.manual_seed(3)
    assert generator.text_completion(["the river"], max_gen_len=20)[0]["generation"] == full


def test_a_stream_overtaken_by_another_generation_refuses_to_go_on(generator):
    stream = generator.stream_text_completion("the river", max_gen_len=20, temperature=0)
    next(stream)
    generator.text_completion(["one two"], max_gen_len=3)
    with pytest.raises(RuntimeError, match="overtaken by a later generation"):
        next(stream)


def test_stream_arguments_are_checked_at_the_call(generator):
    with pytest.raises(ValueError, match="one prompt str"):
        generator.stream_text_completion(["the river"])
    with pytest.raises(ValueError, match="one prompt, a list of token ids"):
        generator.stream_generate([[1, 2]], max_gen_len=3)
    with pytest.raises(ValueError, match="temperature"):
        generator.stream_text_completion("the river", temperature=-1)
    with pytest.raises(ValueError, match="max_gen_len"):
        generator.stream_generate([1, 2], max_gen_len=-1)
    with pytest.raises(ValueError, match="role"):
        generator.stream_chat_completion([{"role": "assistant", "content": "hi"}])


def test_stream_answers_special_tags_as_chat_completion_does(generator):
    dialog = _chat("[INST] hi [/INST]")
    torch.manual_seed(5)
    expected = generator.chat_completion([dialog], max_gen_len=6)
    rng_after = torch.get_rng_state()
    torch.manual_seed(5)
    assert list(generator.stream_chat_completion(dialog, max_gen_len=6)) == [UNSAFE_ERROR]
    assert expected[0]["generation"]["content"] == UNSAFE_ERROR
    assert torch.equal(torch.get_rng_state(), rng_after)


# --- byte-fallback characters, forced through a tiny model's own weights ---

TEXT_PROMPT = "one two"


def _forcing_weights(tokenizer: Tokenizer, args: ModelArgs, successor: dict) -> dict:
    """Seeded tiny weights edited so that, after token `a`, `successor[a]` is all but certain.

    Each token `a` with a successor gets a dimension `k` of its own in the
    residual stream: its embedding is a large multiple of unit vector k, no
    layer writes into those dimensions, and the output row of `successor[a]`
    reads dimension k only. Everything else is the random model.
    """
    state = random_weights(args, seed=0)
    sources = list(successor)
    reserved = len(sources)
    embed, output = state["tok_embeddings.weight"], state["output.weight"]
    embed[:, :reserved] = 0
    output[:, :reserved] = 0
    for key, weight in state.items():
        if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            weight[:reserved] = 0
    for dim, source in enumerate(sources):
        embed[source] = 0
        embed[source, dim] = 1000.0
        output[successor[source]] = 0
    for dim, source in enumerate(sources):
        output[successor[source], dim] += 100.0
    return state


@pytest.fixture(scope="module")
def forcing_llama(tmp_path_factory, tiny_tokenizer):
    """A tiny model that writes "the中 one" then EOS after TEXT_PROMPT, and
    starts each chat answer with the 4-byte "🦙" before going on at random."""
    tokenizer = Tokenizer(str(tiny_tokenizer))
    piece = tokenizer.sp_model.piece_to_id
    names = ["▁the", "▁one", "<0xE4>", "<0xB8>", "<0xAD>", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    ids = {name: piece(name) for name in names}
    assert all(ids.values()), f"the tiny tokenizer lacks a piece the test needs: {ids}"
    text_start = tokenizer.encode(TEXT_PROMPT, bos=True, eos=False)[-1]
    chat_start = encode_dialog(tokenizer, _chat("hi"))[-1]
    # 中 is E4 B8 AD in UTF-8, 🦙 is F0 9F A6 99.
    chain_text = [text_start, ids["▁the"], ids["<0xE4>"], ids["<0xB8>"], ids["<0xAD>"], ids["▁one"]]
    chain_text.append(tokenizer.eos_id)
    chain_chat = [chat_start, ids["<0xF0>"], ids["<0x9F>"], ids["<0xA6>"], ids["<0x99>"]]
    successor = {**dict(zip(chain_text, chain_text[1:])), **dict(zip(chain_chat, chain_chat[1:]))}
    assert len(successor) == len(chain_text) + len(chain_chat) - 2, "the two chains must not share tokens"

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words, multiple_of=32)
    out = tmp_path_factory.mktemp("forcing_ckpt")
    write_checkpoint(out, _forcing_weights(tokenizer, args, successor), args)
    return Llama.build(str(out), str(tiny_tokenizer), max_seq_len=64, max_batch_size=1, device="cpu")


def test_byte_fallback_characters_come_out_whole_and_eos_ends_the_stream(forcing_llama):
    expected = forcing_llama.text_completion([TEXT_PROMPT], temperature=0.8, max_gen_len=30)[0]["generation"]
    pieces = list(forcing_llama.stream_text_completion(TEXT_PROMPT, temperature=0.8, max_gen_len=30))
    # The first word loses SentencePiece's leading space, as in decode(); the
    # three bytes of 中 give "", "" and then the whole character; EOS ends it.
    assert pieces == ["the", "", "", "中", " one"]
    assert "".join(pieces) == expected == "the中 one"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_byte_fallback_then_sampling_joins_to_chat_completion(forcing_llama, seed):
    dialog = _chat("hi")
    torch.manual_seed(seed)
    expected = forcing_llama.chat_completion([dialog], temperature=1.0, max_gen_len=24)[0]["generation"]["content"]
    torch.manual_seed(seed)
    pieces = list(forcing_llama.stream_chat_completion(dialog, temperature=1.0, max_gen_len=24))
    assert pieces[:4] == ["", "", "", "🦙"]
    assert "".join(pieces) == expected
    assert len(pieces) > 4  # and went on sampling after the forced bytes

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.generation import sample_top_p

GOLDEN = Path(__file__).parent / "golden" / "greedy_tokens.json"
# Prompts as token ids, so the golden file depends on the weights alone.
GOLDEN_PROMPTS = [[1, 100, 200, 300], [1, 42], [1, 7, 8, 9, 10, 11, 12, 13]]
GOLDEN_GEN_LEN = 12


def full_forward_logprobs(generator, tokens):
    """log p(tokens[j] | tokens[:j]) for j >= 1 from one forward pass, no cache reuse."""
    with torch.inference_mode():
        logits = generator.model.forward(torch.tensor([tokens]), 0)
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
    return logprobs.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].tolist()


def with_eos(generator, eos_id):
    """The same model with a tokenizer whose EOS is `eos_id` (to force EOS where we like)."""
    tokenizer = copy.copy(generator.tokenizer)
    tokenizer.eos_id = eos_id
    return Llama(generator.model, tokenizer)


def test_greedy_tokens_match_golden_file(generator):
    tokens, _ = generator.generate(GOLDEN_PROMPTS, max_gen_len=GOLDEN_GEN_LEN, temperature=0)
    if os.environ.get("LLAMA_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps({"prompts": GOLDEN_PROMPTS, "max_gen_len": GOLDEN_GEN_LEN,
                                      "tokens": tokens}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["prompts"] == GOLDEN_PROMPTS
    assert tokens == golden["tokens"]


def test_ragged_batch_gives_each_prompt_its_solo_result(generator):
    prompts = [[1, 100, 200, 300], [1, 42], [1, 7, 8, 9, 10, 11, 12, 13], [1, 5, 6]]
    batch_tokens, batch_logprobs = generator.generate(prompts, max_gen_len=10, temperature=0, logprobs=True)
    for i, prompt in enumerate(prompts):
        solo_tokens, solo_logprobs = generator.generate([prompt], max_gen_len=10, temperature=0, logprobs=True)
        assert batch_tokens[i] == solo_tokens[0]
        torch.testing.assert_close(batch_logprobs[i], solo_logprobs[0], atol=1e-5, rtol=1e-5)


def test_logprobs_are_log_softmax_of_a_full_forward(generator):
    prompt = [1, 33, 66, 99]
    tokens, logprobs = generator.generate([prompt], max_gen_len=8, temperature=0, logprobs=True)
    assert len(tokens[0]) == len(logprobs[0]) == 8
    expected = full_forward_logprobs(generator, prompt + tokens[0])[len(prompt) - 1 :]
    torch.testing.assert_close(logprobs[0], expected, atol=1e-5, rtol=1e-5)


def test_echo_returns_prompt_and_its_logprobs(generator):
    prompt = [1, 33, 66, 99]
    plain, _ = generator.generate([prompt], max_gen_len=6, temperature=0)
    tokens, logprobs = generator.generate([prompt], max_gen_len=6, temperature=0, logprobs=True, echo=True)
    assert tokens[0] == prompt + plain[0]
    assert logprobs[0][0] == 0.0  # nothing predicts the first token
    expected = full_forward_logprobs(generator, tokens[0])
    torch.testing.assert_close(logprobs[0][1:], expected, atol=1e-5, rtol=1e-5)


def test_nothing_to_generate_gives_shifted_prompt_logprobs(generator):
    # The reference's min_prompt_len == total_len branch compared each
    # position's logits with its own token, not the next one.
    prompt = [1, 20, 30, 40, 50]
    tokens, logprobs = generator.generate([prompt], max_gen_len=0, logprobs=True, echo=True)
    assert tokens == [prompt]
    torch.testing.assert_close(logprobs[0][1:], full_forward_logprobs(generator, prompt), atol=1e-5, rtol=1e-5)
    assert generator.generate([prompt], max_gen_len=0) == ([[]], None)


def test_generation_is_cut_before_the_first_eos_and_stops(generator):
    prompt = [1, 100, 200, 300]
    free, _ = generator.generate([prompt], max_gen_len=12, temperature=0)
    eos = free[0][4]
    first = free[0].index(eos)
    tokens, logprobs = with_eos(generator, eos).generate([prompt], max_gen_len=12, temperature=0, logprobs=True)
    assert tokens[0] == free[0][:first]
    assert len(logprobs[0]) == first


def test_eos_inside_an_echoed_prompt_is_kept(generator):
    prompt = [1, 100, 200, 300]
    free, _ = generator.generate([prompt], max_gen_len=6, temperature=0)
    tokens, _ = with_eos(generator, 200).generate([prompt], max_gen_len=6, temperature=0, echo=True)
    expected = prompt + free[0]
    if 200 in free[0]:
        expected = prompt + free[0][: free[0].index(200)]
    assert tokens[0] == expected


def test_loop_stops_once_every_row_has_eos(generator):
    prompts = [[1, 100, 200, 300], [1, 42]]
    free, _ = generator.generate(prompts, max_gen_len=12, temperature=0)
    eos = free[0][1]
    calls = []
    model = generator.model
    original = model.forward
    model.forward = lambda tokens, start_pos, **kw: calls.append(start_pos) or original(tokens, start_pos, **kw)
    try:
        tokens, _ = with_eos(generator, eos).generate([prompts[0]], max_gen_len=12, temperature=0)
    finally:
        del model.forward
    assert tokens[0] == free[0][: free[0].index(eos)]
    assert len(calls) == free[0].index(eos) + 1  # no step after the EOS


def test_seeded_sampling_is_reproducible(generator):
    prompts = [[1, 100, 200, 300], [1, 42]]
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(generator.generate(prompts, max_gen_len=16, temperature=1.0, top_p=0.95)[0])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_temperature_zero_is_argmax(generator):
    prompt = [1, 5, 6, 7]
    tokens, _ = generator.generate([prompt], max_gen_len=1, temperature=0)
    with torch.inference_mode():
        logits = generator.model.forward(torch.tensor([prompt]), 0)
    assert tokens[0][0] == int(logits[0, -1].argmax())


def test_sample_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    torch.manual_seed(0)
    draws = torch.cat([sample_top_p(probs.clone(), 0.7) for _ in range(2000)]).flatten()
    # Sorted: 0.5 (id 1), 0.3 (id 3), 0.15, 0.05. Ids 1 and 3 reach 0.8 >= 0.7.
    assert set(draws.tolist()) == {1, 3}
    share = (draws == 1).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.05


def test_sample_top_p_small_p_is_greedy_and_shape():
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    out = sample_top_p(probs, 0.01)
    assert out.shape == (2, 1)
    assert out.flatten().tolist() == [2, 0]


def test_sample_top_p_one_keeps_every_token():
    probs = torch.full((1, 4), 0.25)
    torch.manual_seed(1)
    draws = {int(sample_top_p(probs.clone(), 1.0)) for _ in range(300)}
    assert draws == {0, 1, 2, 3}


def test_text_completion_tokens_join_to_the_generation(generator):
    results = generator.text_completion(
        ["The llama café", "Hello"], max_gen_len=12, temperature=0.8, logprobs=True
    )
    for result in results:
        assert "".join(result["tokens"]) == result["generation"]
        assert len(result["tokens"]) == len(result["logprobs"])


def test_decode_pieces_keep_spaces_and_whole_characters(generator):
    tokenizer = generator.tokenizer
    text = "Hello world, café 中文 🦙 done"
    ids = tokenizer.encode(text, bos=False, eos=False)
    pieces = tokenizer.decode_pieces(ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert " world" in pieces or " w" in pieces  # the leading space stays with its word
    assert "中" in pieces and "🦙" in pieces  # byte-fallback tokens come out as whole characters


def test_text_completion_returns_reference_shapes(generator):
    assert generator.text_completion([]) == []
    out = generator.text_completion(["Hello"], max_gen_len=3, temperature=0)
    assert list(out[0]) == ["generation"]
    echo = generator.text_completion(["Hello"], max_gen_len=3, temperature=0, echo=True)
    assert echo[0]["generation"].startswith("Hello")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_tokens=[[1] * 129], max_gen_len=4), "max_seq_len"),
        (dict(prompt_tokens=[[1, 2]] * 9, max_gen_len=4), "max_batch_size"),
        (dict(prompt_tokens=[[1, 512]], max_gen_len=4), "outside the vocabulary"),
        (dict(prompt_tokens=[[1, -3]], max_gen_len=4), "outside the vocabulary"),
        (dict(prompt_tokens=[[]], max_gen_len=4), "empty"),
        (dict(prompt_tokens=[[1]], max_gen_len=4, temperature=-0.1), "temperature"),
        (dict(prompt_tokens=[[1]], max_gen_len=4, top_p=0.0), "top_p"),
        (dict(prompt_tokens=[[1]], max_gen_len=4, top_p=1.5), "top_p"),
        (dict(prompt_tokens=[[1]], max_gen_len=-1), "max_gen_len"),
    ],
)
def test_bad_generate_arguments_raise_clear_errors(generator, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generator.generate(**kwargs)
    # A failed call leaves the instance working.
    assert len(generator.generate([[1, 2, 3]], max_gen_len=2, temperature=0)[0][0]) == 2


def test_text_completion_rejects_a_bare_string(generator):
    with pytest.raises(ValueError, match="list of strings"):
        generator.text_completion("Hello")

"""Property-based: whatever text_completion and chat_completion are given, they
return a result or raise ValueError/TypeError naming the problem, and the
Llama answers a good call afterwards exactly as before."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")  # a test extra: pip install -e ".[test]"
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llama.chat_format import SPECIAL_TAGS, encode_dialog  # noqa: E402

GOOD_PROMPT = "the river"
GOOD_DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]

# Words an error must contain to count as naming the problem.
NAMED = (
    "prompt", "dialog", "message", "role", "content", "temperature", "top_p", "max_gen_len",
    "max_batch_size", "max_seq_len", "surrogate", "str", "list",
)

surrogates = st.integers(0xD800, 0xDFFF).map(chr)
fragments = st.one_of(
    st.text(max_size=8),
    st.sampled_from(SPECIAL_TAGS + ["<<SYS>>\n", "\n<</SYS>>\n\n", "</s>", "<s>", " "]),
    surrogates,
    st.text(st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF), max_size=3),
)
texts = st.lists(fragments, max_size=4).map("".join)
contents = st.one_of(texts, texts, texts, st.none(), st.integers())
roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.sampled_from(["", "tool", "User"]))
messages = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": contents}),
    st.fixed_dictionaries({"role": roles}),
    st.just("not a message"),
)
# Mostly well-formed dialogs (so that generation runs), some anything.
well_formed = st.tuples(st.booleans(), st.lists(st.tuples(texts, texts), max_size=2), texts).map(
    lambda parts: ([{"role": "system", "content": parts[0] and "Be brief." or ""}] if parts[0] else [])
    + [m for u, a in parts[1] for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    + [{"role": "user", "content": parts[2]}]
)
dialogs = st.one_of(well_formed, well_formed, st.lists(messages, max_size=4))
numbers = st.one_of(
    st.floats(0, 1.5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 1e-40, 1e-7, -0.0]),
    st.none(),
    st.text(max_size=3),
    st.booleans(),
)
gen_lens = st.one_of(st.integers(0, 3), st.integers(-3, -1), st.sampled_from([None, 2.5, "3", True]))
options = st.fixed_dictionaries(
    {},
    optional={"temperature": numbers, "top_p": numbers, "max_gen_len": gen_lens, "logprobs": st.booleans()},
)


def _reference_tokens(generator):
    # A text prompt and a chat prompt, each alone (batched, the short one
    # would be fed one token at a time up to the long one's length).
    prompts = [generator.tokenizer.encode(GOOD_PROMPT, bos=True, eos=False), encode_dialog(generator.tokenizer, GOOD_DIALOG)]
    out = []
    for prompt in prompts:
        tokens, logprobs = generator.generate([prompt], max_gen_len=4, temperature=0, logprobs=True)
        out.append((tokens, [round(p, 4) for p in logprobs[0]]))
    return out


@pytest.fixture(scope="module")
def reference(generator):
    return _reference_tokens(generator)


def _call_and_check(generator, reference, call, n_inputs, kwargs):
    if kwargs.get("max_gen_len", 0) is None:
        kwargs["max_gen_len"] = 3  # None means max_seq_len - 1: too slow for many examples
    kwargs.setdefault("max_gen_len", 3)
    torch.manual_seed(0)
    try:
        results = call(**kwargs)
    except (ValueError, TypeError) as e:
        assert any(word in str(e) for word in NAMED), f"error does not name the problem: {e!r}"
    else:
        assert isinstance(results, list) and len(results) == n_inputs
        for result in results:
            assert set(result) >= {"generation"}
            if kwargs.get("logprobs"):
                assert len(result["tokens"]) == len(result["logprobs"])
    assert _reference_tokens(generator) == reference


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(dialog_list=st.lists(dialogs, max_size=3), kwargs=options)
def test_chat_completion_gives_a_result_or_a_named_error(generator, reference, dialog_list, kwargs):
    _call_and_check(generator, reference, lambda **kw: generator.chat_completion(dialog_list, **kw),
                    len(dialog_list), kwargs)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(prompts=st.lists(st.one_of(texts, texts, texts, st.none(), st.integers()), max_size=3), kwargs=options,
       echo=st.booleans())
def test_text_completion_gives_a_result_or_a_named_error(generator, reference, prompts, kwargs, echo):
    _call_and_check(generator, reference, lambda **kw: generator.text_completion(prompts, echo=echo, **kw),
                    len(prompts), kwargs)

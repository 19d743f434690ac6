import copy

import pytest

from conftest import real_llama2_tokenizer
from llama.chat_format import B_INST, B_SYS, E_INST, E_SYS, UNSAFE_ERROR, encode_dialog
from llama.tokenizer import Tokenizer

DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


@pytest.mark.skipif(real_llama2_tokenizer() is None, reason="the real Llama 2 tokenizer is not on this machine (LLAMA2_TOKENIZER)")
def test_chat_encoding_with_the_real_llama2_tokenizer():
    tokenizer = Tokenizer(str(real_llama2_tokenizer()))
    expected = (
        # <s> ▁[ INST ] ▁<< SY S >> \n Be ▁brief . \n < </ SY S >> \n \n Hi ▁[ / INST ] ▁Hello ! ▁ </s>
        [1, 518, 25580, 29962, 3532, 14816, 29903, 6778, 13, 3629, 11473, 29889, 13]
        + [29966, 829, 14816, 29903, 6778, 13, 13, 18567, 518, 29914, 25580, 29962, 15043, 29991, 29871, 2]
        # <s> ▁[ INST ] ▁By e ▁[ / INST ]
        + [1, 518, 25580, 29962, 2648, 29872, 518, 29914, 25580, 29962]
    )
    assert encode_dialog(tokenizer, DIALOG) == expected


def test_chat_encoding_token_by_token(tiny_tokenizer):
    tokenizer = Tokenizer(str(tiny_tokenizer))
    enc = tokenizer.encode
    expected = (
        enc(f"{B_INST} {B_SYS}Be brief.{E_SYS}Hi {E_INST} Hello! ", bos=True, eos=True)
        + enc(f"{B_INST} Bye {E_INST}", bos=True, eos=False)
    )
    assert expected[0] == tokenizer.bos_id and tokenizer.eos_id in expected
    assert encode_dialog(tokenizer, DIALOG) == expected


def test_chat_encoding_strips_contents_and_leaves_the_dialog_alone(tiny_tokenizer):
    tokenizer = Tokenizer(str(tiny_tokenizer))
    dialog = [{"role": "user", "content": "  Hi there \n"}]
    before = copy.deepcopy(dialog)
    assert encode_dialog(tokenizer, dialog) == tokenizer.encode("[INST] Hi there [/INST]", bos=True, eos=False)
    assert dialog == before


@pytest.mark.parametrize(
    "dialog, message",
    [
        ([], "non-empty"),
        ([{"role": "system", "content": "x"}], "user message after the system"),
        ([{"role": "assistant", "content": "x"}], "role 'assistant' where 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "role 'user' where 'assistant'"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": 3}], "must be a str"),
    ],
)
def test_bad_dialogs_raise_clear_errors(tiny_tokenizer, dialog, message):
    with pytest.raises(ValueError, match=message):
        encode_dialog(Tokenizer(str(tiny_tokenizer)), dialog)


def test_chat_completion_answers_unsafe_requests_with_the_error(generator):
    dialogs = [
        [{"role": "user", "content": "Please [INST] do this"}],
        [{"role": "user", "content": "A normal question"}],
    ]
    results = generator.chat_completion(dialogs, max_gen_len=4, temperature=0)
    assert results[0]["generation"] == {"role": "assistant", "content": UNSAFE_ERROR}
    assert results[1]["generation"]["role"] == "assistant"
    assert results[1]["generation"]["content"] != UNSAFE_ERROR


def test_chat_completion_generates_from_the_encoded_dialog(generator):
    dialog = DIALOG
    result = generator.chat_completion([dialog], max_gen_len=6, temperature=0, logprobs=True)[0]
    tokens, logprobs = generator.generate(
        [encode_dialog(generator.tokenizer, dialog)], max_gen_len=6, temperature=0, logprobs=True
    )
    assert result["generation"]["content"] == generator.tokenizer.decode(tokens[0])
    assert result["logprobs"] == logprobs[0]
    assert "".join(result["tokens"]) == result["generation"]["content"]


def test_chat_completion_rejects_bad_dialogs_and_keeps_working(generator):
    with pytest.raises(ValueError, match="last message"):
        generator.chat_completion([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])
    assert generator.chat_completion([]) == []
    assert generator.chat_completion([[{"role": "user", "content": "a"}]], max_gen_len=2)[0]["generation"]

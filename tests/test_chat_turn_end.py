"""A reply that runs on into "[INST] ..." is cut there and cannot poison the chat (issue 11, item 6)."""

import pytest

from conftest import chat_on_input
from llama import Llama
from llama.chat_format import UNSAFE_ERROR


def through(pieces):
    from llama.chat_repl import TurnEnd

    turn_end = TurnEnd()
    shown = "".join(turn_end.push(piece) for piece in pieces) + turn_end.flush()
    return shown, turn_end


def test_turn_end_cuts_at_a_tag_split_over_pieces_and_holds_nothing_else_back():
    from llama.chat_repl import TurnEnd

    shown, turn_end = through(["Sure", ".", " [", "IN", "ST] And", " then?"])
    assert (shown, turn_end.kept, turn_end.cut) == ("Sure. ", "Sure.", True)
    shown, turn_end = through(["x <", "</S", "YS>> y"])
    assert (shown, turn_end.kept, turn_end.cut) == ("x ", "x", True)
    turn_end = TurnEnd()  # stopped (Ctrl-C) with a possible tag held back: it is shown and kept
    assert turn_end.push("one [") == "one " and turn_end.flush() == "[" and turn_end.kept == "one ["
    shown, turn_end = through(["a [", "b] <<", "c", " [INS"])  # look like tags, are not
    assert (shown, turn_end.cut) == ("a [b] <<c [INS", False)


@pytest.fixture(scope="module")
def llama(tiny_ckpt):
    return Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), 128, 1, device="cpu")


def test_a_reply_running_into_a_new_turn_does_not_poison_the_session(llama, monkeypatch):
    dialogs = []
    real_stream = llama.stream_chat_completion

    def stream(dialog, **kwargs):
        dialogs.append(dialog)
        if len(dialogs) == 1:  # the model runs on into an imagined next message
            return (piece for piece in ["Hello", " there", ".", " [", "INST", "] Now", " tell", " me"])
        return real_stream(dialog, **kwargs)

    monkeypatch.setattr(llama, "stream_chat_completion", stream)
    shown = chat_on_input(llama, b"hi\nthe river\n", temperature=0, max_gen_len=8)
    assert "Hello there. \n[the reply went on into a turn of its own; cut there]" in shown
    assert "INST" not in shown and UNSAFE_ERROR not in shown
    assert dialogs[1][1] == {"role": "assistant", "content": "Hello there."}
    # The second reply is the model's own, not the refusal the tag used to cause.
    assert llama.chat_completion([dialogs[1]], temperature=0, max_gen_len=8)[0]["generation"]["content"] in shown

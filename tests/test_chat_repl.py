"""The interactive chat: its history rules, its terminal input, and whole sessions
driven through a pseudo-terminal as a person would, at world size 1 and 2."""

import io
import os
import sys
import termios
import time

import pexpect
import pytest

from conftest import REPO, chat_on_input, interruptible, subprocess_env, torchrun_cmd
from llama import Llama, Tokenizer
from llama.chat_format import encode_dialog
from llama.chat_repl import HELP, PROMPT, Conversation, MessageTooLong, Terminal, printable, run_chat
from llama.tiny import demo_checkpoint

SYSTEM = "answer in one line"


def _user(content):
    return {"role": "user", "content": content}


def _assistant(content):
    return {"role": "assistant", "content": content}


# --- pieces, in process ---


def test_printable_escapes_control_characters_but_newline_and_tab():
    assert printable("a\x1b[2Jb\tc\nd\x7f\x85é中") == "a\\x1b[2Jb\tc\nd\\x7f\\x85é中"


def test_conversation_drops_oldest_turns_but_keeps_the_system_prompt(tiny_tokenizer):
    tokenizer = Tokenizer(str(tiny_tokenizer))
    conversation = Conversation(SYSTEM)
    turns = [("the river", "a quiet village"), ("one two", "three four"), ("red green", "blue")]
    for turn in turns:
        conversation.add(*turn)
    system = {"role": "system", "content": SYSTEM}
    last_turn = [_user("red green"), _assistant("blue")]
    needed = len(encode_dialog(tokenizer, [system, *last_turn, _user("hello")]))

    dialog, dropped, reply_len = conversation.fit(tokenizer, "hello", max_seq_len=needed + 10, max_gen_len=10)
    assert (dropped, reply_len) == (2, 10)
    assert dialog == [system, *last_turn, _user("hello")]
    assert conversation.turns == turns[2:]

    # Room for the message alone but not a whole reply: everything goes, the reply is cut.
    alone = len(encode_dialog(tokenizer, [system, _user("hello")]))
    dialog, dropped, reply_len = conversation.fit(tokenizer, "hello", max_seq_len=alone + 3, max_gen_len=10)
    assert (dialog, dropped, reply_len) == ([system, _user("hello")], 1, 3)

    conversation.add("one two", "three four")
    with pytest.raises(MessageTooLong, match="no room for a reply within max_seq_len"):
        conversation.fit(tokenizer, "hello", max_seq_len=alone, max_gen_len=10)
    assert conversation.turns == [("one two", "three four")]  # left as it was
    with pytest.raises(ValueError, match="system prompt holds"):
        Conversation("<<SYS>>")


def test_a_max_seq_len_too_short_for_any_turn_is_refused_at_the_start(tiny_tokenizer):
    from llama import chat_repl

    tokenizer = Tokenizer(str(tiny_tokenizer))
    for system in (None, SYSTEM):
        conversation = Conversation(system)
        shortest = len(encode_dialog(tokenizer, conversation.dialog("x"))) + 1  # and one reply token
        chat_repl.check_room(conversation, tokenizer, shortest)
        with pytest.raises(ValueError, match=f"max_seq_len must be at least {shortest}"):
            chat_repl.check_room(conversation, tokenizer, shortest - 1)


def test_terminal_reads_lines_ctrl_c_and_ctrl_d_from_a_tty():
    leader, follower = os.openpty()
    try:
        before = termios.tcgetattr(follower)
        with Terminal(follower, io.StringIO()) as terminal:
            os.write(leader, "héllo\n".encode())
            assert terminal.read_line(5) == "héllo"
            assert terminal.read_line(0.05) is None
            os.write(leader, b"half typed\x03")  # Ctrl-C ends the line, as Enter does
            with pytest.raises(KeyboardInterrupt):
                terminal.read_line(5)
            assert not terminal.interrupt_requested()
            os.write(leader, b"typed ahead\nabc\x03")
            # The tty hands the input over a moment later; poll as the chat does between tokens.
            deadline = time.monotonic() + 10
            while not terminal.interrupt_requested():
                assert time.monotonic() < deadline, "Ctrl-C was never seen"
                time.sleep(0.01)
            assert not terminal.interrupt_requested()
            assert terminal.read_line(5) == "typed ahead"
            os.write(leader, b"\x04")  # Ctrl-D on an empty line
            with pytest.raises(EOFError):
                terminal.read_line(5)
        assert termios.tcgetattr(follower) == before
    finally:
        os.close(leader)
        os.close(follower)


def test_terminal_that_hangs_up_ends_the_input():
    leader, follower = os.openpty()
    terminal = Terminal(follower, io.StringIO())
    os.close(leader)  # as when the terminal window is closed: reads return nothing
    try:
        with pytest.raises(EOFError):
            terminal.read_line(5)
    finally:
        os.close(follower)


def test_run_chat_checks_its_arguments_before_reading(reference):
    with pytest.raises(ValueError, match=r"max_gen_len must be an int in \[1, max_seq_len - 1\]"):
        run_chat(reference, max_gen_len=reference.model.params.max_seq_len, input_fd=-1)
    with pytest.raises(ValueError, match="system prompt holds"):
        run_chat(reference, system="[INST]", input_fd=-1)
    with pytest.raises(ValueError, match="top_p"):
        run_chat(reference, top_p=0, input_fd=-1)


# --- whole sessions through a pseudo-terminal ---


def spawn_chat(world: int, args, env=None) -> pexpect.spawn:
    chat = [str(REPO / "chat.py"), *[str(a) for a in args]]
    cmd = [sys.executable, *chat] if world == 1 else torchrun_cmd(world, chat)
    child = pexpect.spawn(
        cmd[0], cmd[1:], cwd=str(REPO), env=subprocess_env(env), encoding="utf-8", timeout=120, dimensions=(24, 200),
        preexec_fn=interruptible,
    )
    child.logfile_read = sys.stdout  # the session's screen, shown by pytest when a test fails
    child.expect_exact(PROMPT)
    return child


def send(child: pexpect.spawn, line: str) -> str:
    """Type `line` and Enter; returns what the chat printed before its next prompt."""
    child.sendline(line)
    child.expect_exact(line + "\r\n")
    child.expect_exact("\r\n" + PROMPT)
    return child.before.replace("\r\n", "\n")


def send_and_interrupt(child: pexpect.spawn, line: str) -> str:
    """Type `line`, then Ctrl-C once the reply starts; returns the part of the reply shown."""
    child.sendline(line)
    child.expect_exact(line + "\r\n")
    child.expect(r"\S")
    shown = child.after
    child.send("\x03")  # Ctrl-C
    child.expect_exact("\r\n[stopped]\r\n" + PROMPT)
    shown += child.before
    assert "^C" in shown  # the terminal's echo of Ctrl-C, wherever the output then was
    return shown.replace("^C", "", 1).replace("\r\n", "\n")


def leave(child: pexpect.spawn, how: str) -> None:
    if how == "/exit":
        child.sendline("/exit")
    else:
        child.sendeof()
    child.expect_exact("[bye]")
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    # torchrun exits 0 only once every rank has exited 0.
    assert (child.exitstatus, child.signalstatus) == (0, None)


def greedy(llama: Llama, dialog, max_gen_len: int) -> str:
    return llama.chat_completion([dialog], temperature=0, max_gen_len=max_gen_len)[0]["generation"]["content"]


def shown_prefix(stream, shown: str) -> str:
    """The text of the first pieces of `stream` that print as `shown`, which must stop short of its end."""
    text = ""
    for piece in stream:
        text += piece
        if printable(text) == shown:
            assert next(stream, None) is not None, "the reply had ended: Ctrl-C came too late to stop it"
            return text
        assert len(printable(text)) <= len(shown), f"the chat showed {shown!r}, not a prefix of {text!r}"
    raise AssertionError(f"the chat showed {shown!r}; the whole reply is {text!r}")


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    return Llama.build(
        str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=256, max_batch_size=1, device="cpu"
    )


@pytest.mark.parametrize("world", [1, 2])
def test_chat_session_history_reset_truncation_and_exit(world, reference, tiny_ckpt, tiny_ckpt_mp2):
    gen_len = 12
    system = {"role": "system", "content": SYSTEM}
    encoded_len = lambda dialog: len(encode_dialog(reference.tokenizer, dialog))  # noqa: E731

    first = greedy(reference, [system, _user("the river")], gen_len)
    second_dialog = [system, _user("the river"), _assistant(first), _user("a quiet village")]
    second = greedy(reference, second_dialog, gen_len)
    second_alone = greedy(reference, [system, _user("a quiet village")], gen_len)
    assert second != second_alone  # else the session could not show that the history was used
    max_seq_len = encoded_len(second_dialog) + gen_len  # the second turn just fits
    # A message that fits after the system prompt alone, but not after the turn before it too.
    history = [system, _user("a quiet village"), _assistant(second_alone)]
    long_message = "bright morning"
    while encoded_len([*history, _user(long_message)]) + gen_len <= max_seq_len:
        long_message += " bright morning"
    assert encoded_len([system, _user(long_message)]) + gen_len <= max_seq_len
    long_reply = greedy(reference, [system, _user(long_message)], gen_len)

    ckpt = tiny_ckpt if world == 1 else tiny_ckpt_mp2
    child = spawn_chat(
        world,
        ["--ckpt_dir", ckpt, "--system", SYSTEM, "--max_seq_len", max_seq_len, "--max_gen_len", gen_len,
         "--temperature", 0, "--heartbeat_s", 0.2],
    )
    try:
        assert send(child, "the river") == printable(first)
        assert send(child, "a quiet village") == printable(second)
        # Idle: rank 0 sends keep-alive commands to the others, printing nothing.
        with pytest.raises(pexpect.TIMEOUT):
            child.read_nonblocking(1000, timeout=1.0)
        assert send(child, "/reset") == "[history cleared]"
        assert send(child, "/nope") == f"[unknown command '/nope'] {HELP}"
        assert send(child, "[INST] hi").startswith("[not sent: a message may not hold the chat format's tags")
        assert send(child, "a quiet village") == printable(second_alone)
        assert send(child, long_message) == (
            f"[history too long for max_seq_len {max_seq_len}: dropped the oldest 1 turn]\n" + printable(long_reply)
        )
        leave(child, "/exit")
    finally:
        child.close(force=True)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """An empty LLAMA_CACHE, and a reference Llama built on the demo checkpoint made there."""
    cache = tmp_path_factory.mktemp("llama_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA_CACHE", str(cache))
        ckpt = demo_checkpoint(1)
    llama = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=2048, max_batch_size=1, device="cpu")
    return cache, llama


@pytest.mark.parametrize("world", [1, 2])
def test_chat_ctrl_c_stops_a_reply_on_every_rank_and_ctrl_d_leaves(world, demo_cache):
    cache, reference = demo_cache
    gen_len = 1200  # long enough that Ctrl-C comes before the reply ends
    # No --ckpt_dir: the demo checkpoint (at world 2 made by the ranks themselves, in two shards).
    child = spawn_chat(world, ["--max_seq_len", 2048, "--max_gen_len", gen_len, "--temperature", 0],
                       env={"LLAMA_CACHE": str(cache)})
    try:
        assert "using the demo checkpoint" in child.before
        shown = send_and_interrupt(child, "the river")
        stream = reference.stream_chat_completion([_user("the river")], temperature=0, max_gen_len=gen_len)
        first = shown_prefix(stream, shown)
        # Every rank stopped after the same token, or this turn would hang or differ;
        # and the stopped reply is in the history as far as it was shown.
        dialog = [_user("the river"), _assistant(first), _user("a quiet village")]
        shown = send_and_interrupt(child, "a quiet village")
        shown_prefix(reference.stream_chat_completion(dialog, temperature=0, max_gen_len=gen_len), shown)
        # Ctrl-C while typing drops the line and gives a fresh prompt.
        child.send("half a line")
        child.send("\x03")
        child.expect_exact("half a line^C\r\n" + PROMPT)
        leave(child, "Ctrl-D")
    finally:
        child.close(force=True)


# --- an error during one reply (issue 19) ---


@pytest.fixture(scope="module")
def llama_with_a_nan_word(tiny_ckpt, tmp_path_factory):
    """A Llama on `tiny_ckpt` whose embedding of the last token of "the river" is NaN:
    a message holding it makes the first step's logits NaN; other messages are unharmed."""
    import shutil

    import torch

    out = tmp_path_factory.mktemp("nan_word")
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(tiny_ckpt / name, out / name)
    bad_token = Tokenizer(str(tiny_ckpt / "tokenizer.model")).encode("the river", bos=False, eos=False)[-1]
    state = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
    state["tok_embeddings.weight"][bad_token] = float("nan")
    torch.save(state, out / "consolidated.00.pth")
    # fp32 on the CPU: the embedding is used in place from the mapped file, so it loads unchecked.
    llama = Llama.build(str(out), None, max_seq_len=128, max_batch_size=1, device="cpu")
    return llama, bad_token


def test_a_reply_that_fails_on_non_finite_logits_is_one_line_and_the_chat_goes_on(llama_with_a_nan_word):
    llama, bad_token = llama_with_a_nan_word
    assert bad_token not in encode_dialog(llama.tokenizer, [_user("one two three")])
    shown = chat_on_input(llama, b"the river\none two three\n", temperature=0, max_gen_len=6)
    errors = [line for line in shown.splitlines() if "error:" in line]
    assert len(errors) == 1 and "decoding step 0" in errors[0] and "the logits are not finite" in errors[0], shown
    # The chat went on, and the failed turn is not in the history the next reply sees.
    assert greedy(llama, [_user("one two three")], 6) in shown.split(errors[0])[1]
    assert shown.endswith("[bye]\n")

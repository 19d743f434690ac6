"""An interactive Llama chat (any family's chat format) in a terminal, under plain `python` or `torchrun`.

Rank 0 reads what the person types and prints the replies; it sends each
command to the other ranks (`broadcast_object_list`), and every rank runs the
same generation, so their collectives stay in step. While a reply streams,
rank 0 also sends one stop flag per token, so that Ctrl-C stops every rank
after the same token.

Ctrl-C reaches rank 0 as a character, not a signal: torchrun starts its
workers in sessions of their own, so the terminal's SIGINT would only reach
(and end) torchrun. Rank 0 therefore turns the terminal's signal keys off
for the session and makes Ctrl-C end a line, as Enter does; the terminal's
settings are restored on leaving.
"""

import math
import os
import select
import sys
import termios
import time
from contextlib import nullcontext
from typing import List, Optional, Sequence, TextIO, Tuple

import torch
import torch.distributed as dist

from llama import family
from llama.chat_format import SPECIAL_TAGS, Dialog
from llama.cli import one_line
from llama.demo import printable
from llama.distributed import check_collective_timeout, share_from_rank_0
from llama.generation import Llama, _check_sampling
from llama.tokenizer import Tokenizer

PROMPT = ">>> "
HELP = "Type a message and press Enter. /reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops a reply."
INTERRUPT = 0x03  # what Ctrl-C types


class TurnEnd:
    """Finds where a streamed reply runs on into a turn of its own making.

    A model may go on past its answer with "[INST] ..." (an imagined next
    message) or another tag of the chat format. Like a chat client, the
    chat cuts the reply there: kept in the history, the tag would make every
    later dialog one that holds the format's tags. Text that may be the start
    of a tag is held back until the next pieces settle it, so no part of a
    tag is ever shown.
    """

    def __init__(self, tags: Sequence[str] = SPECIAL_TAGS):
        self.tags = list(tags)  # none: nothing is cut or held back
        self._longest = max(map(len, self.tags), default=0)
        self.text = ""  # the reply so far, up to a cut
        self.shown = 0  # how much of it has been handed out to show
        self.cut = False

    def push(self, piece: str) -> str:
        """Add the next piece; returns the text now safe to show (maybe "")."""
        if self.cut:
            return ""
        self.text += piece
        search_from = max(0, self.shown - self._longest)
        found = [at for tag in self.tags if (at := self.text.find(tag, search_from)) >= 0]
        if found:
            self.cut = True
            self.text = self.text[: min(found)]
            return self.flush()
        held = 0  # the longest end of the text that a tag starts with
        for size in range(1, min(self._longest, len(self.text) - self.shown) + 1):
            if any(tag.startswith(self.text[-size:]) for tag in self.tags):
                held = size
        return self._release(len(self.text) - held)

    def flush(self) -> str:
        """The text held back: at the end of the reply, or when it is stopped."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.shown)
        out, self.shown = self.text[self.shown : upto], upto
        return out

    @property
    def kept(self) -> str:
        """What the history keeps: the text shown, without the spaces before a cut."""
        shown = self.text[: self.shown]
        return shown.rstrip() if self.cut else shown


class MessageTooLong(ValueError):
    """A message that does not fit `max_seq_len` even with no history before it."""


class Conversation:
    """The chat so far: an optional system prompt and the finished (user, assistant) turns."""

    def __init__(self, system: Optional[str] = None, model_family: family.Family = family.LLAMA_2):
        self.family = model_family
        if system is not None and model_family.refuses([{"role": "system", "content": system}]):
            raise ValueError("the system prompt holds the chat format's own tags ([INST], <<SYS>>, ...)")
        self.system = system or None
        self.turns: List[Tuple[str, str]] = []

    def dialog(self, message: str, turns: Optional[List[Tuple[str, str]]] = None) -> Dialog:
        """The dialog of the system prompt, `turns` (default: all) and the new `message`."""
        dialog: Dialog = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.turns if turns is None else turns:
            dialog += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return dialog + [{"role": "user", "content": message}]

    def fit(self, tokenizer: Tokenizer, message: str, max_seq_len: int, max_gen_len: int) -> Tuple[Dialog, int, int]:
        """Make room for `message` and a reply of `max_gen_len` tokens within `max_seq_len`.

        Drops the oldest turns (never the system prompt) until the prompt
        plus the reply fit; if the message alone leaves less room, the reply
        gets what is left. Returns (dialog, turns dropped, reply length).
        Raises MessageTooLong, leaving the history as it was, when the
        message leaves no room for a reply at all.
        """
        for dropped in range(len(self.turns) + 1):
            dialog = self.dialog(message, self.turns[dropped:])
            prompt_len = len(self.family.encode_dialog(tokenizer, dialog))
            if prompt_len + max_gen_len <= max_seq_len:
                break
        if prompt_len >= max_seq_len:
            raise MessageTooLong(
                f"that message is {prompt_len} tokens in the chat format"
                f"{' with the system prompt' if self.system else ''}, which leaves no room for a "
                f"reply within max_seq_len {max_seq_len}; send a shorter one"
            )
        del self.turns[:dropped]
        return dialog, dropped, min(max_gen_len, max_seq_len - prompt_len)

    def add(self, message: str, reply: str) -> None:
        self.turns.append((message, reply))

    def reset(self) -> None:
        self.turns.clear()


class Terminal:
    """Rank 0's input: whole lines from a file descriptor, and Ctrl-C while a reply streams.

    On a terminal, entering the context turns off the keys that send
    signals and makes Ctrl-C end a line as Enter does; Ctrl-D on an empty
    line still ends the input. Leaving restores the settings. Other input
    (a pipe, a file) is read as plain lines.
    """

    def __init__(self, fd: int, output: TextIO):
        self.fd = fd
        self.output = output
        self.is_tty = os.isatty(fd)
        self._saved_mode = None
        self._buffer = bytearray()
        self._eof = False

    def __enter__(self) -> "Terminal":
        if self.is_tty:
            self._saved_mode = termios.tcgetattr(self.fd)
            mode = termios.tcgetattr(self.fd)
            mode[3] = (mode[3] & ~termios.ISIG) | termios.ICANON | termios.ECHO  # lflag
            mode[6][termios.VEOL] = bytes([INTERRUPT])
            termios.tcsetattr(self.fd, termios.TCSADRAIN, mode)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved_mode is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved_mode)
            self._saved_mode = None

    def write(self, text: str) -> None:
        self.output.write(text)
        self.output.flush()

    def _fill(self, timeout: Optional[float]) -> bool:
        """Read what is ready within `timeout` seconds into the buffer; False if nothing was."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(self.fd, 65536)
        self._buffer += chunk
        self._eof = not chunk
        return True

    def _line_end(self) -> int:
        """Index of the first byte that ends a line (newline, or Ctrl-C on a terminal), or -1."""
        ends = [self._buffer.find(b"\n")]
        if self.is_tty:
            ends.append(self._buffer.find(bytes([INTERRUPT])))
        return min((i for i in ends if i >= 0), default=-1)

    def read_line(self, timeout: Optional[float] = None) -> Optional[str]:
        """The next line without its newline, or None if none came within `timeout` seconds.

        Like `input()`: raises EOFError at the end of the input and
        KeyboardInterrupt for a line ended by Ctrl-C.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            end = self._line_end()
            if end >= 0:
                line, ending = bytes(self._buffer[:end]), self._buffer[end]
                del self._buffer[: end + 1]
                if ending == INTERRUPT:
                    raise KeyboardInterrupt
                return line.decode("utf-8", errors="replace")
            if self._eof:
                if self._buffer:
                    line = bytes(self._buffer)
                    self._buffer.clear()
                    return line.decode("utf-8", errors="replace")
                raise EOFError
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._fill(remaining) and remaining is not None:
                return None

    def interrupt_requested(self) -> bool:
        """True once if Ctrl-C was typed since the last call; never blocks.

        Lines entered meanwhile stay buffered for `read_line`; the text typed
        before Ctrl-C on its line is dropped with it.
        """
        if not self.is_tty:
            return False
        while not self._eof and self._fill(0):
            pass
        at = self._buffer.find(bytes([INTERRUPT]))
        if at < 0:
            return False
        del self._buffer[self._buffer.rfind(b"\n", 0, at) + 1 : at + 1]
        return True


class _Ranks:
    """Rank 0's decisions, shared with every rank so all run the same steps."""

    def __init__(self, device: torch.device):
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.device = device

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def share(self, command):
        return share_from_rank_0(command)

    def share_flag(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        # A tensor on the model's device: NCCL cannot broadcast CPU tensors.
        box = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.broadcast(box, src=0)
        return bool(box.item())


def check_heartbeat(heartbeat_s, collective_timeout_s=None) -> None:
    """Raise ValueError unless `heartbeat_s` is a usable keep-alive period:
    positive and finite (0 would send keep-alives without pause, every rank
    spinning), and shorter than the collective timeout it keeps the others within.
    A `collective_timeout_s` that is no timeout at all is named first: the
    heartbeat is only measured against it."""
    check_collective_timeout(collective_timeout_s)
    if isinstance(heartbeat_s, bool) or not isinstance(heartbeat_s, (int, float)) or not math.isfinite(heartbeat_s) or heartbeat_s <= 0:
        raise ValueError(f"heartbeat_s must be a finite number of seconds > 0, got {heartbeat_s!r}")
    if collective_timeout_s is not None and heartbeat_s >= collective_timeout_s:
        raise ValueError(
            f"heartbeat_s ({heartbeat_s:g}) must be shorter than collective_timeout_s ({collective_timeout_s:g}): "
            "the other ranks wait for rank 0's keep-alive within that timeout"
        )


def check_room(conversation: Conversation, tokenizer: Tokenizer, max_seq_len: int) -> None:
    """Raise ValueError when `max_seq_len` cannot hold the shortest turn of `conversation`:
    its system prompt, if any, and a one-letter message in its chat format, and a one-token
    reply. Needs only the tokenizer, so a chat that would refuse every message is refused
    before the weights load."""
    needed = len(conversation.family.encode_dialog(tokenizer, conversation.dialog("x", turns=[]))) + 1
    if max_seq_len < needed:
        raise ValueError(
            f"max_seq_len must be at least {needed} for a chat: a one-letter message in the "
            f"{conversation.family.name} chat format{' after the system prompt' if conversation.system else ''} "
            f"and a one-token reply take {needed} tokens; got {max_seq_len}"
        )


def reply_length(max_gen_len: Optional[int], max_seq_len: int) -> int:
    """The longest reply: `max_gen_len`, or half of `max_seq_len` for None.

    Raises ValueError unless it leaves room for a message within `max_seq_len`.
    """
    if max_gen_len is None:
        max_gen_len = max_seq_len // 2
    if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or not 0 < max_gen_len < max_seq_len:
        raise ValueError(
            f"max_gen_len must be an int in [1, max_seq_len - 1] = [1, {max_seq_len - 1}], "
            f"got {max_gen_len!r}; the rest of max_seq_len holds the history"
        )
    return max_gen_len


class ChatRepl:
    """A read-reply loop over a built `Llama`; see `run_chat`."""

    def __init__(
        self,
        llama: Llama,
        system: Optional[str],
        temperature: float,
        top_p: float,
        max_gen_len: Optional[int],
        terminal: Terminal,
        heartbeat_s: float,
    ):
        self.llama = llama
        self.max_seq_len = llama.model.params.max_seq_len
        # Checked now, not at the first message after someone has typed it.
        self.max_gen_len = reply_length(max_gen_len, self.max_seq_len)
        _check_sampling(temperature, top_p)
        check_heartbeat(heartbeat_s)
        self.temperature = temperature
        self.top_p = top_p
        self.conversation = Conversation(system, llama.family)
        check_room(self.conversation, llama.tokenizer, self.max_seq_len)
        self.ranks = _Ranks(llama.device)
        self.terminal = terminal
        self.heartbeat_s = heartbeat_s
        self._prompt_shown = False

    def say(self, text: str) -> None:
        if self.ranks.is_leader:
            self.terminal.write(printable(text))

    def run(self) -> None:
        if self.conversation.system:
            self.say(f"[system prompt: {self.conversation.system}]\n")
        self.say(HELP + "\n")
        while True:
            kind, text = self.ranks.share(self._read_command() if self.ranks.is_leader else None)
            if kind == "exit":
                self.say("[bye]\n")
                return
            if kind == "reset":
                self.conversation.reset()
                self.say("[history cleared]\n")
            elif kind == "message":
                self.answer(text)

    def _read_command(self) -> Tuple[str, Optional[str]]:
        """Rank 0: the next command for all ranks: exit, reset, message, or idle."""
        while True:
            if not self._prompt_shown:
                self.say(PROMPT)
                self._prompt_shown = True
            try:
                # The other ranks wait in a collective meanwhile; an "idle"
                # command now and then keeps it within its timeout.
                line = self.terminal.read_line(self.heartbeat_s if self.ranks.world_size > 1 else None)
            except EOFError:
                self.say("\n")
                return "exit", None
            except KeyboardInterrupt:
                self.say("\n")
                self._prompt_shown = False
                continue
            if line is None:
                return "idle", None
            self._prompt_shown = False
            text = line.strip()
            if text == "/exit":
                return "exit", None
            if text == "/reset":
                return "reset", None
            if text.startswith("/"):
                self.say(f"[unknown command {text.split()[0]!r}] {HELP}\n")
            elif text and self.llama.family.refuses([{"role": "user", "content": text}]):
                self.say("[not sent: a message may not hold the chat format's tags ([INST], <<SYS>>, ...)]\n")
            elif text:
                return "message", text

    def answer(self, message: str) -> None:
        """Stream the reply to `message` on every rank; rank 0 may stop it with Ctrl-C."""
        try:
            dialog, dropped, reply_len = self.conversation.fit(
                self.llama.tokenizer, message, self.max_seq_len, self.max_gen_len
            )
        except MessageTooLong as e:
            self.say(f"[{e}]\n")
            return
        if dropped:
            self.say(
                f"[history too long for max_seq_len {self.max_seq_len}: "
                f"dropped the oldest {dropped} turn{'s' if dropped > 1 else ''}]\n"
            )
        if reply_len < self.max_gen_len:
            self.say(f"[the reply is cut at {reply_len} tokens to fit max_seq_len {self.max_seq_len}]\n")

        # The tags this family's guard refuses (Llama 2's [INST], <<SYS>>, ...):
        # a reply holding one would make every later turn refused.
        turn_end = TurnEnd(
            [tag for tag in SPECIAL_TAGS if self.llama.family.refuses([{"role": "assistant", "content": tag}])]
        )
        stopped = False
        stream = self.llama.stream_chat_completion(
            dialog, temperature=self.temperature, top_p=self.top_p, max_gen_len=reply_len
        )
        try:
            for piece in stream:
                self.say(turn_end.push(piece))
                # Every rank asks after every token, so all stop after the same
                # one. Each rank sees the same text, so a cut is the same on all.
                stop = self.ranks.is_leader and self.terminal.interrupt_requested()
                if self.ranks.share_flag(stop or turn_end.cut):
                    stopped = not turn_end.cut
                    break
        except FloatingPointError as e:
            # Non-finite logits: the step returned nothing and the Llama still works
            # (docs/reliability.md). The logits are gathered, so every rank raised at this
            # same step and all go on to the next command together.
            self.say(f"\n[error: {one_line(str(e))}; this turn is not kept]\n")
            return
        finally:
            stream.close()
        # Text held back as a possible tag is not one: show it, stopped or not.
        self.say(turn_end.flush())
        if turn_end.cut:
            self.say("\n[the reply went on into a turn of its own; cut there]\n")
        else:
            self.say("\n[stopped]\n" if stopped else "\n")
        # A stopped reply stays as far as it was shown: the next turn sees what the person saw.
        self.conversation.add(message, turn_end.kept)


def run_chat(
    llama: Llama,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = None,
    input_fd: Optional[int] = None,
    output: Optional[TextIO] = None,
    heartbeat_s: float = 60.0,
) -> None:
    """Chat with `llama` until /exit or the end of the input, on every rank at once.

    Rank 0 reads lines from `input_fd` (stdin) and prints to `output`
    (stdout); all ranks must call this with the same arguments. Replies are
    at most `max_gen_len` tokens (default: half of `max_seq_len`); the
    oldest turns are dropped when the history and a reply would pass
    `max_seq_len`. Raises ValueError for a bad `max_gen_len`, temperature
    or top_p or heartbeat_s, a system prompt holding the format's tags, or a
    `max_seq_len` too short for any turn (see `check_room`).
    """
    terminal = Terminal(sys.stdin.fileno() if input_fd is None else input_fd, output or sys.stdout)
    repl = ChatRepl(llama, system, temperature, top_p, max_gen_len, terminal, heartbeat_s)
    with terminal if repl.ranks.is_leader else nullcontext():
        repl.run()

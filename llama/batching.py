"""Continuous batching: the requests of a server decoded together on one `Llama`.

`Llama.generate` is the reference's loop: a batch starts together and its
rows wait for the longest. Here each request holds one row of the KV cache
from its prompt to its last token, joins the running batch at the next step
boundary and leaves it when done, so a new request never waits for the
longest one in flight. Every step runs one token of each request in flight,
each at its own position. Prompts come first: the requests admitted at a step
boundary get their prompts in a forward of their own, and the step follows,
with the prompts admitted meanwhile in the same forward
(`DecodeStep.prompts_and_rows`: on the CPU one C call, every token a row of
its own, the weights read once for all; elsewhere each prompt as `generate`
runs a batch of one, then the step). Requests that arrive during a step get
their prompts in a forward of their own before that step's draws.

Each request samples from its own generator, seeded by its `seed`. On the
C step the products give every row the sums it would get alone, so a seeded
request gets the same tokens whatever else is in flight, and a request
served alone gets `text_completion`'s tokens for the same seed.

Under torchrun, rank 0 runs the engine (`Engine.run`) and sends every
forward it makes to the other ranks, which make it too (`Engine.follow`):
the collectives of model parallelism stay in step, and only rank 0 samples.
"""

import itertools
import threading
from collections import deque
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from llama.distributed import is_collective_failure, share_from_rank_0
from llama.generation import Llama
from llama.sampling import sample_next_token
from llama.tokenizer import IncrementalDecoder


class TokenLogprob(NamedTuple):
    """A generated token's log-probability (of the model's logits, before temperature),
    and the most likely tokens at its position, with theirs."""

    token: int
    logprob: float
    top: List[Tuple[int, float]]


class Event(NamedTuple):
    """What the engine tells a request's sink, from the engine's thread: new text (maybe
    "", for a token that ends no character yet), then once a `finish_reason` ("stop" or
    "length"), or instead an `error`."""

    text: str = ""
    tokens: Tuple[int, ...] = ()
    logprobs: Tuple[TokenLogprob, ...] = ()
    finish_reason: Optional[str] = None
    error: Optional[str] = None


class Request:
    """One completion to run: prompt token ids and how to sample them.

    `max_tokens` new tokens at most; it stops early at one of `stop_tokens`
    (not shown) or at the first of `stop_texts` in the text (which is cut
    before it). `seed` None: the engine's next seed. `top_logprobs` None: no
    log-probabilities; else that many alternatives per token (0 for the
    token's own only). `sink` gets each `Event`, from the engine's thread.
    """

    def __init__(
        self,
        prompt_tokens: Sequence[int],
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop_tokens: Sequence[int],
        sink: Callable[[Event], None],
        seed: Optional[int] = None,
        stop_texts: Sequence[str] = (),
        top_logprobs: Optional[int] = None,
    ):
        self.prompt_tokens = [int(t) for t in prompt_tokens]
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.stop_tokens = frozenset(stop_tokens)
        self.sink = sink
        self.seed = seed
        self.stop_texts = [s for s in stop_texts if s]
        self.top_logprobs = top_logprobs
        self.cancelled = False


class _Row:
    """A request in flight: its cache row, its position and its text so far."""

    def __init__(self, request: Request, cache_row: int, tokenizer):
        self.request = request
        self.cache_row = cache_row
        self.generator = torch.Generator().manual_seed(request.seed)
        self.decoder = IncrementalDecoder(tokenizer)
        self.generated = 0
        self.last_token: Optional[int] = None
        self.held = ""  # text that could be the start of a stop text: shown once it is not
        self.done = False

    @property
    def position(self) -> int:
        """Where the last sampled token goes in the cache."""
        return len(self.request.prompt_tokens) + self.generated - 1

    def finish(self, reason: str, text: str = "", event: Optional[Event] = None) -> None:
        text += self.decoder.flush()
        text, _ = self._release(text, final=True)
        base = event or Event()
        self.request.sink(base._replace(text=base.text + text, finish_reason=reason))
        self.done = True

    def _release(self, text: str, final: bool) -> Tuple[str, bool]:
        """The text that can be shown now, and whether a stop text ended it."""
        held = self.held + text
        stops = [(held.find(s), s) for s in self.request.stop_texts if s in held]
        if stops:
            self.held = ""
            return held[: min(stops)[0]], True
        keep = 0
        if not final:
            for stop in self.request.stop_texts:
                for n in range(min(len(stop) - 1, len(held)), keep, -1):
                    if held.endswith(stop[:n]):
                        keep = n
                        break
        self.held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def accept(self, token: int, logprob: Optional[TokenLogprob], max_seq_len: int) -> None:
        """Take the token sampled at `position + 1`: tell the sink, and finish where due."""
        self.generated += 1
        self.last_token = token
        request = self.request
        if token in request.stop_tokens:
            self.finish("stop")
            return
        event = Event(tokens=(token,), logprobs=(logprob,) if logprob is not None else ())
        text, stopped = self._release(self.decoder.push(token), final=False)
        if stopped:
            self.request.sink(event._replace(text=text, finish_reason="stop"))
            self.done = True
        elif self.generated >= request.max_tokens or self.position + 1 >= max_seq_len:
            self.finish("length", event=event._replace(text=text))
        else:
            request.sink(event._replace(text=text))


class Engine:
    """Runs the requests given to `submit` on `llama`, up to its `max_batch_size` at a time.

    `run` (rank 0's thread) steps until `stop`; `follow` is the other ranks'
    part. `seed` starts the seeds of requests that bring none: the first such
    request gets `seed` (as `Llama.build(seed=...)` seeds the first
    `text_completion`), the next seed + 1, and so on. With more than one rank,
    an idle rank 0 wakes the others every `heartbeat_s` seconds, within their
    collective timeout.
    """

    def __init__(self, llama: Llama, seed: int = 1, heartbeat_s: float = 60.0):
        self.llama = llama
        self.step = llama.step
        self.capacity = llama.model.params.max_batch_size
        self.max_seq_len = llama.model.params.max_seq_len
        self.device = llama.device
        self.heartbeat_s = heartbeat_s
        self._seeds = itertools.count(seed)
        self._changed = threading.Condition()
        self._waiting: Deque[Request] = deque()
        self._rows: Dict[int, _Row] = {}  # cache row -> request in flight
        self._stopping = False
        self._several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # What /health reports: decode steps run, the most rows one step has run, and
        # the requests dropped in flight because their client left.
        self.steps = 0
        self.largest_batch = 0
        self.dropped = 0

    # -- any thread ------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue `request`; it joins the batch at the next step boundary with a free row."""
        with self._changed:
            if self._stopping:
                raise RuntimeError("the engine has stopped")
            if request.seed is None:
                request.seed = next(self._seeds)
            self._waiting.append(request)
            self._changed.notify_all()

    def cancel(self, request: Request) -> None:
        """Drop `request` at the next step boundary (its client left); its row is freed then."""
        with self._changed:
            request.cancelled = True
            self._changed.notify_all()

    def stop(self) -> None:
        """End `run` once the requests in flight are done with (the HTTP side cancels them)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def in_flight(self) -> int:
        """Requests running or waiting for a row."""
        with self._changed:
            return sum(not row.done for row in self._rows.values()) + len(self._waiting)

    # -- rank 0 ----------------------------------------------------------------------------

    def run(self) -> None:
        """Rank 0: admit, run prompts and steps, until `stop`; then release the other ranks.

        Prompts first: requests admitted while others are in flight have their prompts run in a
        forward of their own, their first tokens drawn at once, and the requests in flight step
        in the next forward, with the prompts admitted meanwhile riding in it. So the rows in
        flight wait for at most one forward of prompts before each step (and the prompts that
        arrive during the step, before its draws); a new request waits for the forward under way
        and its own, without the rows' work in it. Figures in benchmarks/NOTES.md."""
        prompts_alone = False  # whether the last forward was prompts only, the rows waiting
        with torch.inference_mode():
            while True:
                admitted = self._next_admissions()
                if admitted is None:
                    share_from_rank_0(("stop",))
                    return
                rows = [row for row in self._rows.values() if row.last_token is not None and not row.done]
                prompts_alone = bool(admitted and rows) and not prompts_alone
                self._step(admitted, [] if prompts_alone else rows)
                self._drop_done()

    def _next_admissions(self, mid_step: bool = False) -> Optional[List[_Row]]:
        """The waiting requests that get a row now; waits while there is nothing to do.
        None once stopped with nothing in flight. `mid_step`: between a step and its draws,
        whose rows keep their cache rows even if their client left (they go at the next call)."""
        with self._changed:
            while True:
                for cache_row, row in list(self._rows.items()):
                    if row.request.cancelled and not mid_step:
                        del self._rows[cache_row]
                        self.dropped += not row.done
                self._waiting = deque(r for r in self._waiting if not r.cancelled)
                free = [r for r in range(self.capacity) if r not in self._rows]
                admitted = []
                while self._waiting and free:
                    row = _Row(self._waiting.popleft(), free.pop(0), self.llama.tokenizer)
                    self._rows[row.cache_row] = row
                    admitted.append(row)
                if admitted or self._rows:
                    return admitted
                if self._stopping:
                    return None
                if not self._changed.wait(self.heartbeat_s if self._several else None):
                    share_from_rank_0(("idle",))

    def _drop_done(self) -> None:
        with self._changed:
            for cache_row, row in list(self._rows.items()):
                if row.done:
                    del self._rows[cache_row]

    def _step(self, admitted: List[_Row], rows: List[_Row]) -> None:
        """One forward: the prompts of `admitted`, each of which draws its first token, and one
        token of each of `rows` (requests in flight, each at its own position).

        On the C step that is one pass over the weights for all of them (`prompts_and_rows`), so
        prompts that ride in a step cost the requests in flight less than a forward of their own.
        Each row is computed as it would be alone, so every request's tokens are those it gets
        alone."""
        if not admitted and not rows:
            return
        command = ("step", [row.request.prompt_tokens for row in admitted], [row.cache_row for row in admitted],
                   [row.last_token for row in rows], [row.position for row in rows], [row.cache_row for row in rows])
        try:
            prompt_logits, row_logits = self._forward(command)
        except Exception as error:  # noqa: BLE001: the requests fail, the engine goes on
            if len(admitted) + min(len(rows), 1) > 1 and not is_collective_failure(error):
                # One bad prompt must not fail the others: each prompt, then the step, on its own
                # (what ran before the error is run again, to the same values).
                for row in admitted:
                    self._step([row], [])
                self._step([], rows)
                return
            for row in admitted + rows:
                self._fail(row, error)
            return
        # The prompts' first tokens at once; then, where this forward stepped the requests in flight,
        # the prompts of the requests that arrived during it (prompts before draws: a forward of
        # their own now, not a wait for this step's draws and the next forward), then the step's
        # tokens. One such forward a step: arrivals during it join the next step's forward, so
        # a stream of arrivals never holds the step's draws back for more than one prompt.
        self._draw_all(admitted, [prompt_logits[i : i + 1] for i in range(len(admitted))])
        if rows:
            self.steps += 1
            self.largest_batch = max(self.largest_batch, len(rows))
            late = self._next_admissions(mid_step=True)
            if late:
                self._step(late, [])
            self._draw_all(rows, [row_logits[i : i + 1] for i in range(len(rows))])

    def _draw_all(self, rows: List[_Row], logits: List[torch.Tensor]) -> None:
        """Each row's token from its logits (1, vocab), given to it in order.

        One row after another on this thread: since a draw sorts only what it keeps (~0.2 ms at a
        32000-token vocabulary), two threads draw a step's rows slower than one (benchmarks/NOTES.md)."""
        for row, row_logits in zip(rows, logits):
            self._take(row, row_logits)

    def _take(self, row: _Row, logits: torch.Tensor) -> None:
        """Draw the row's token from its logits (1, vocab) and give it to the row, or fail the row."""
        request = row.request
        try:
            token, nonfinite = _draw(row, logits)
            if nonfinite:
                # Its cache row may hold NaN: cleared, or the eager step's masked attention
                # over a longer row would carry it into another request (0 x NaN).
                self._forward(("clear", row.cache_row))
                raise FloatingPointError(
                    f"the model's logits are not finite at position {row.position + 1}: the weights "
                    "or the activations overflowed"
                )
            logprob = None
            if request.top_logprobs is not None:
                logprob = _token_logprob(logits[0], token, request.top_logprobs)
            row.accept(token, logprob, self.max_seq_len)
        except Exception as error:  # noqa: BLE001
            self._fail(row, error)

    def _fail(self, row: _Row, error: BaseException) -> None:
        if is_collective_failure(error):
            raise error  # a lost rank ends the server (llama/serve.py), not one request
        row.done = True
        row.request.sink(Event(error=f"{type(error).__name__}: {error}"))

    def _forward(self, command):
        """Run `command` here and on every other rank; the logits where it has some."""
        share_from_rank_0(command)
        return self._run(command)

    def _run(self, command) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """One command of `_forward`: for a step, its prompts' last logits (prompts, vocab) and its
        rows' (bsz, vocab); else None."""
        kind, device = command[0], self.device

        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        if kind == "step":
            _, prompts, prompt_rows, tokens, positions, cache_rows = command
            prompt_logits, row_logits = self.step.prompts_and_rows(
                [(tensor(prompt), row) for prompt, row in zip(prompts, prompt_rows)],
                tensor(tokens), tensor(positions), tensor(cache_rows))
            return prompt_logits.float(), row_logits.float()
        if kind == "clear":
            self.llama.model.clear_cache_row(command[1])
        return None  # "idle"

    # -- ranks 1 .. ------------------------------------------------------------------------

    def follow(self) -> None:
        """Ranks other than 0: run rank 0's forwards until it stops."""
        with torch.inference_mode():
            while True:
                command = share_from_rank_0(None)
                if command[0] == "stop":
                    return
                try:
                    self._run(command)
                except (ValueError, IndexError, FloatingPointError):
                    pass  # rank 0 met the same error on the same input, and tells its client


def _draw(row: _Row, logits: torch.Tensor) -> Tuple[int, bool]:
    """(token, whether the logits were not finite) sampled from `logits` (1, vocab) with the
    row's generator. Touches nothing but the row's generator."""
    request = row.request
    token, nonfinite = sample_next_token(logits, request.temperature, request.top_p, row.generator)
    return int(token[0]), bool(nonfinite[0])


def _token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives: List[Tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(logprobs, top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)

"""The server's engine (llama/batching.py) without HTTP: rows at their own positions,
seeds, more requests than rows, a client that leaves, a request whose logits break."""

import contextlib
import threading
import time

import pytest
import torch

from llama import Llama
from llama.batching import Engine, Request


@pytest.fixture(scope="module")
def llama(tiny_ckpt):
    """A Llama of the engine's own (it uses the KV cache), built as the `generator` reference is."""
    return Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=8,
                       device="cpu")


@contextlib.contextmanager
def running(engine):
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    try:
        yield engine
    finally:
        engine.stop()
        thread.join(30)
        assert not thread.is_alive()


class Collect:
    """A request's sink: its text and how it ended."""

    def __init__(self):
        self.pieces, self.tokens, self.reason, self.error = [], [], None, None
        self.ended = threading.Event()

    def __call__(self, event):
        self.pieces.append(event.text)
        self.tokens += event.tokens
        if event.error is not None or event.finish_reason is not None:
            self.reason, self.error = event.finish_reason, event.error
            self.ended.set()

    @property
    def text(self):
        return "".join(self.pieces)


def submit(engine, llama, prompt, max_tokens=30, temperature=0.8, top_p=0.9, seed=None, stop=()):
    sink = Collect()
    request = Request(llama.tokenizer.encode(prompt, bos=True, eos=False), max_tokens, temperature, top_p,
                      llama.stop_tokens, sink, seed=seed, stop_texts=stop)
    engine.submit(request)
    return request, sink


def reference(generator, prompt, seed, max_tokens=30, temperature=0.8, top_p=0.9):
    torch.manual_seed(seed)
    return generator.text_completion([prompt], temperature=temperature, top_p=top_p, max_gen_len=max_tokens)[0][
        "generation"]


PROMPTS = ["The llama café", "Hello", "Once upon a time there was", "a", "Numbers: 1 2 3", "x y z", "Why", "Tell me",
           "the river", "good morning", "ok", "zzz"]


def test_rows_at_their_own_positions_equal_each_row_alone(llama):
    # The eager forward with a position and a cache row per row (the server's step on
    # CUDA and across ranks) against each row run alone at its row and position.
    model = llama.model
    torch.manual_seed(0)
    prompts = {5: [1, 7, 9, 11, 13], 2: [1, 3], 6: [1, 4, 4, 8, 2, 9, 10, 11]}
    with torch.inference_mode():
        for row, tokens in prompts.items():
            model.forward(torch.tensor([tokens]), 0, cache_rows=slice(row, row + 1))
        rows = torch.tensor(list(prompts))
        positions = torch.tensor([len(t) for t in prompts.values()])
        nexts = torch.tensor([21, 22, 23])
        together = model.forward(nexts[:, None], positions, cache_rows=rows)[:, 0]
        for i, (row, tokens) in enumerate(prompts.items()):
            alone = model.forward(torch.tensor([tokens + [int(nexts[i])]]), 0)[0, -1]
            torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="one token a row"):
            model.forward(torch.tensor([[1, 2]]), torch.tensor([3]), cache_rows=rows[:1])


def test_requests_without_a_seed_take_the_engines_seeds_in_turn(llama, generator):
    engine = Engine(llama, seed=7)
    with running(engine):
        for seed, prompt in [(7, "Hello"), (8, "the river")]:
            _, sink = submit(engine, llama, prompt)
            assert sink.ended.wait(30)
            assert sink.text == reference(generator, prompt, seed)


def test_more_requests_than_rows_each_as_alone(llama, generator):
    engine = Engine(llama)
    with running(engine):
        sinks = [submit(engine, llama, p, max_tokens=20 + 5 * i, seed=100 + i)[1] for i, p in enumerate(PROMPTS)]
        for sink in sinks:
            assert sink.ended.wait(60) and sink.error is None
    assert engine.largest_batch == 8  # the cache's rows, all used and no more
    for i, (prompt, sink) in enumerate(zip(PROMPTS, sinks)):
        assert sink.text == reference(generator, prompt, 100 + i, max_tokens=20 + 5 * i), prompt
        assert sink.reason in ("stop", "length")
        assert len(sink.tokens) <= 20 + 5 * i


def test_greedy_and_sampled_rows_mix(llama, generator):
    engine = Engine(llama)
    with running(engine):
        greedy = submit(engine, llama, "Why", temperature=0, seed=1)[1]
        sampled = submit(engine, llama, "Tell me", temperature=1.0, top_p=1.0, seed=2)[1]
        assert greedy.ended.wait(30) and sampled.ended.wait(30)
    assert greedy.text == reference(generator, "Why", 1, temperature=0)
    assert sampled.text == reference(generator, "Tell me", 2, temperature=1.0, top_p=1.0)


class SlowSteps:
    """The engine's decode step, 20 ms slower: long enough to act between two steps."""

    def __init__(self, llama, fail_row=None):
        self.step, self.fail_row = llama.step, fail_row

    def __getattr__(self, name):
        return getattr(self.step, name)

    def prompts_and_rows(self, prompts, tokens, positions, cache_rows):
        time.sleep(0.02)
        prompt_logits, logits = self.step.prompts_and_rows(prompts, tokens, positions, cache_rows)
        if self.fail_row is not None:
            logits[cache_rows == self.fail_row] = float("nan")
        return prompt_logits, logits


def test_a_cancelled_request_leaves_at_the_next_step(llama, generator):
    engine = Engine(llama)
    engine.step = SlowSteps(llama)
    with running(engine):
        gone, gone_sink = submit(engine, llama, "Hello", max_tokens=90, seed=3)
        stays, stays_sink = submit(engine, llama, "Why", max_tokens=40, seed=4)
        while len(gone_sink.tokens) < 3:
            time.sleep(0.005)
        engine.cancel(gone)
        deadline = time.monotonic() + 10
        while engine.dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.dropped == 1
        emitted = len(gone_sink.tokens)
        assert stays_sink.ended.wait(30)
        assert engine.in_flight() == 0
    assert emitted < 90 and len(gone_sink.tokens) <= emitted + 1 and not gone_sink.ended.is_set()
    assert stays_sink.text == reference(generator, "Why", 4, max_tokens=40)


def test_broken_logits_fail_their_request_only(llama, generator):
    engine = Engine(llama)
    engine.step = SlowSteps(llama, fail_row=1)
    with running(engine):
        fine = submit(engine, llama, "Hello", seed=5)[1]
        broken = submit(engine, llama, "Why", seed=6)[1]  # the second row taken: cache row 1
        assert fine.ended.wait(30) and broken.ended.wait(30)
    assert broken.error is not None and "not finite" in broken.error
    assert fine.error is None and fine.text == reference(generator, "Hello", 5)
    for layer in llama.model.layers:  # its row is cleared, for the next request there
        assert not layer.attention.cache_k[1].any()


def test_stop_texts_cut_the_text_and_are_never_shown(llama, generator):
    full = reference(generator, "Tell me", 9, max_tokens=40)
    stop = full[12:15]
    engine = Engine(llama)
    with running(engine):
        _, sink = submit(engine, llama, "Tell me", max_tokens=40, seed=9, stop=["@@never@@", stop])
        assert sink.ended.wait(30)
    assert sink.text == full[: full.index(stop)] and sink.reason == "stop"
    assert all(stop not in "".join(sink.pieces[: i + 1]) for i in range(len(sink.pieces)))


def test_prompts_run_first_then_the_step_with_the_prompts_admitted_meanwhile(llama, generator):
    """Requests admitted while others are in flight get their prompts in a forward of their own,
    first; the step of the requests in flight comes next, and the prompts admitted during that
    forward of prompts share it (one pass over the weights): the rows wait for one forward of
    prompts at most. A request submitted while a step runs gets its prompt in a forward of its own
    right after, before that step's draws. Every request's tokens are still its tokens alone."""
    from llama import batching

    engine = Engine(llama)
    forwards, late, draws = [], [], []
    real_run, real_draw = engine._run, batching._draw
    asked = [("Hello", 2, 3), ("The llama café", 3, 4), ("Why", 4, 5), ("Once", 5, 2)]

    def run(command):
        if command[0] == "step":
            forwards.append((len(command[1]), len(command[3])))  # (prompts, rows of the step)
            if len(forwards) == 1:  # during the first request's prompt: two at once
                late.extend(submit(engine, llama, p, max_tokens=n, seed=s) for p, s, n in asked[:2])
            if len(forwards) == 2:  # during the forward of those two prompts alone
                late.append(submit(engine, llama, asked[2][0], max_tokens=asked[2][2], seed=asked[2][1]))
            if len(forwards) == 3:  # during the step of the three, which the fourth prompt shares
                late.append(submit(engine, llama, asked[3][0], max_tokens=asked[3][2], seed=asked[3][1]))
        return real_run(command)

    def draw(row, logits):
        draws.append((len(forwards), row.request.seed))
        return real_draw(row, logits)

    engine._run = run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batching, "_draw", draw)
        with running(engine):
            first = submit(engine, llama, "Once upon a time there was", max_tokens=10, seed=1)
            for _, sink in [first] + late:
                assert sink.ended.wait(30)
    assert forwards[:5] == [(1, 0), (2, 0), (1, 3), (1, 0), (0, 5)], forwards
    # The prompt that rode in the step drew its first token at once; the one that came during
    # the step drew its first before that step's tokens of the three.
    assert [seed for n, seed in draws if n == 3] == [4], draws
    assert [seed for n, seed in draws if n == 4] == [5, 1, 2, 3], draws
    assert first[1].text == reference(generator, "Once upon a time there was", 1, max_tokens=10)
    for (_, sink), (prompt, seed, n) in zip(late, asked):
        assert sink.text == reference(generator, prompt, seed, max_tokens=n)


def test_a_bad_prompt_fails_alone_when_it_shares_a_forward(llama, generator):
    """A prompt the forward refuses (a token outside the vocabulary) fails its own request only:
    the prompts and the step that shared its forward run again on their own."""
    engine = Engine(llama)
    forwards, late = [], []
    real_run = engine._run
    vocab = llama.model.params.vocab_size

    def run(command):
        if command[0] == "step":
            forwards.append((len(command[1]), len(command[3])))
            if len(forwards) == 1:  # during the first prompt: a prompt, which runs alone next
                late.append(submit(engine, llama, "Why", max_tokens=3, seed=3))
            if len(forwards) == 2:  # during that prompt alone: both share the next forward, the step's
                bad = Request([1, 5, vocab + 7], 3, 0.8, 0.9, llama.stop_tokens, Collect(), seed=9)
                engine.submit(bad)
                late.append((bad, bad.sink))
                late.append(submit(engine, llama, "Hello", max_tokens=3, seed=2))
        return real_run(command)

    engine._run = run
    with running(engine):
        first = submit(engine, llama, "Once upon a time there was", max_tokens=8, seed=1)
        for _, sink in [first] + late:
            assert sink.ended.wait(30)
    assert forwards[1:6] == [(1, 0), (2, 2), (1, 0), (1, 0), (0, 2)], forwards  # it raised; then each part alone
    assert "outside the vocabulary" in late[1][1].error and late[1][1].tokens == []
    assert late[0][1].error is None and late[0][1].text == reference(generator, "Why", 3, max_tokens=3)
    assert late[2][1].error is None and late[2][1].text == reference(generator, "Hello", 2, max_tokens=3)
    assert first[1].text == reference(generator, "Once upon a time there was", 1, max_tokens=8)

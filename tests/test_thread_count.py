"""llama.native.ThreadCount: the C step's thread count, chosen from its own step times.

Driven here by step times made up for each count (a machine whose cores are free, then
taken, then free again), so that what it chooses is exact and fast to check."""

from llama.native import ThreadCount


def run(chooser: ThreadCount, seconds_at, steps: int):
    """`steps` steps whose time on n threads is seconds_at(n); the counts chosen, in order."""
    counts = []
    for _ in range(steps):
        count = chooser.choose()
        counts.append(count)
        chooser.record(count, seconds_at(count))
    return counts


IDLE = {1: 0.030, 2: 0.018}.get  # a 100M model: two threads are faster while both cores are free
BUSY = {1: 0.060, 2: 0.400}.get  # the cores taken: two threads wait for each other at every product


def test_on_a_free_machine_it_keeps_every_thread_and_tries_fewer_rarely():
    chooser = ThreadCount(2)
    counts = run(chooser, IDLE, 2000)
    assert chooser.current == 2
    tries = [step for step, count in enumerate(counts) if count == 1]
    # Tried after four steps, then each time the steps since have taken the patience x its 30 ms,
    # the patience doubling after each try (20, 40, ... x 30 ms), or the longest wait, 2 s of steps.
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert tries[0] == 4 and gaps == sorted(gaps)
    assert len(tries) <= 4 + 2000 * 0.018 / chooser.longest_wait
    slower = sum(IDLE(c) for c in counts) / (2000 * IDLE(2))
    assert slower < 1.01  # what trying costs: 3.5% with a patience that stays at 10


def test_the_first_steps_pay_little_for_the_tries():
    """A short generation (32 tokens) tries one thread once or twice, not every 17 steps."""
    chooser = ThreadCount(2)
    counts = run(chooser, IDLE, 64)
    assert counts.count(1) <= 2


def test_after_many_calm_steps_a_slowdown_is_still_noticed_within_a_few_steps():
    """The doubled patience is forgotten once the steps slow down: the machine has changed."""
    chooser = ThreadCount(2)
    run(chooser, IDLE, 5000)
    assert chooser._patience  # doubled by the tries that did not move
    for step in range(40):
        run(chooser, BUSY, 1)
        if chooser.current == 1:
            break
    assert chooser.current == 1 and step <= 12


def test_when_the_cores_are_taken_it_moves_to_one_thread_within_a_few_steps():
    chooser = ThreadCount(2)
    run(chooser, IDLE, 100)
    moved_at = None
    for step in range(200):
        run(chooser, BUSY, 1)
        if chooser.current == 1 and moved_at is None:
            moved_at = step
    # Within a few steps: once the recent steps' median shows the load (it held idle steps before).
    assert moved_at is not None and moved_at <= 12 and chooser.current == 1
    # After the move, two threads are tried again only after the longest wait's seconds of steps.
    counts = run(chooser, BUSY, 200)
    assert counts.count(2) <= 1 + int(sum(BUSY(c) for c in counts) / chooser.longest_wait)


def test_when_the_cores_are_free_again_it_returns_to_every_thread():
    chooser = ThreadCount(2)
    run(chooser, BUSY, 100)
    assert chooser.current == 1
    run(chooser, IDLE, int(chooser.longest_wait / IDLE(1)) + 10)  # the longest wait, and a little more
    assert chooser.current == 2


def test_noise_of_less_than_the_margin_does_not_move_it():
    chooser = ThreadCount(2)
    run(chooser, {1: 0.019, 2: 0.020}.get, 5000)  # 5% apart: under the 20% it asks for
    assert chooser.current == 2


def test_more_threads_step_by_halves():
    chooser = ThreadCount(8)
    busy = {8: 1.0, 4: 0.05, 2: 0.03, 1: 0.04}.get
    run(chooser, busy, 400)
    assert chooser.current == 2  # 8 -> 4 -> 2; one is slower again


def test_one_thread_has_nothing_to_try():
    chooser = ThreadCount(1)
    assert set(run(chooser, {1: 0.01}.get, 100)) == {1}

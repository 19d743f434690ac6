"""`sample_top_p` draws what Meta's reference draws: the same tokens from the same generator state.

On the CPU it sorts only as far as the cut and reads the token from the drawn value
(llama/sampling.py); these tests hold it to the reference's steps, written
out here as Meta wrote them, for single rows, batches, equal probabilities
(where only torch.sort's order decides the token) and generators of its own.
"""

import pytest
import torch

from llama.generation import sample_next_token, sample_top_p


def meta_sample_top_p(probs, p, generator=None):
    # Meta's llama/generation.py, with the generator made explicit.
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def probabilities(seed, bsz, vocab, scale, ties):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(bsz, vocab, generator=gen) * scale
    if ties:
        # Round the logits so that many tokens share a probability exactly.
        logits = (logits * 4).round() / 4
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("bsz", [1, 3])
@pytest.mark.parametrize("p", [0.5, 0.9, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_same_tokens_as_the_reference(bsz, p, ties):
    for seed in range(40):
        probs = probabilities(seed, bsz, 2000, 3.0 if seed % 2 else 1.0, ties)
        ours = sample_top_p(probs.clone(), p, torch.Generator().manual_seed(seed))
        theirs = meta_sample_top_p(probs.clone(), p, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, theirs), (seed, ours.flatten().tolist(), theirs.flatten().tolist())


def test_ties_at_the_drawn_position_follow_torch_sort():
    # Every probability equal: the drawn value is held by all tokens, so each
    # token comes from torch.sort's order, as in the reference.
    probs = torch.full((2, 300), 1 / 300)
    for seed in range(20):
        ours = sample_top_p(probs.clone(), 1.0, torch.Generator().manual_seed(seed))
        theirs = meta_sample_top_p(probs.clone(), 1.0, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, theirs)


def test_default_generator_and_its_state_after():
    probs = probabilities(7, 2, 5000, 2.0, False)
    torch.manual_seed(3)
    ours = [sample_top_p(probs.clone(), 0.9) for _ in range(5)]
    after_ours = torch.rand(4)
    torch.manual_seed(3)
    theirs = [meta_sample_top_p(probs.clone(), 0.9) for _ in range(5)]
    after_theirs = torch.rand(4)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert torch.equal(after_ours, after_theirs)  # the same random numbers were used up


def test_the_input_is_left_as_it_was():
    probs = probabilities(1, 2, 1000, 2.0, False)
    before = probs.clone()
    sample_top_p(probs, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(probs, before)


def test_sample_next_token_takes_a_generator():
    logits = torch.randn(2, 500, generator=torch.Generator().manual_seed(0))
    a, _ = sample_next_token(logits, 0.8, 0.9, torch.Generator().manual_seed(5))
    b, _ = sample_next_token(logits, 0.8, 0.9, torch.Generator().manual_seed(5))
    theirs = meta_sample_top_p(torch.softmax(logits / 0.8, dim=-1), 0.9, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a, theirs.reshape(-1))


@pytest.mark.parametrize("vocab", [32000, 128256])
def test_exponential_draws_are_torchs_where_read_and_leave_the_same_generator_state(vocab):
    # _exponential_draws skips the draws past each row's last kept token, which only meet zeros,
    # and advances the generator over them: what it returns must be exponential_'s numbers up to
    # there, and the generator must end where exponential_ leaves it, at Llama 2's and Llama 3's
    # vocabulary sizes and for rows of several lengths.
    from llama.sampling import _exponential_draws

    lengths = [5, vocab // 2, vocab, 1]
    for seed in range(3):
        ours_gen, torch_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        ours = _exponential_draws(lengths, vocab, ours_gen)
        theirs = torch.empty(len(lengths), vocab).exponential_(1, generator=torch_gen)
        for row, length in enumerate(lengths):
            assert torch.equal(ours[row], theirs[row, :length]), row
        assert torch.equal(ours_gen.get_state(), torch_gen.get_state())


def test_same_tokens_as_the_reference_at_llama3s_vocabulary():
    for seed in range(6):
        probs = probabilities(seed, 2, 128256, 3.0, False)
        ours = sample_top_p(probs.clone(), 0.9, torch.Generator().manual_seed(seed))
        theirs = meta_sample_top_p(probs.clone(), 0.9, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, theirs)


def test_where_skipping_is_not_exact_every_position_is_drawn(monkeypatch):
    # The fallback for a torch whose generator would not give the skipped draws back: the same
    # tokens and the same generator state as Meta's steps, from drawing every position.
    from llama import sampling

    monkeypatch.setitem(sampling._SKIPPING_EXACT, 3000, False)
    probs = probabilities(4, 2, 3000, 3.0, False)
    ours_gen, their_gen = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(5):
        ours = sample_top_p(probs.clone(), 0.9, ours_gen)
        theirs = meta_sample_top_p(probs.clone(), 0.9, their_gen)
        assert torch.equal(ours, theirs)
    assert torch.equal(ours_gen.get_state(), their_gen.get_state())


@pytest.mark.parametrize("ties", [False, True])
def test_rows_sorted_only_up_to_their_cut_draw_the_reference_tokens(ties):
    # Peaked rows, as a trained model's mostly are, keep few tokens: `_sorted_prefix` sorts only
    # the tokens above its floor and finds the cut among them. Every row here must take that
    # way, and with ties some draws must land on a probability that other tokens share too.
    from llama.sampling import _sorted_prefix

    short, shared = 0, 0
    for seed in range(30):
        probs = probabilities(seed, 2, 32000, 6.0, ties)
        short += sum(_sorted_prefix(row, 0.9)[1] is not None for row in probs.numpy())
        ours = sample_top_p(probs.clone(), 0.9, torch.Generator().manual_seed(seed))
        theirs = meta_sample_top_p(probs.clone(), 0.9, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, theirs), (seed, ours.flatten().tolist(), theirs.flatten().tolist())
        shared += sum(int((row == row[token]).sum()) > 1 for row, token in zip(probs, ours.flatten()))
    assert short == 60
    assert shared > 0 if ties else shared == 0


def test_rows_whose_cut_is_not_among_the_top_tokens_are_sorted_whole():
    # Probabilities that sum to less than p (sample_top_p takes any rows) are kept whole by the
    # reference: no cut above the floor, so `_sorted_prefix` sorts the whole row; the same for
    # p = 1 and for rows too flat for a short sort to pay.
    from llama.sampling import _sorted_prefix

    cases = [(probabilities(1, 3, 32000, 4.0, False) * 0.5, 0.9), (probabilities(2, 3, 32000, 4.0, False), 1.0),
             (probabilities(3, 3, 32000, 0.1, False), 0.9)]
    for probs, p in cases:
        assert all(_sorted_prefix(row, p)[1] is None for row in probs.numpy())
        for seed in range(5):
            ours = sample_top_p(probs.clone(), p, torch.Generator().manual_seed(seed))
            theirs = meta_sample_top_p(probs.clone(), p, torch.Generator().manual_seed(seed))
            assert torch.equal(ours, theirs), (p, seed)


@pytest.mark.skipif(not __import__("llama.native").native.available(), reason="llama/native.c is not compiled here")
def test_the_c_skip_leaves_the_generator_where_random_does():
    # llama_mt19937_advance moves torch's mt19937 past draws without making them; it must land
    # where random_ over int64 lands (two 32-bit draws a number) from any point of the 624-word
    # state and for counts that end before, on and after one or many twists. Checked here
    # directly, not through the once-per-process check that would fall back to random_ unseen.
    from llama import native

    for used in (0, 1, 311, 623, 624, 1000):
        for count in (0, 1, 5, 311, 312, 623, 624, 625, 31990, 128250):
            drawn, skipped = torch.Generator().manual_seed(count), torch.Generator().manual_seed(count)
            for generator in (drawn, skipped):
                torch.empty(used).exponential_(1, generator=generator)
            torch.empty(count, dtype=torch.int64).random_(generator=drawn)
            assert native.advance_generator(skipped, 2 * count)
            assert torch.equal(drawn.get_state(), skipped.get_state()), (used, count)
            assert torch.equal(torch.rand(5, generator=drawn), torch.rand(5, generator=skipped))


def test_without_the_c_skip_the_draws_are_the_same(monkeypatch):
    # Where the C skip is not there or not exact, random_ moves the generator: the same tokens
    # and the same generator state after, the default generator included.
    from llama import sampling

    probs = probabilities(5, 2, 32000, 6.0, False)
    results = []
    for exact in ([True], [False]):
        monkeypatch.setattr(sampling, "_NATIVE_SKIP_EXACT", exact)
        torch.manual_seed(11)
        tokens = [sample_top_p(probs.clone(), 0.9) for _ in range(4)]
        results.append((tokens, torch.default_generator.get_state()))
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    assert torch.equal(results[0][1], results[1][1])

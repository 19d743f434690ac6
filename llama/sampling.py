"""Sampling the next token: greedy, or nucleus (top-p) as Meta's reference draws it.

`sample_top_p` takes the reference's steps, so that the same generator state draws the same
tokens; on the CPU it computes the same numbers in less time (benchmarks/NOTES.md, "Nucleus
sampling"). `llama.generation` re-exports `sample_top_p` and `sample_next_token`, where the
reference defines them.
"""

from typing import List, Optional, Tuple

import numpy as np
import torch

from llama import native


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of tokens whose mass reaches `p`.

    `probs` is (bsz, vocab); returns (bsz, 1) token ids. The steps are the
    reference's, so the same generator state (torch's default one, or
    `generator`) draws the same tokens.
    """
    if probs.device.type == "cpu" and probs.dtype == torch.float32 and probs.dim() == 2:
        return _sample_top_p_cpu(probs, p, generator)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # A token is dropped when the tokens ranked above it already reach p.
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    next_token = torch.gather(probs_idx, -1, next_token)
    return next_token


def _sample_top_p_cpu(probs: torch.Tensor, p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """`sample_top_p` on the CPU: the same draws, several times sooner at a 32000-token vocabulary.

    Every number the reference computes from the sorted probabilities (their
    running sums, the cut at p, the renormalised values, multinomial's
    exponential draws and the position of the largest kept / q) depends on
    the sorted *values* alone, and only on those up to the cut: so each row
    sorts no further than the tokens it keeps (`_sorted_prefix`), draws the
    exponentials it reads (`_exponential_draws`), and reads the token from
    the drawn value, or, where another token has exactly that probability,
    from torch.sort as the reference does. benchmarks/NOTES.md has the costs.
    """
    rows, vocab = probs.shape
    prefixes = [_sorted_prefix(row, p) for row in probs.numpy()]
    kept = torch.zeros(rows, vocab)
    for row, (values, _, length) in enumerate(prefixes):
        kept[row, :length] = torch.from_numpy(values[:length])
    # Summed over whole rows, zeros and all, as the reference sums: the same bits.
    sums = kept.sum(dim=-1, keepdim=True)
    exponentials = _exponential_draws([length for _, _, length in prefixes], vocab, generator)
    next_token = torch.empty(rows, 1, dtype=torch.long)
    for row, ((values, token_ids, length), q) in enumerate(zip(prefixes, exponentials)):
        # torch.multinomial(kept, 1), one draw a row, is argmax(kept / q) with q ~ Exp(1) at every
        # position; past `length` kept is 0, and so is kept / q.
        position = int(torch.argmax(kept[row, :length] / sums[row] / q))
        next_token[row] = _token_at(probs[row], values, token_ids, position)
    return next_token


def _sorted_prefix(probs: np.ndarray, p: float) -> Tuple[np.ndarray, Optional[np.ndarray], int]:
    """One row's probabilities sorted high to low as far as top-p needs them: (values, their token
    ids or None, kept length); positions `length` on are the ones the reference's cut zeroes.

    The tokens under `floor` hold at most (1 - p) / 2 of the mass between them, so the cut falls
    among the tokens above it, which are the reference's sorted row up to there; it is found there
    and not assumed (rounding, or a top_p of 1, can put it further), else the whole row is sorted.
    Past the cut the reference zeroes every position: the running sum less the value is
    nondecreasing along a sorted row of values >= 0.
    """
    vocab = len(probs)
    if p < 1 and _prefix_sums_are_exact(vocab) and probs.min() >= 0:  # False for NaN too
        floor = (1 - p) / (2 * vocab)
        token_ids = np.flatnonzero(probs >= floor)
        if len(token_ids) <= vocab // 8:  # else sorting it all costs no more
            token_ids = token_ids[np.argsort(probs[token_ids])[::-1]]
            values = probs[token_ids]
            cut = _cut(values, p)
            if len(cut):
                return values, token_ids, int(cut[0])
    values = np.sort(probs)[::-1].copy()
    kept = torch.from_numpy(values).clone()
    kept[_cut(values, p)] = 0.0
    held = kept.nonzero()
    return kept.numpy(), None, int(held[-1]) + 1 if len(held) else vocab


def _cut(values: np.ndarray, p: float) -> torch.Tensor:
    """Positions of sorted `values` that the reference's top-p zeroes: the tokens ranked above reach p."""
    values = torch.from_numpy(values)[None]  # a (1, n) row, as the reference's (bsz, vocab)
    return (torch.cumsum(values, dim=-1) - values > p)[0].nonzero()[:, 0]


def _token_at(probs: torch.Tensor, values: np.ndarray, token_ids: Optional[np.ndarray], position: int) -> int:
    """The token at `position` of the row sorted high to low: the only one with that probability,
    or, where several share it, the one torch.sort puts there."""
    drawn = values[position]
    unique = (position == 0 or values[position - 1] != drawn) and (
        position + 1 == len(values) or values[position + 1] != drawn)
    if unique and token_ids is not None:
        return int(token_ids[position])
    holders = np.flatnonzero(probs.numpy() == drawn)
    if len(holders) == 1:
        return int(holders[0])
    return int(torch.sort(probs, descending=True).indices[position])


def _exponential_draws(lengths: List[int], vocab: int, generator: Optional[torch.Generator]) -> List[torch.Tensor]:
    """For each row of `torch.empty(len(lengths), vocab).exponential_(1, generator=generator)`, its
    first `length` numbers, and the generator left where that leaves it.

    The rest of each row is skipped: where `_skipping_is_exact` finds it so for this length,
    exponential_ takes one 64-bit number a position from the generator, one after another, so
    skipping a position is moving the generator past one such number (`_skip`). Elsewhere every
    position is drawn.
    """
    if not _skipping_is_exact(vocab):
        drawn = torch.empty(len(lengths), vocab).exponential_(1, generator=generator)
        return [drawn[row, :length] for row, length in enumerate(lengths)]
    draws = []
    for length in lengths:
        draws.append(torch.empty(length).exponential_(1, generator=generator))
        if length < vocab:
            _skip(vocab - length, generator)
    return draws


def _skip(count: int, generator: Optional[torch.Generator]) -> None:
    """The generator moved past `count` 64-bit numbers, as `random_` over `count` int64 moves it:
    in C without making them where `_native_skip_is_exact` (~9x sooner: 11 us for 32000 against
    88 us, benchmarks/NOTES.md), else by random_ (a fifth of what exponential_ costs)."""
    generator = generator if generator is not None else torch.default_generator
    if not (_native_skip_is_exact() and native.advance_generator(generator, 2 * count)):
        torch.empty(count, dtype=torch.int64).random_(generator=generator)


_NATIVE_SKIP_EXACT: list = []


def _native_skip_is_exact() -> bool:
    """Whether `native.advance_generator` leaves a generator where random_ over int64 does (two
    32-bit draws of its mt19937 a number), tried once, on generators of their own, from states
    part way through the mt19937's 624 words and for counts that end before, at and after a twist."""
    if not _NATIVE_SKIP_EXACT:
        exact = True
        for used, count in ((0, 1), (5, 311), (311, 312), (100, 1000), (623, 31990), (1, 128250)):
            drawn, skipped = torch.Generator().manual_seed(count), torch.Generator().manual_seed(count)
            for generator in (drawn, skipped):
                torch.empty(used).exponential_(1, generator=generator)
            torch.empty(count, dtype=torch.int64).random_(generator=drawn)
            exact = exact and native.advance_generator(skipped, 2 * count) and torch.equal(
                drawn.get_state(), skipped.get_state())
        _NATIVE_SKIP_EXACT.append(exact)
    return _NATIVE_SKIP_EXACT[0]


_PREFIX_SUMS_EXACT: dict = {}


def _prefix_sums_are_exact(vocab: int) -> bool:
    """Whether torch's running sum of a row's first values is the same bits as the first values of
    the whole row's (one sum after another, as torch's CPU cumsum runs), tried once per length."""
    if vocab not in _PREFIX_SUMS_EXACT:
        row = torch.rand(1, vocab, generator=torch.Generator().manual_seed(vocab)).sort(descending=True).values
        whole = torch.cumsum(row, dim=-1)
        _PREFIX_SUMS_EXACT[vocab] = all(
            torch.equal(torch.cumsum(row[:, :length], dim=-1), whole[:, :length])
            for length in (1, 7, vocab // 8, vocab // 2 + 1))
    return _PREFIX_SUMS_EXACT[vocab]


_SKIPPING_EXACT: dict = {}


def _skipping_is_exact(vocab: int) -> bool:
    """Whether `_exponential_draws`'s skip gives this torch's draws and generator state at `vocab`
    (tried once per length, on generators of their own)."""
    if vocab not in _SKIPPING_EXACT:
        whole, skipped = torch.Generator().manual_seed(vocab), torch.Generator().manual_seed(vocab)
        exact = True
        for length in (1, vocab // 3, vocab):
            drawn = torch.empty(vocab).exponential_(1, generator=whole)
            prefix = torch.empty(length).exponential_(1, generator=skipped)
            if length < vocab:
                torch.empty(vocab - length, dtype=torch.int64).random_(generator=skipped)
            exact = exact and torch.equal(drawn[:length], prefix)
        _SKIPPING_EXACT[vocab] = exact and torch.equal(whole.get_state(), skipped.get_state())
    return _SKIPPING_EXACT[vocab]


# A temperature above 0 but below this decodes greedily, as 0 does. Sampling
# there picks the argmax anyway (unless two logits are within ~1e-4), and
# logits / temperature can overflow float32 (1e-40 makes every logit +-inf).
GREEDY_BELOW_TEMPERATURE = 1e-6


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (bsz,) from last-position logits (bsz, vocab), and (bsz,) True
    where a row's logits (or logits / temperature) are not all finite.

    Greedy at a temperature below GREEDY_BELOW_TEMPERATURE. A row that is not
    finite is sampled from a uniform distribution instead, so that torch is
    never handed a NaN probability; the caller raises for it.
    """
    if temperature >= GREEDY_BELOW_TEMPERATURE:
        scaled = logits / temperature
        nonfinite = _nonfinite_rows(scaled)
        # On the CPU, asking costs less than the fill (2 us against 11 at 32000 tokens); on a GPU the
        # question would wait for the device.
        if scaled.device.type != "cpu" or bool(nonfinite.any()):
            scaled.masked_fill_(nonfinite[:, None], 0.0)
        probs = torch.softmax(scaled, dim=-1)
        return sample_top_p(probs, top_p, generator).reshape(-1), nonfinite
    return torch.argmax(logits, dim=-1).reshape(-1), _nonfinite_rows(logits)


def _nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    # A row's sum is finite exactly when all its values are (NaN and +-inf
    # carry through a sum), barring a sum of finite logits beyond 3e38,
    # which is as broken: one reduction, nothing the size of the row allocated.
    return ~torch.isfinite(logits.sum(dim=-1))

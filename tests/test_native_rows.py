"""The C step of rows each at a position and in a cache row of its own
(`native.DecodeStep.rows`, llama_decode_rows), what a server batching
requests as they come needs: every row's logits the same bits as its step
alone, at any batch size, for each kernel variant this CPU can run and each
kind of weights (fp32, bf16, int8, int4)."""

import ctypes
import functools
import re

import pytest
import torch

from llama import checkpoint, distributed, kernels, native, quantization
from llama.model import ModelArgs, Transformer
from llama.tiny import random_weights
from test_native import use_kernels  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")

VARIANTS = native.variants()
MODES = ["fp32", "bf16", "int8", "int4"]
# Every size a multiple of 16 (the vector paths); int4's groups of 32 divide it.
SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=512)
# Rows of 42 and 14 floats: each row of x starts at another alignment, and the products take
# their remainder loops (int4's groups do not divide 42: not for int4).
ODD_SHAPE = dict(dim=42, n_layers=2, n_heads=3, multiple_of=8, vocab_size=333)
MAX_BATCH, MAX_SEQ = 16, 12


def rows_model(mode: str, shape=SHAPE) -> Transformer:
    """A tiny model the C step runs, with `mode`'s weights, a cache of MAX_BATCH rows of MAX_SEQ
    positions."""
    distributed.init_distributed(torch.device("cpu"), 1)
    args = ModelArgs(**shape, max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH)
    with checkpoint.init_on_meta():
        model = Transformer(args)
    state = random_weights(args, seed=3)
    if mode in ("int8", "int4"):
        config = quantization.make_config(mode, 32 if mode == "int4" else None)
        convert = quantization.converter(config, torch.float32, 1)
        parts = {}
        for key in list(state):
            parts.update(convert(key, state.pop(key), None))
        quantization.install(model, parts, config, torch.device("cpu"), torch.float32)
    else:
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        checkpoint.load_into(model, state, torch.device("cpu"), dtype, source="random")
        kernels.prepare(model, "native")
    model.setup_caches()
    assert native.supports(model), mode
    return model.eval()


def caches(model):
    return [t for layer in model.layers for t in (layer.attention.cache_k, layer.attention.cache_v)]


def save_cache(model):
    return [t.clone() for t in caches(model)]


def restore_cache(model, saved) -> None:
    for t, s in zip(caches(model), saved):
        t.copy_(s)


def fill_cache_randomly(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for t in caches(model):
        t.copy_(torch.randn(t.shape, generator=generator))


# Rows of a ragged step: (token, position, cache row), the cache rows scattered, the positions apart.
RAGGED = [(17, 3, 9), (250, 0, 2), (5, 7, 14), (301, 5, 0), (42, 10, 6)]


def ragged_cache(model, rows, seed: int = 5):
    """The eager forward's cache for `rows`: cache row c holds, at positions 0 .. p - 1, a prompt
    of its own run by the eager forward, p and c as each row of `rows` gives them. Returns each
    row's eager logits at its position after that prompt, and the cache."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.params.vocab_size
    eager, per_row = [], []
    for token, position, _ in rows:
        prompt = torch.randint(0, vocab, (1, position), generator=generator)
        with torch.inference_mode():
            for t in caches(model):
                t.zero_()
            if position:
                model.forward(prompt, 0)
            per_row.append([t[0, :, :position].clone() for t in caches(model)])  # cache row 0 of the prompt
            eager.append(model.forward(torch.tensor([[token]]), position)[0, -1].float())
    for t in caches(model):
        t.zero_()
    for (_, position, cache_row), saved in zip(rows, per_row):
        for t, s in zip(caches(model), saved):
            t[cache_row, :, :position] = s
    return torch.stack(eager), save_cache(model)


def ragged_step(step, rows):
    tokens, positions, cache_rows = (torch.tensor(column) for column in zip(*rows))
    with torch.inference_mode():
        return step.rows(tokens, positions, cache_rows)


def eager_tolerance(mode: str) -> dict:
    # bf16: two bf16 computations, a value of ~11 within a few of its bf16 steps (test_native.py).
    return dict(atol=0.25, rtol=0) if mode == "bf16" else dict(atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_ragged_rows_are_each_rows_step_alone_and_the_eager_forward(mode, variant, use_kernels):  # noqa: F811
    use_kernels(variant)
    model = rows_model(mode)
    step = native.DecodeStep(model)
    eager, start = ragged_cache(model, RAGGED)
    batched = ragged_step(step, RAGGED)
    assert batched.shape == (len(RAGGED), SHAPE["vocab_size"]) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, eager, **eager_tolerance(mode))
    after_batch = save_cache(model)
    assert not all(torch.equal(a, b) for a, b in zip(after_batch, start)), "the step wrote no key or value"

    restore_cache(model, start)
    alone = torch.cat([ragged_step(step, [row]) for row in RAGGED])
    assert torch.equal(batched, alone)
    assert all(torch.equal(a, b) for a, b in zip(save_cache(model), after_batch)), "another cache than alone"

    # The one-position step (__call__) of each row moved to cache row 0.
    for b, (token, position, cache_row) in enumerate(RAGGED):
        restore_cache(model, start)
        for t in caches(model):
            t[0] = t[cache_row].clone()
        with torch.inference_mode():
            ours = step(torch.tensor([[token]]), position)
        assert ours.shape == (1, 1, SHAPE["vocab_size"])
        assert torch.equal(ours[0, 0], batched[b]), f"row {b}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode,shape", [(mode, SHAPE) for mode in MODES] +
                         [(mode, ODD_SHAPE) for mode in ("fp32", "bf16", "int8")],
                         ids=[f"{mode}" for mode in MODES] + [f"{mode}-odd" for mode in ("fp32", "bf16", "int8")])
def test_a_rows_logits_are_the_same_bits_in_a_batch_of_any_size(mode, shape, variant, use_kernels):  # noqa: F811
    # The products take several rows of a batch a pass over the weights, then the rows left over
    # (fewer than a pass takes) in smaller passes: the row is put first, in the middle and last,
    # in batches of 1, 3, 7, 8 and 16.
    use_kernels(variant)
    model = rows_model(mode, shape)
    step = native.DecodeStep(model)
    fill_cache_randomly(model, seed=6)
    start = save_cache(model)
    generator = torch.Generator().manual_seed(8)
    target = (7, 6, 11)  # token, position, cache row
    others = [c for c in range(MAX_BATCH) if c != target[2]]
    want = ragged_step(step, [target])[0]
    for bsz in (1, 3, 7, 8, 16):
        for place in sorted({0, bsz // 2, bsz - 1}):
            restore_cache(model, start)
            cache_rows = [others[i] for i in torch.randperm(len(others), generator=generator)[: bsz - 1]]
            rows = [(int(torch.randint(0, shape["vocab_size"], (1,), generator=generator)),
                     int(torch.randint(0, MAX_SEQ, (1,), generator=generator)), c) for c in cache_rows]
            rows.insert(place, target)
            got = ragged_step(step, rows)[place]
            assert torch.equal(got, want), f"batch {bsz}, row {place}: {(got - want).abs().max()}"


def c_matrix(kind: str, rows: int, cols: int, keep: list):
    """A random [rows, cols] matrix of `kind` as C reads it."""
    generator = torch.Generator().manual_seed(12)
    if kind == "int4":
        q = torch.randint(0, 16, (rows, cols), generator=generator, dtype=torch.uint8)
        scale = torch.rand(rows, cols // 32, generator=generator) * 0.1 + 0.01
        zero = torch.randn(rows, cols // 32, generator=generator) * 0.1
        return native.matrix(kernels.NativeInt4Linear(q[:, 0::2] | (q[:, 1::2] << 4), scale, zero, 32), keep)
    if kind == "int8":
        q = torch.randint(-127, 128, (rows, cols), generator=generator, dtype=torch.int8)
        scale = torch.rand(rows, generator=generator) * 0.01
        keep += [q, scale]
        return native._Matrix(native.INT8, rows, cols, 0, q.data_ptr(), scale.data_ptr())
    w = torch.randn(rows, cols, generator=generator).to(torch.bfloat16 if kind == "bf16" else torch.float32)
    keep.append(w)
    return native._Matrix(native.BF16 if kind == "bf16" else native.FP32, rows, cols, 0, w.data_ptr(), None)


def c_product(matrix, x: torch.Tensor) -> torch.Tensor:
    """x [batch, cols] times the C matrix's rows, by llama_matmul: [batch, rows]."""
    lib = native._load()
    y = torch.empty(x.shape[0], matrix.rows)
    work = torch.empty(lib.llama_matmul_scratch_floats(x.shape[0], matrix.cols))
    lib.llama_matmul(ctypes.byref(matrix), x.data_ptr(), y.data_ptr(), x.shape[0], work.data_ptr())
    return y


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", MODES)
def test_each_products_rows_are_the_same_bits_in_a_batch_of_any_size(kind, variant, use_kernels):  # noqa: F811
    # The products alone, their fp32 sums unrounded (a bf16 model rounds each to bf16, which can
    # hide a sum taken in another order): 70 rows (blocks of four and two left over; int4 tiles of
    # 16, the last one partial), each row of x against its product alone, at every place in
    # batches of 2, 3, 7, 8 and 16.
    use_kernels(variant)
    keep: list = []
    rows, cols = 70, 128
    matrix = c_matrix(kind, rows, cols, keep)
    x = torch.randn(16, cols, generator=torch.Generator().manual_seed(13))
    product = functools.partial(c_product, matrix)

    alone = torch.cat([product(x[b : b + 1]) for b in range(16)])
    for bsz in (2, 3, 7, 8, 16):
        for first in range(0, 16 - bsz + 1, max(1, (16 - bsz) // 2)):
            got = product(x[first : first + bsz].contiguous())
            assert torch.equal(got, alone[first : first + bsz]), f"batch {bsz} from row {first}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cols", [1088, 2048])
def test_long_fp32_rows_taken_in_pieces_are_the_same_bits_as_a_row_alone(cols, variant, use_kernels):  # noqa: F811
    # fp32 rows longer than a piece (1024 columns) go through a batch's passes a piece at a time,
    # each pass's accumulators kept between pieces: 1088 columns make a second, shorter piece.
    # Batches of 8 and more take that path, in groups of eight passes (32 rows of x with AVX-512's
    # four a pass, 24 with AVX2's three) and the passes of two and one left over; 10 weight rows
    # make two blocks of four and two rows left over. Every row must be the bits of its row alone.
    use_kernels(variant)
    keep: list = []
    rows = 10
    matrix = c_matrix("fp32", rows, cols, keep)
    x = torch.randn(47, cols, generator=torch.Generator().manual_seed(cols))
    product = functools.partial(c_product, matrix)

    alone = torch.cat([product(x[b : b + 1]) for b in range(47)])
    torch.testing.assert_close(alone, x @ keep[0].T, rtol=1e-4, atol=1e-3)
    for bsz in (8, 13, 38, 47):
        got = product(x[47 - bsz :].contiguous())
        assert torch.equal(got, alone[47 - bsz :]), f"batch {bsz}: {(got - alone[47 - bsz:]).abs().max()}"


# The server's forward: prompts (tokens, cache row) beside a step of rows (token, position, cache row).
PROMPTS = [(list(range(3, 13)), 4), ([77], 9), ([400, 2, 31, 8, 8, 150, 61], 12)]
STEP = [(17, 3, 1), (250, 0, 2), (5, 7, 14), (301, 5, 0), (42, 10, 6)]


def prompts_and_rows(step, prompts, rows):
    tokens, positions, cache_rows = (torch.tensor(column, dtype=torch.long) for column in zip(*rows)) if rows else \
        (torch.zeros(0, dtype=torch.long),) * 3
    with torch.inference_mode():
        return step.prompts_and_rows([(torch.tensor(t), c) for t, c in prompts], tokens, positions, cache_rows)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
def test_prompts_beside_a_step_are_each_prompt_and_row_alone(mode, variant, use_kernels, monkeypatch):  # noqa: F811
    # One call for three prompts and a step of five rows; then each prompt alone and the step alone;
    # then the same call in pieces of three rows (a prompt split over calls, its last row with
    # another prompt's first): the same logits and the same cache, bit for bit.
    use_kernels(variant)
    model = rows_model(mode)
    step = native.DecodeStep(model)
    fill_cache_randomly(model, seed=9)
    start = save_cache(model)
    prompt_logits, row_logits = prompts_and_rows(step, PROMPTS, STEP)
    assert prompt_logits.shape == (3, SHAPE["vocab_size"]) and row_logits.shape == (5, SHAPE["vocab_size"])
    together = save_cache(model)

    restore_cache(model, start)
    alone = torch.cat([prompts_and_rows(step, [prompt], [])[0] for prompt in PROMPTS])
    assert torch.equal(alone, prompt_logits)
    assert torch.equal(ragged_step(step, STEP), row_logits)
    assert all(torch.equal(a, b) for a, b in zip(save_cache(model), together)), "another cache than alone"

    restore_cache(model, start)
    monkeypatch.setattr(native, "PIECE_ROWS", 3)
    in_pieces = prompts_and_rows(step, PROMPTS, STEP)
    assert torch.equal(in_pieces[0], prompt_logits) and torch.equal(in_pieces[1], row_logits)
    assert all(torch.equal(a, b) for a, b in zip(save_cache(model), together)), "another cache in pieces"

    # A prompt's rows are those of the C step run one token at a time (which the tests above hold
    # to the eager forward): the same bits, logits and cache.
    for (tokens, cache_row), ours in zip(PROMPTS, prompt_logits):
        restore_cache(model, start)
        for position, token in enumerate(tokens):
            one = ragged_step(step, [(token, position, cache_row)])[0]
        assert torch.equal(one, ours)
        for t, ours_cached in zip(caches(model), together):
            assert torch.equal(t[cache_row, :, : len(tokens)], ours_cached[cache_row, :, : len(tokens)])


def test_prompts_and_rows_refuse_what_does_not_fit_and_leave_the_cache(monkeypatch):
    model = rows_model("fp32")
    step = native.DecodeStep(model)
    fill_cache_randomly(model, seed=10)
    start = save_cache(model)
    # In pieces of three rows, so that a fault in a later prompt would meet a cache that the
    # first pieces had written, were the checks not all made first.
    monkeypatch.setattr(native, "PIECE_ROWS", 3)
    cases = [
        ([([5, 6], 1)], STEP[:1], ValueError, "cache row 1 is given twice"),
        ([([5, 6], 3), ([7], 3)], [], ValueError, "cache row 3 is given twice"),
        ([([5], 3)], [(1, 2, 0), (2, 4, 0)], ValueError, "rows 0 and 1 both name cache row 0"),
        ([(list(range(MAX_SEQ + 1)), 3)], [], ValueError, f"longer than the cache ({MAX_SEQ} positions)"),
        ([([5], 4), ([], 3)], STEP, ValueError, "prompt 1 is empty"),
        ([([5, 6], 4), ([5, SHAPE["vocab_size"]], 3)], STEP, IndexError,
         f"token id {SHAPE['vocab_size']} (prompt 1, position 1) is outside the vocabulary"),
        ([([5], 4)], [(-1, 2, 0)], IndexError, "token id -1 (row 0 of the step) is outside the vocabulary"),
        ([([5], 3)], [(1, MAX_SEQ, 0)], ValueError, f"position {MAX_SEQ} is outside the cache"),
        ([([5], 4), ([5], MAX_BATCH)], STEP, ValueError, f"prompt 1's cache row {MAX_BATCH} is outside the cache"),
    ]
    for prompts, rows, error, words in cases:
        with pytest.raises(error, match=re.escape(words)):
            prompts_and_rows(step, prompts, rows)
        assert all(torch.equal(a, b) for a, b in zip(save_cache(model), start)), words

    # C's own checks: the rows of one cache row at rising positions, the rows with logits rising.
    lib = native._load()
    logits = torch.empty(2, SHAPE["vocab_size"])
    scratch = torch.empty(lib.llama_scratch_floats(ctypes.byref(step._model), 3))
    for positions, logit_rows in [([0, 2, 1], [0, 1]), ([0, 1, 1], [0, 1]), ([0, 1, 2], [1, 1]), ([0, 1, 2], [2, 1]),
                                  ([0, 1, 2], [0, 3])]:
        ids, at, rows, wanted = (torch.tensor(v, dtype=torch.long) for v in ([5, 6, 7], positions, [3, 3, 3], logit_rows))
        assert lib.llama_forward_rows(ctypes.byref(step._model), ids.data_ptr(), 3, at.data_ptr(), rows.data_ptr(),
                                      wanted.data_ptr(), 2, logits.data_ptr(), scratch.data_ptr(), 1) == -2
    assert all(torch.equal(a, b) for a, b in zip(save_cache(model), start))


def test_the_one_position_step_is_the_rows_step():
    # llama_decode_step is llama_decode_rows with every row at one position, row b in cache row b.
    model = rows_model("fp32")
    step = native.DecodeStep(model)
    fill_cache_randomly(model, seed=9)
    start = save_cache(model)
    tokens = torch.tensor([4, 400, 90], dtype=torch.int64)
    want = ragged_step(step, [(int(t), 5, b) for b, t in enumerate(tokens)])
    after = save_cache(model)
    restore_cache(model, start)
    lib = native._load()
    logits = torch.empty(3, SHAPE["vocab_size"])
    scratch = torch.empty(lib.llama_scratch_floats(ctypes.byref(step._model), 3))
    with torch.inference_mode():
        assert lib.llama_decode_step(ctypes.byref(step._model), tokens.data_ptr(), 3, 5, logits.data_ptr(),
                                     scratch.data_ptr(), 1) == 0
    assert torch.equal(logits, want)
    assert all(torch.equal(a, b) for a, b in zip(save_cache(model), after))
    restore_cache(model, start)
    with torch.inference_mode():
        assert torch.equal(step(tokens[:, None], 5)[:, 0], want)


@pytest.mark.parametrize("rows,error,message", [
    ([(3, 1, 0), (512, 2, 1)], IndexError, "a token id is outside the vocabulary of 512"),
    ([(3, 1, 0), (-1, 2, 1)], IndexError, "a token id is outside the vocabulary of 512"),
    ([(3, 1, 0), (4, MAX_SEQ, 1)], ValueError,
     rf"row 1: position {MAX_SEQ} is outside the cache \({MAX_SEQ} positions: 0 to {MAX_SEQ - 1}\)"),
    ([(3, -1, 0)], ValueError, "row 0: position -1 is outside the cache"),
    ([(3, 1, 0), (4, 2, MAX_BATCH)], ValueError,
     rf"row 1: cache row {MAX_BATCH} is outside the cache \({MAX_BATCH} rows: 0 to {MAX_BATCH - 1}\)"),
    ([(3, 1, 4), (4, 2, 7), (5, 3, 4)], ValueError,
     "rows 0 and 2 both name cache row 4: each row of a step needs a cache row of its own"),
    ([(3, 1, b) for b in range(MAX_BATCH)] + [(3, 1, 0)], ValueError,
     rf"batch {MAX_BATCH + 1} is outside the cache \({MAX_BATCH} rows"),
], ids=["token", "negative token", "position", "negative position", "cache row", "cache row twice", "batch"])
def test_rows_outside_the_vocabulary_or_the_cache_are_refused_and_the_cache_is_untouched(rows, error, message):
    model = rows_model("fp32")
    step = native.DecodeStep(model)
    fill_cache_randomly(model, seed=10)
    start = save_cache(model)
    with pytest.raises(error, match=message):
        ragged_step(step, rows)
    assert all(torch.equal(a, b) for a, b in zip(save_cache(model), start))


def test_rows_take_lists_and_name_arguments_of_the_wrong_shape():
    model = rows_model("fp32")
    step = native.DecodeStep(model)
    fill_cache_randomly(model, seed=11)
    start = save_cache(model)
    with torch.inference_mode():
        from_lists = step.rows([5, 6], [3, 4], [8, 1])
        restore_cache(model, start)
        assert torch.equal(from_lists, step.rows(torch.tensor([5, 6]), torch.tensor([3, 4]), torch.tensor([8, 1])))
        with pytest.raises(ValueError, match="got 2 tokens, 1 positions and 2 cache rows"):
            step.rows([5, 6], [3], [8, 1])
        with pytest.raises(ValueError, match=r"positions must be one integer a row, shape \(bsz,\)"):
            step.rows([5, 6], [[3], [4]], [8, 1])
        with pytest.raises(ValueError, match="cache_rows must be one integer a row"):
            step.rows([5, 6], [3, 4], [8.0, 1.0])
        with pytest.raises(ValueError, match="an empty batch"):
            step.rows([], [], [])


def test_the_thread_count_is_chosen_apart_for_each_batch_size(monkeypatch):
    # A server's batch changes size from step to step. One chooser for all sizes compared a
    # batch-1 step on one thread with the recent batch-16 steps on two, found it faster and
    # moved to one thread. Here a step takes the same time on any count, 10 ms at batch 1 and
    # 60 ms at batch 16: every count but the occasional try stays torch's.
    most = torch.get_num_threads()
    if most < 2:
        pytest.skip("torch runs one thread: there is no count to choose")
    monkeypatch.delenv(native.THREADS_VARIABLE, raising=False)
    model = rows_model("fp32")
    step = native.DecodeStep(model)
    duration = {}

    class Clock:
        now, started = 0.0, False

        def perf_counter(self):
            if self.started:
                self.now += duration["next"]
            self.started = not self.started
            return self.now

    monkeypatch.setattr(native, "time", Clock())
    counts = []

    class Library:
        def __getattr__(self, name):
            return getattr(native._load(), name)

        def llama_decode_rows(self, *args):
            counts.append(args[-1])
            return native._load().llama_decode_rows(*args)

    step._lib = Library()
    with torch.inference_mode():
        for i in range(100):
            bsz = 1 if i % 2 == 0 else 16
            duration["next"] = 0.010 if bsz == 1 else 0.060
            step.rows(list(range(bsz)), [0] * bsz, list(range(bsz)))
    assert counts.count(most) > 0.8 * len(counts), counts

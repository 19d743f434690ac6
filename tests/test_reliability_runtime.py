"""Reliability at run time: threads sharing a Llama, non-finite numbers,
awkward input values, a KV cache too large for the memory."""

import contextlib
import copy
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from conftest import cuda_only
from llama import Llama
from llama.generation import sample_next_token
from llama.decode_step import DecodeStep

PROMPTS = ["the river", "one two three", "a quiet village", "Café naïve über", "x", "seven eight"]


def build(ckpt_dir, tokenizer=None, **kwargs):
    options = dict(max_seq_len=64, max_batch_size=4, device="cpu")
    options.update(kwargs)
    return Llama.build(str(ckpt_dir), str(tokenizer or ckpt_dir / "tokenizer.model"), **options)


# ---- item 1: one Llama shared by several threads ---------------------------------------------


def run_threads(targets, timeout=120):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread did not finish"


def test_threads_sharing_a_llama_each_get_their_single_threaded_text(generator):
    expected = {p: generator.text_completion([p], max_gen_len=24, temperature=0)[0]["generation"] for p in PROMPTS}
    barrier = threading.Barrier(len(PROMPTS))
    results, errors = [], []

    def worker(prompt):
        def run():
            try:
                barrier.wait()
                for _ in range(3):
                    out = generator.text_completion([prompt], max_gen_len=24, temperature=0)
                    results.append((prompt, out[0]["generation"]))
            except Exception as e:  # reported below, with the thread's prompt
                errors.append((prompt, e))

        return run

    run_threads([worker(p) for p in PROMPTS])
    assert errors == []
    assert len(results) == 3 * len(PROMPTS)
    wrong = [(p, text) for p, text in results if text != expected[p]]
    assert wrong == [], f"{len(wrong)} of {len(results)} concurrent results differ"


def test_a_suspended_stream_makes_other_threads_wait_until_it_is_finished(generator):
    full = generator.text_completion(["the river"], max_gen_len=20, temperature=0)[0]["generation"]
    other = generator.text_completion(["one two three"], max_gen_len=20, temperature=0)[0]["generation"]

    stream = generator.stream_text_completion("the river", max_gen_len=20, temperature=0)
    pieces = [next(stream), next(stream)]
    result = []
    waiting = threading.Thread(
        target=lambda: result.append(
            generator.text_completion(["one two three"], max_gen_len=20, temperature=0)[0]["generation"]
        )
    )
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive(), "another thread's generation ran while a stream was suspended"
    pieces += list(stream)  # the stream goes on undisturbed
    waiting.join(60)
    assert "".join(pieces) == full
    assert result == [other]


def test_a_stream_can_be_resumed_from_other_threads(generator):
    # As a web server's thread pool does: each token may come from another worker.
    full = generator.text_completion(["the river"], max_gen_len=16, temperature=0)[0]["generation"]
    stream = generator.stream_text_completion("the river", max_gen_len=16, temperature=0)
    pieces = []
    while True:
        step = []
        run_threads([lambda: step.append(next(stream, None))])
        if step[0] is None:
            break
        pieces.append(step[0])
    assert "".join(pieces) == full


def test_closed_or_dropped_streams_free_the_llama_for_other_threads(generator):
    expected = generator.text_completion(["seven eight"], max_gen_len=8, temperature=0)
    for drop in ("close", "never started"):
        stream = generator.stream_text_completion("the river", max_gen_len=20, temperature=0)
        if drop == "close":
            next(stream)
            stream.close()
        del stream
        result = []
        run_threads([lambda: result.append(generator.text_completion(["seven eight"], max_gen_len=8, temperature=0))], 30)
        assert result == [expected]


def test_a_stream_overtaken_in_its_own_thread_still_refuses_to_go_on(generator):
    stream = generator.stream_text_completion("the river", max_gen_len=20, temperature=0)
    next(stream)
    generator.text_completion(["one two"], max_gen_len=3)  # same thread: no wait, takes over
    with pytest.raises(RuntimeError, match="overtaken"):
        next(stream)
    result = []
    run_threads([lambda: result.append(generator.text_completion(["x"], max_gen_len=2))], 30)
    assert len(result) == 1


# ---- item 2: non-finite weights and logits ---------------------------------------------------


@pytest.fixture(scope="module")
def nan_ckpt(tiny_ckpt, tmp_path_factory):
    """`tiny_ckpt` with NaN in token 300's embedding row: only prompts holding it go wrong."""
    out = tmp_path_factory.mktemp("nan_ckpt")
    shutil.copy(tiny_ckpt / "params.json", out / "params.json")
    shutil.copy(tiny_ckpt / "tokenizer.model", out / "tokenizer.model")
    state = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
    state["tok_embeddings.weight"][300, 5] = float("nan")
    torch.save(state, out / "consolidated.00.pth")
    return out


def test_non_finite_weights_are_refused_where_loading_copies_them(nan_ckpt):
    with pytest.raises(ValueError, match=r"tok_embeddings.weight in .*consolidated.00.pth.* 1 NaN"):
        build(nan_ckpt, dtype=torch.bfloat16)


def test_check_weights_scans_the_memory_mapped_weights_too(nan_ckpt):
    build(nan_ckpt)  # fp32 on CPU: used in place from the mapped file, not read at load
    with pytest.raises(ValueError, match=r"tok_embeddings.weight .* 1 NaN"):
        build(nan_ckpt, check_weights=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_weight_check_finds_nan_and_either_infinity(dtype):
    from llama.checkpoint import require_finite

    require_finite(torch.randn(64, 8).to(dtype), "w", "here")
    for bad, counts in ((float("inf"), "0 NaN and 1 infinite"), (float("-inf"), "0 NaN and 1 infinite"),
                        (float("nan"), "1 NaN and 0 infinite")):
        weight = torch.randn(64, 8).to(dtype)
        weight[63, 7] = bad
        with pytest.raises(ValueError, match=f"layers.0.w in here holds {counts} value"):
            require_finite(weight, "layers.0.w", "here")


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_non_finite_logits_raise_naming_the_step_and_row(nan_ckpt, temperature):
    generator = build(nan_ckpt)
    # Row 2's logits for position 3 follow token 300: step 2 from the shortest prompt's end.
    with pytest.raises(FloatingPointError, match=r"decoding step 2 \(position 3\), row 2 of the batch: the logits"):
        generator.generate([[1], [1, 5], [1, 7, 300]], max_gen_len=8, temperature=temperature)
    with pytest.raises(FloatingPointError, match=r"step 0 \(position 3\), row 2 "):
        generator.generate([[1, 5, 6, 7], [1, 9, 9], [1, 2, 300, 4]], max_gen_len=8, temperature=temperature)
    with pytest.raises(FloatingPointError, match=r"step 0 \(position 2\), row 0 "):
        list(generator.stream_generate([1, 300], max_gen_len=8, temperature=temperature))
    # The Llama keeps working for prompts that never meet the bad row.
    good = generator.generate([[1, 5, 6]], max_gen_len=4, temperature=0)
    assert len(good[0][0]) == 4


@contextlib.contextmanager
def nan_in_embedding(generator, token):
    """Token `token`'s embedding row holds a NaN inside the block, its own values after."""
    row = generator.model.tok_embeddings.weight.data[token]
    saved = row.clone()
    row[5] = float("nan")
    try:
        yield
    finally:
        row.copy_(saved)


@pytest.mark.parametrize(
    "device, step",
    [
        ("cpu", "eager"),
        ("cpu", "C"),
        ("cpu", "compile"),
        pytest.param("cuda", "compile", marks=cuda_only),
        pytest.param("cuda", "cuda_graph", marks=cuda_only),
    ],
)
def test_a_non_finite_generation_leaves_the_llama_working_for_later_shorter_ones(tiny_ckpt, device, step):
    # The compiled and graphed steps attend over the whole cache under a mask:
    # a NaN the failed generation cached beyond a later one's positions would
    # still reach that one's output (0 x NaN) unless the failure clears it.
    generator = build(tiny_ckpt, max_batch_size=1, device=device, compile=step == "compile",
                      cuda_graph=step == "cuda_graph")
    if step == "eager":
        generator.step = DecodeStep(generator.model)  # eager
    assert (generator.step.kind == "native") == (step == "C")
    healthy = [[1, 5, 6]]
    fresh = generator.generate(healthy, max_gen_len=4, temperature=0)  # what a fresh Llama gives
    assert len(fresh[0][0]) == 4
    # Position 7 (token 300) caches NaN keys and values, past the 7 positions of `healthy`.
    failing = [1, 5, 6, 7, 8, 9, 10, 300]
    with nan_in_embedding(generator, 300):
        with pytest.raises(FloatingPointError, match=r"step 0 \(position 8\), row 0 "):
            generator.generate([failing], max_gen_len=4, temperature=0)
    assert generator.generate(healthy, max_gen_len=4, temperature=0) == fresh
    with nan_in_embedding(generator, 300):
        with pytest.raises(FloatingPointError, match=r"step 0 \(position 8\), row 0 "):
            list(generator.stream_generate(failing, max_gen_len=4, temperature=0))
    assert generator.generate(healthy, max_gen_len=4, temperature=0) == fresh


def test_sampling_never_hands_torch_a_nan_probability():
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    torch.manual_seed(0)
    tokens, nonfinite = sample_next_token(logits, temperature=0.7, top_p=0.9)
    assert nonfinite.tolist() == [False, True, True]
    assert tokens.shape == (3,) and bool(((tokens >= 0) & (tokens < 50)).all())
    # Finite logits overflowing at a small temperature are caught as well.
    _, nonfinite = sample_next_token(torch.tensor([[1e33, 0.0]]), temperature=1e-6, top_p=0.9)
    assert nonfinite.tolist() == [True]


# ---- item 8: awkward input values ------------------------------------------------------------


def test_lone_surrogates_are_named_by_prompt_and_position(generator):
    with pytest.raises(ValueError, match=r"prompt 1 holds a lone surrogate '\\ud800' at position 2"):
        generator.text_completion(["fine", "ab\ud800cd"], max_gen_len=2)
    dialogs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "x\udfff"}]]
    with pytest.raises(ValueError, match=r"dialog 1: message 0's content holds a lone surrogate '\\udfff' at position 1"):
        generator.chat_completion(dialogs, max_gen_len=2)
    with pytest.raises(ValueError, match="the prompt holds a lone surrogate .* at position 0"):
        generator.stream_text_completion("\ud83d", max_gen_len=2)
    with pytest.raises(ValueError, match="message 2's content holds a lone surrogate"):
        generator.stream_chat_completion(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "\udc00"}]
        )
    with pytest.raises(ValueError, match="lone surrogate"):
        generator.tokenizer.encode("\ud800", bos=True, eos=False)
    # A proper pair (one character outside the BMP) is fine.
    assert isinstance(generator.text_completion(["\U0001F600"], max_gen_len=2)[0]["generation"], str)


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 5e-7])
def test_tiny_positive_temperatures_decode_greedily(generator, temperature):
    greedy = generator.generate([[1, 100, 200], [1, 42]], max_gen_len=10, temperature=0)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    assert generator.generate([[1, 100, 200], [1, 42]], max_gen_len=10, temperature=temperature) == greedy
    assert torch.equal(torch.get_rng_state(), state)  # as greedy as temperature 0: no draws


@pytest.mark.parametrize("name", ["temperature", "top_p"])
@pytest.mark.parametrize("value", ["0.5", None, [0.5], True])
def test_non_numeric_sampling_parameters_are_named(generator, name, value):
    calls = [
        lambda kw: generator.text_completion(["hi"], max_gen_len=2, **kw),
        lambda kw: generator.chat_completion([[{"role": "user", "content": "hi"}]], max_gen_len=2, **kw),
        lambda kw: generator.generate([[1, 5]], max_gen_len=2, **kw),
        lambda kw: generator.stream_text_completion("hi", max_gen_len=2, **kw),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=f"{name} must be a real number"):
            call({name: value})


def test_numpy_and_torch_integer_token_ids_are_accepted(generator):
    expected = generator.generate([[1, 100, 200], [1, 42]], max_gen_len=6, temperature=0)
    as_numpy = [np.array([1, 100, 200], dtype=np.int64), [np.int32(1), np.int16(42)]]
    as_torch = [torch.tensor([1, 100, 200]), [torch.tensor(1, dtype=torch.int32), torch.tensor(42)]]
    assert generator.generate(as_numpy, max_gen_len=6, temperature=0) == expected
    assert generator.generate(as_torch, max_gen_len=6, temperature=0) == expected
    assert list(generator.stream_generate(np.array([1, 42]).tolist(), max_gen_len=6, temperature=0)) == expected[0][1]
    with pytest.raises(ValueError, match=r"prompt 0 holds token id 9999, outside the vocabulary"):
        generator.generate([np.array([1, 9999])], max_gen_len=2)
    with pytest.raises(TypeError, match=r"prompt 1 holds 2.5 \(float\): token ids must be integers"):
        generator.generate([[1], [1, 2.5]], max_gen_len=2)
    with pytest.raises(TypeError, match="not bools"):
        generator.generate([[1, True]], max_gen_len=2)


def test_a_tokenizer_without_bos_or_eos_is_refused_at_build(tiny_ckpt, tmp_path):
    import sentencepiece as spm

    from llama.tiny import training_text

    path = tmp_path / "no_bos_eos.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_text(), model_prefix=str(path.with_suffix("")), model_type="bpe",
        vocab_size=512, byte_fallback=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    with pytest.raises(ValueError, match=r"the tokenizer has no BOS token \(bos_id = -1\)"):
        build(tiny_ckpt, tokenizer=path)


def test_from_model_refuses_a_tokenizer_without_eos(generator):
    tokenizer = copy.copy(generator.tokenizer)
    tokenizer.eos_id = -1
    with pytest.raises(ValueError, match="no EOS token"):
        Llama.from_model(generator.model, tokenizer, fast_layout=False)


# ---- item 10: a KV cache too large for the memory --------------------------------------------


@pytest.mark.parametrize("sizes", [dict(max_seq_len=2**40), dict(max_batch_size=2**36)])
def test_a_kv_cache_that_cannot_fit_is_refused_before_allocating(tiny_ckpt, sizes):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"KV cache .* needs [\d,]+ bytes .* on cpu, but only [\d,]+ bytes .* available"):
        build(tiny_ckpt, **sizes)
    assert time.monotonic() - start < 20


def test_the_computed_cache_size_is_what_is_allocated(generator):
    from llama import memory

    model = generator.model
    held = sum(b.nbytes for name, b in model.named_buffers() if name.endswith(("cache_k", "cache_v", "rope")))
    assert held == memory.cache_bytes(model.params, 1, torch.float32)
    assert memory.cache_bytes(model.params, 1, torch.float16) < held
    assert memory.available_bytes(torch.device("cpu")) > 0


# ---- issue 19: a seed or a torchrun variable that cannot work ----------------------------------


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 99999999999999999999])
def test_a_seed_outside_torchs_64_bits_is_refused_before_loading(tiny_ckpt, seed):
    with pytest.raises(ValueError, match=rf"seed must be an integer from -2\*\*63 to 2\*\*64 - 1 .*got {seed}"):
        build(tiny_ckpt, seed=seed)


@pytest.mark.parametrize("name, value", [("WORLD_SIZE", "abc"), ("RANK", "1.5"), ("LOCAL_RANK", "-1"), ("WORLD_SIZE", "0")])
def test_a_torchrun_variable_that_is_not_a_number_is_named(tiny_ckpt, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"the environment variable {name} must be a whole number >= .*got '{value}'"):
        build(tiny_ckpt)

"""The decoding fast paths against tokens and logprobs recorded from the
reference-style code (before any speed work), on two shapes.

The golden file was written by `python tests/test_decoding_golden.py` on the
straightforward model (separate wq/wk/wv, complex rotary, explicit softmax).
Optimisations may change the last float bits but never a greedy token, and
logprobs must stay within 1e-5.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import cuda_only
from llama import Llama
from llama.tiny import make_tiny_checkpoint

GOLDEN = Path(__file__).with_name("golden") / "decoding.json"

SHAPES = {
    # the test suite's tiny model: grouped-query attention
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, seed=0),
    # the ~15M benchmark shape's layers (dim 288, 6 layers, 6 heads), with the tiny vocabulary
    "small": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=None, multiple_of=32, seed=1),
}

# Token ids, not text, so the golden file does not depend on the tokenizer training.
PROMPTS = [[1, 72, 300, 45, 17, 260, 99], [1, 5, 400], [1, 250, 251, 252, 253, 254, 255, 256, 257, 258, 30]]
MAX_GEN_LEN = 20


def build(ckpt_dir, device="cpu", **kwargs) -> Llama:
    return Llama.build(
        ckpt_dir=str(ckpt_dir),
        tokenizer_path=str(Path(ckpt_dir) / "tokenizer.model"),
        max_seq_len=64,
        max_batch_size=4,
        device=device,
        **kwargs,
    )


def run_cases(generator: Llama):
    """Greedy runs: the batch of three prompts, and the first prompt alone."""
    cases = {}
    for name, prompts in (("batch", PROMPTS), ("single", PROMPTS[:1])):
        tokens, logprobs = generator.generate(
            prompts, max_gen_len=MAX_GEN_LEN, temperature=0, logprobs=True, echo=True
        )
        cases[name] = {"tokens": tokens, "logprobs": logprobs}
    return cases


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shape_ckpt(request, tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp(f"golden_{request.param}")
    return request.param, make_tiny_checkpoint(out, tokenizer=tiny_tokenizer, **SHAPES[request.param])


def assert_matches_golden(shape: str, cases) -> None:
    golden = json.loads(GOLDEN.read_text())[shape]
    for name, want in golden.items():
        got = cases[name]
        assert got["tokens"] == want["tokens"], f"{shape}/{name}: greedy tokens changed"
        for row_got, row_want in zip(got["logprobs"], want["logprobs"]):
            diff = (torch.tensor(row_got) - torch.tensor(row_want)).abs().max().item()
            assert diff <= 1e-5, f"{shape}/{name}: logprobs moved by {diff:.2e}"


@pytest.mark.parametrize("fast_layout", [False, True])
def test_generate_matches_golden(shape_ckpt, fast_layout):
    shape, ckpt = shape_ckpt
    assert_matches_golden(shape, run_cases(build(ckpt, fast_layout=fast_layout)))


@pytest.mark.parametrize("fast_layout", [False, True])
def test_greedy_tokens_without_logprobs_match_golden(shape_ckpt, fast_layout):
    # Without logprobs the prompt's logits are not all computed: a different path.
    shape, ckpt = shape_ckpt
    golden = json.loads(GOLDEN.read_text())[shape]["batch"]["tokens"]
    generator = build(ckpt, fast_layout=fast_layout)
    tokens, logprobs = generator.generate(PROMPTS, max_gen_len=MAX_GEN_LEN, temperature=0, echo=True)
    assert logprobs is None
    assert tokens == golden


def test_compiled_decode_step_matches_golden(tiny_tokenizer, tmp_path):
    # One shape only: compiling costs tens of seconds on two cores.
    ckpt = make_tiny_checkpoint(tmp_path, tokenizer=tiny_tokenizer, **SHAPES["tiny"])
    generator = build(ckpt, compile=True, fast_layout=True)
    assert generator.step.kind == "compiled"
    # One compilation per batch size, not per sequence length: another length
    # (a token slice with another row stride) must reuse the compiled step.
    graphs = counters["stats"]["unique_graphs"]
    generator.generate([PROMPTS[0][:3]], max_gen_len=7, temperature=0)
    generator.generate([PROMPTS[0]], max_gen_len=5, temperature=0)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert_matches_golden("tiny", run_cases(generator))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_compiled_decode_step_matches_eager(tiny_ckpt, dtype):
    # The compiled step under CUDA graphs: the static cache is written in
    # place between replays, and must give what the eager step gives.
    kwargs = dict(device="cuda", dtype=dtype)
    eager = run_cases(build(tiny_ckpt, **kwargs))
    compiled = run_cases(build(tiny_ckpt, compile=True, **kwargs))
    for name in eager:
        assert compiled[name]["tokens"] == eager[name]["tokens"], name
        for got, want in zip(compiled[name]["logprobs"], eager[name]["logprobs"]):
            diff = (torch.tensor(got) - torch.tensor(want)).abs().max().item()
            assert diff <= (1e-4 if dtype == torch.float32 else 5e-2), f"{name}: logprobs moved by {diff:.2e}"
    if dtype == torch.float32:
        golden = json.loads(GOLDEN.read_text())["tiny"]
        assert all(compiled[name]["tokens"] == golden[name]["tokens"] for name in golden)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_step_matches_eager(tiny_ckpt, dtype):
    # The eager step replayed from a CUDA graph: the same kernels on static
    # buffers, so the eager step's results; one capture per batch size.
    kwargs = dict(device="cuda", dtype=dtype)
    eager = run_cases(build(tiny_ckpt, **kwargs))
    generator = build(tiny_ckpt, cuda_graph=True, **kwargs)
    graphed = run_cases(generator)
    for name in eager:
        assert graphed[name]["tokens"] == eager[name]["tokens"], name
        for got, want in zip(graphed[name]["logprobs"], eager[name]["logprobs"]):
            diff = (torch.tensor(got) - torch.tensor(want)).abs().max().item()
            assert diff <= (1e-4 if dtype == torch.float32 else 5e-2), f"{name}: logprobs moved by {diff:.2e}"
    assert sorted(generator.step.one_token.graphs) == [1, len(PROMPTS)]
    again, _ = generator.generate([PROMPTS[0][:2]], max_gen_len=5, temperature=0)  # another length: no new graph
    assert len(generator.step.one_token.graphs) == 2
    assert again == build(tiny_ckpt, **kwargs).generate([PROMPTS[0][:2]], max_gen_len=5, temperature=0)[0]


def regenerate() -> None:
    import tempfile

    from llama.tiny import train_tokenizer

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.model"
        train_tokenizer(tok, vocab_size=512)
        for shape, kwargs in SHAPES.items():
            ckpt = make_tiny_checkpoint(Path(tmp) / shape, tokenizer=tok, **kwargs)
            out[shape] = run_cases(build(ckpt))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(out) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_decoding_golden.py --regenerate  (only on the reference-style code)")
    regenerate()

"""The one-token decoding step in C (llama/native.c): the eager forward's
numbers, the same KV cache, and a fallback that says why."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env
from llama import Llama, checkpoint, kernels, native
from llama.model import ModelArgs, Transformer
from llama.tiny import random_weights

pytestmark = pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")
# (test_fast_layout.py fails, naming the reason, where the library is missing:
# this file only checks the library that is there.)


def native_model(**shape) -> Transformer:
    from llama import distributed

    distributed.init_distributed(torch.device("cpu"), 1)
    args = ModelArgs(**shape)
    with checkpoint.init_on_meta():
        model = Transformer(args)
    checkpoint.load_into(model, random_weights(args, seed=3), torch.device("cpu"), torch.float32, source="random")
    model.setup_caches()
    kernels.prepare(model, "native")
    return model.eval()


SHAPES = {
    # grouped-query attention, every size a multiple of 16: the vector path
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=512),
    # sizes that are not (dim 40, head_dim 10, vocab 333): the remainder paths
    "odd": dict(dim=40, n_layers=2, n_heads=4, multiple_of=8, vocab_size=333),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bsz", [1, 3])
def test_native_step_gives_the_eager_logits_and_cache(shape, bsz):
    model = native_model(**SHAPES[shape], max_seq_len=16, max_batch_size=4)
    step = native.DecodeStep(model)
    tokens = torch.randint(0, SHAPES[shape]["vocab_size"], (bsz, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model.forward(tokens[:, :5], 0)
        for pos in range(5, 9):
            eager = model.forward(tokens[:, pos : pos + 1], pos)
            k, v = model.layers[-1].attention.cache_k.clone(), model.layers[-1].attention.cache_v.clone()
            model.layers[-1].attention.cache_k[:, :, pos] = 0  # the C step must write it again
            ours = step(tokens[:, pos : pos + 1], pos)
            assert ours.shape == eager.shape == (bsz, 1, SHAPES[shape]["vocab_size"])
            torch.testing.assert_close(ours, eager, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(model.layers[-1].attention.cache_k, k, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(model.layers[-1].attention.cache_v, v, atol=1e-6, rtol=1e-6)


def test_native_step_refuses_a_token_outside_the_vocabulary_and_a_position_outside_the_cache():
    model = native_model(**SHAPES["gqa"], max_seq_len=8, max_batch_size=2)
    step = native.DecodeStep(model)
    with torch.inference_mode():
        with pytest.raises(IndexError, match="outside the vocabulary of 512"):
            step(torch.tensor([[5], [512]]), 0)
        with pytest.raises(ValueError, match="position 8 is outside the cache"):
            step(torch.tensor([[5]]), 8)
        with pytest.raises(ValueError, match="batch 3"):
            step(torch.tensor([[5], [6], [7]]), 0)


def test_native_step_follows_weights_loaded_into_the_model(tiny_ckpt):
    generator = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=2)
    model, step = generator.model, generator._native_step
    assert step is not None
    shard = checkpoint.load_shard(tiny_ckpt / "consolidated.00.pth")
    token = torch.tensor([[7]])
    with torch.inference_mode():
        before = step(token, 0)
        doubled = {k: 2 * v if k == "output.weight" else v for k, v in shard.items()}
        model.load_state_dict(doubled, strict=True, assign=True)  # re-laid out: new tensors
        torch.testing.assert_close(step(token, 0), 2 * before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step(token, 0), model.forward(token, 0), atol=1e-5, rtol=1e-5)


def test_greedy_tokens_and_logprobs_match_the_eager_step(tiny_ckpt):
    generator = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=4)
    prompts = [[1, 100, 200, 300], [1, 42], [1, 7, 8, 9, 10, 11, 12, 13]]
    ours, ours_lp = generator.generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
    generator._native_step = None
    eager, eager_lp = generator.generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
    assert ours == eager
    for a, b in zip(ours_lp, eager_lp):
        assert a == pytest.approx(b, abs=1e-4)


def test_without_the_library_fp32_falls_back_to_torch_and_says_so_once(tiny_ckpt):
    probe = (
        "from llama import Llama\n"
        f"g = Llama.build({str(tiny_ckpt)!r}, {str(tiny_ckpt / 'tokenizer.model')!r}, max_seq_len=32, max_batch_size=1)\n"
        f"g = Llama.build({str(tiny_ckpt)!r}, {str(tiny_ckpt / 'tokenizer.model')!r}, max_seq_len=32, max_batch_size=1)\n"
        "print(g.model._prepared, g._native_step)\n"
        "print(g.generate([[1, 5, 9]], max_gen_len=6, temperature=0)[0])\n"
    )
    env = subprocess_env({"LLAMA_NATIVE": "0"})
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("llama:")]
    assert lines == ["llama: fp32 on the CPU decodes with torch's kernels, slower at batch 1: LLAMA_NATIVE=0 is set"]
    assert "transposed None" in proc.stdout
    generator = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1)
    assert str(generator.generate([[1, 5, 9]], max_gen_len=6, temperature=0)[0]) in proc.stdout


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 5])
def test_native_int4_product_is_the_dequantized_product(group, rows):
    from llama.kernels import NativeInt4Linear

    gen = torch.Generator().manual_seed(group + rows)
    out_features, in_features = 24, 128
    q = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scale = torch.rand(out_features, in_features // group, generator=gen) * 0.1 + 0.01
    zero = torch.randn(out_features, in_features // group, generator=gen) * 0.1
    nibbles = q[:, 0::2] | (q[:, 1::2] << 4)
    kernel = NativeInt4Linear(nibbles, scale, zero, group)
    # The kernel keeps each group's scale and offset (zero - 8 scale) in fp16: w = q scale + offset.
    scale16, offset16 = scale.half().float(), (zero - 8 * scale).half().float()
    weight = (q.float().view(out_features, -1, group) * scale16[..., None] + offset16[..., None]).view(out_features, -1)
    x = torch.randn(rows, 3, in_features, generator=gen)
    torch.testing.assert_close(kernel(x), torch.nn.functional.linear(x, weight), atol=2e-5, rtol=2e-5)
    # ... which moves a weight by at most fp16's rounding of q scale and of the offset (2^-11 of each)
    exact = ((q.float() - 8).view(out_features, -1, group) * scale[..., None] + zero[..., None]).view(out_features, -1)
    bound = 2**-11 * (15 * scale + (zero - 8 * scale).abs()).repeat_interleave(group, dim=1)
    assert ((weight - exact).abs() <= bound * 1.01).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_models_run_the_native_step_in_fp32(tiny_ckpt, mode):
    generator = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=3,
                            quantize=mode)
    model = generator.model
    assert model.tok_embeddings.weight.dtype == torch.float32  # the CPU default with the C step
    assert isinstance(generator._native_step, native.DecodeStep)
    tokens = torch.randint(3, 500, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model.forward(tokens[:, :6], 0)
        for pos in range(6, 9):
            eager = model.forward(tokens[:, pos : pos + 1], pos)
            torch.testing.assert_close(generator._native_step(tokens[:, pos : pos + 1], pos), eager,
                                       atol=2e-5, rtol=2e-5)
    ours = generator.generate([[1, 100, 200], [1, 5]], max_gen_len=12, temperature=0)[0]
    generator._native_step = None
    assert generator.generate([[1, 100, 200], [1, 5]], max_gen_len=12, temperature=0)[0] == ours


def test_int8_prompts_run_the_c_product_with_fp32_activations(monkeypatch):
    from llama.kernels import Int8Linear

    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-127, 128, (20, 48), generator=gen, dtype=torch.int8)
    scale = torch.rand(20, generator=gen) * 0.01
    kernel = Int8Linear(q, scale, torch.float32)
    x = torch.randn(2, 7, 48, generator=gen)
    want = torch.nn.functional.linear(x, q.float() * scale[:, None])
    torch.testing.assert_close(kernel(x), want, atol=2e-5, rtol=2e-5)
    calls = []
    real = native.matmul
    monkeypatch.setattr(native, "matmul", lambda *args: calls.append(args) or real(*args))
    kernel(x)
    assert len(calls) == 1  # not torch._weight_int8pack_mm, ~6x slower with fp32 inputs


def test_bf16_model_runs_the_native_step_within_bf16_rounding(tiny_ckpt):
    generator = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=3,
                            dtype=torch.bfloat16)
    model = generator.model
    assert model._prepared == "rows" and model.layers[0].attention.qkv_kernel is None
    assert isinstance(generator._native_step, native.DecodeStep)
    tokens = torch.randint(3, 500, (3, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        model.forward(tokens[:, :6], 0)
        for pos in range(6, 9):
            eager = model.forward(tokens[:, pos : pos + 1], pos)
            k = model.layers[-1].attention.cache_k[:, :, pos].clone()
            ours = generator._native_step(tokens[:, pos : pos + 1], pos)
            # Two bf16 computations: a value of ~11 is within a few of its bf16 steps (0.0625).
            torch.testing.assert_close(ours, eager, atol=0.25, rtol=0)
            assert (ours.argmax(-1) == eager.argmax(-1)).all()
            assert model.layers[-1].attention.cache_k.dtype == torch.bfloat16
            torch.testing.assert_close(model.layers[-1].attention.cache_k[:, :, pos], k, atol=0.05, rtol=0.02)


def test_a_missing_library_is_named_in_the_reason(monkeypatch):
    # As on a machine where pip install -e . found no C compiler (the build is optional).
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setattr(native, "library_path", lambda: None)
    assert not native.available()
    assert native.unavailable_reason() == (
        "llama/native.c was not compiled (pip install -e . compiles it where a C compiler is found)"
    )
    from llama import kernels

    assert kernels.choose_layout(torch.device("cpu"), torch.float32) == "transposed"


def build_portable_library(out) -> None:
    """native.c compiled without -march=native (on x86-64, for the baseline x86-64: no AVX-512), so
    the plain C loops that machines without AVX-512 run are checked on this one too."""
    import platform
    import shutil

    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "no C compiler, yet the library was compiled"
    flags = ["-march=x86-64"] if platform.machine() in ("x86_64", "AMD64") else []
    subprocess.run([compiler, "-O2", "-std=c11", "-fopenmp", "-fPIC", "-shared", *flags,
                    str(REPO / "llama" / "native.c"), "-o", str(out)], check=True)


@pytest.mark.parametrize("options", [{}, {"dtype": torch.bfloat16}, {"quantize": "int8"},
                                     {"quantize": "int4"}], ids=["fp32", "bf16", "int8", "int4"])
def test_the_portable_loops_compute_what_the_vector_ones_do(tiny_ckpt, tmp_path, monkeypatch, options):
    def steps():
        generator = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=32,
                                max_batch_size=2, **options)
        assert isinstance(generator._native_step, native.DecodeStep)
        tokens = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(7))
        with torch.inference_mode():
            out = [generator.model.forward(tokens[:, :5], 0)[:, -1]]  # prompts: int8 and int4 in C too
            out += [generator._native_step(tokens[:, p : p + 1], p)[:, -1] for p in range(5, 8)]
        return torch.stack(out).float()

    vector = steps()
    portable = tmp_path / "_native_portable.so"
    build_portable_library(portable)
    monkeypatch.setattr(native, "library_path", lambda: portable)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    assert native._load()._name == str(portable)
    # The same sums in another order (bf16: rounded to bf16 at the same places, within a few bf16 steps)
    torch.testing.assert_close(steps(), vector, atol=0.1 if options.get("dtype") else 1e-4, rtol=0)

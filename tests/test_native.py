"""The one-token decoding step in C (llama/native.c): the eager forward's
numbers, the same KV cache, and a fallback that says why; each kernel variant
this CPU can run (avx512bf16, avx512, avx2, portable), chosen as
LLAMA_NATIVE_ISA chooses it."""

import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig

import pytest
import torch

from conftest import REPO, subprocess_env
from llama import Llama, checkpoint, kernels, native
from llama.model import ModelArgs, Transformer
from llama.tiny import make_tiny_checkpoint, random_weights
from llama.decode_step import DecodeStep

pytestmark = pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")
# (test_fast_layout.py fails, naming the reason, where the library is missing:
# this file only checks the library that is there.)

VARIANTS = native.variants()  # the kernels this CPU can run, fastest first


@pytest.fixture
def use_kernels(monkeypatch):
    """use_kernels(name): the C step runs variant `name` from then on, as LLAMA_NATIVE_ISA=name
    chooses it when the library loads; the choice of the environment comes back afterwards."""

    def use(name: str) -> None:
        monkeypatch.setenv(native.ISA_VARIABLE, name)
        monkeypatch.setattr(native, "_lib", None)
        monkeypatch.setattr(native, "_reason", None)
        assert native.variant() == name

    yield use
    monkeypatch.undo()
    native._choose_variant(native._load())  # one library a process: its choice is global


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


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bsz", [1, 3])
def test_native_step_gives_the_eager_logits_and_cache(shape, bsz, variant, use_kernels):
    use_kernels(variant)
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
    model, step = generator.model, generator.step.one_token
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
    generator.step = DecodeStep(generator.model)  # eager
    eager, eager_lp = generator.generate(prompts, max_gen_len=20, temperature=0, logprobs=True)
    assert ours == eager
    for a, b in zip(ours_lp, eager_lp):
        assert a == pytest.approx(b, abs=1e-4)


def decode_in_a_process(ckpt, env=None, library=None):
    """A process that builds the tiny model twice and decodes greedily, with `env` set and the library
    read from `library` (default: the installed one): (its lines on stderr that start with "llama:",
    what it reports: the layout, whether the C step ran, its kernels and the tokens)."""
    probe = (
        "import json\n"
        "from pathlib import Path\n"
        "from llama import Llama, native\n"
        + ("" if library is None else f"native.library_path = lambda: Path({str(library)!r})\n")
        + f"g = Llama.build({str(ckpt)!r}, {str(ckpt / 'tokenizer.model')!r}, max_seq_len=32, max_batch_size=1)\n"
        f"g = Llama.build({str(ckpt)!r}, {str(ckpt / 'tokenizer.model')!r}, max_seq_len=32, max_batch_size=1)\n"
        "tokens = g.generate([[1, 5, 9]], max_gen_len=6, temperature=0)[0][0]\n"
        "print(json.dumps(dict(layout=g.model.weight_layout, native=g.step.kind == 'native',\n"
        "                      variant=native.variant(), tokens=tokens)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=subprocess_env(env), capture_output=True,
                          text=True, timeout=120)
    for name in ("SIGBUS", "SIGILL"):  # a library cut short; kernels this CPU cannot run
        assert proc.returncode != -getattr(signal, name), f"the process died of {name}"
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("llama:")]
    return lines, json.loads(proc.stdout.strip().splitlines()[-1])


def tokens_here(ckpt):
    """The greedy tokens of `decode_in_a_process`, decoded in this process."""
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1)
    return generator.generate([[1, 5, 9]], max_gen_len=6, temperature=0)[0][0]


def test_without_the_library_fp32_falls_back_to_torch_and_says_so_once(tiny_ckpt):
    lines, ran = decode_in_a_process(tiny_ckpt, env={"LLAMA_NATIVE": "0"})
    assert lines == ["llama: fp32 on the CPU decodes with torch's kernels, slower at batch 1: LLAMA_NATIVE=0 is set"]
    assert (ran["layout"], ran["native"], ran["tokens"]) == ("transposed", False, tokens_here(tiny_ckpt))


def end_of_program_headers(library: bytes) -> int:
    """Where the program header table of a 64-bit little-endian ELF file ends."""
    assert library[:6] == b"\x7fELF\x02\x01", "the test reads 64-bit little-endian ELF headers"
    (phoff,) = struct.unpack_from("<Q", library, 32)
    phentsize, phnum = struct.unpack_from("<HH", library, 54)
    return phoff + phentsize * phnum


def stub_library(tmp_path, source: str) -> bytes:
    """The bytes of a shared library compiled from the C `source`."""
    compiler = shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler to build a stub library with")
    (tmp_path / "stub.c").write_text(source)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / "stub.so"), str(tmp_path / "stub.c")],
                   check=True, capture_output=True)
    return (tmp_path / "stub.so").read_bytes()


@pytest.mark.parametrize(
    "damage",
    ["cut past the program headers", "cut to 20%", "cut to 60%", "one byte short", "empty", "garbage",
     "without the entry points", "of an older ABI"],
)
def test_a_bad_library_file_falls_back_to_torch_with_one_line(tiny_ckpt, tmp_path, damage):
    # A copy or install cut short passes the loader's own checks, and touching a missing page
    # then killed the process with SIGBUS: the file's size is checked against its ELF headers.
    installed = native.library_path()
    whole = installed.read_bytes()
    cuts = {"cut past the program headers": end_of_program_headers(whole) + 64, "cut to 20%": len(whole) // 5,
            "cut to 60%": len(whole) * 3 // 5, "one byte short": len(whole) - 1}
    reinstall = re.escape(": run pip install -e . again")
    if damage in cuts:
        content = whole[: cuts[damage]]
        reason = rf"is cut short \({len(content)} bytes of the \d+ its ELF headers describe\){reinstall}"
    elif damage == "empty":
        content, reason = b"", r"did not load \(.*file too short\)"
    elif damage == "garbage":
        content, reason = bytes(range(256)) * 40, r"did not load \(.*invalid ELF header\)"
    elif damage == "without the entry points":
        content = stub_library(tmp_path, "int unrelated(void) { return 0; }\n")
        reason = r"did not load \(.*undefined symbol: llama_native_abi\)"
    else:
        content = stub_library(tmp_path, "long long llama_native_abi(void) { return 5; }\n")
        reason = rf"is from another version of llama \(ABI 5, not {native.ABI}\){reinstall}"
    library = tmp_path / installed.name
    library.write_bytes(content)
    lines, ran = decode_in_a_process(tiny_ckpt, library=library)
    prefix = "llama: fp32 on the CPU decodes with torch's kernels, slower at batch 1: "
    assert len(lines) == 1 and re.fullmatch(re.escape(prefix + installed.name + " ") + reason, lines[0]), lines
    assert (ran["layout"], ran["native"], ran["tokens"]) == ("transposed", False, tokens_here(tiny_ckpt))


def int4_kernel(q, scale, zero, group):
    """(the NativeInt4Linear of q uint8 in 0..15, scale and zero; the scale and the offset
    zero - 8 scale as it keeps them, in fp16; its weights w = q scale + offset)."""
    from llama.kernels import NativeInt4Linear

    kernel = NativeInt4Linear(q[:, 0::2] | (q[:, 1::2] << 4), scale, zero, group)
    scale16, offset16 = scale.half().float(), (zero - 8 * scale).half().float()
    weight = (q.float().view(q.shape[0], -1, group) * scale16[..., None] + offset16[..., None]).view(q.shape[0], -1)
    return kernel, scale16, offset16, weight


def int4_weights(out_features, in_features, group, gen):
    """Random (q, scale, zero) of an int4 matrix."""
    q = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scale = torch.rand(out_features, in_features // group, generator=gen) * 0.1 + 0.01
    zero = torch.randn(out_features, in_features // group, generator=gen) * 0.1
    return q, scale, zero


def int4_product(x, q, scale16, offset16, group):
    """What C's int4 product computes (native_kernels.h, i4_tiles), its sums in float64: each group
    of x quantized to int8 as quantize_x does (in fp32: step top / 127, x * (127 / top) rounded
    half to even), the integer sums centred on q - 8, then y = sum over groups of
    scale (d sum (q - 8) xq + 8 xs) + offset xs, xs the group's sum of x."""
    xg = x.reshape(*x.shape[:-1], -1, group)
    top = xg.abs().amax(-1, keepdim=True)
    inverse = torch.where(top > 0, torch.tensor(127.0) / top, torch.zeros_like(top))
    xq = torch.round(xg * inverse).double()
    d, xs = (top / 127).double(), xg.double().sum(-1, keepdim=True)
    qg = q.double().view(q.shape[0], -1, group) - 8  # (out, groups, group)
    sums = torch.einsum("...gk,ogk->...og", xq, qg)  # (..., out, groups)
    inner = sums * d.squeeze(-1)[..., None, :] + 8 * xs.squeeze(-1)[..., None, :]
    return (scale16.double() * inner + offset16.double() * xs.squeeze(-1)[..., None, :]).sum(-1).float()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 5])
def test_native_int4_product_takes_x_quantized_per_group(group, rows, variant, use_kernels):
    use_kernels(variant)
    gen = torch.Generator().manual_seed(group + rows)
    out_features, in_features = 24, 128  # a tile and a half: the last one's rows 24 .. 31 are padding
    q, scale, zero = int4_weights(out_features, in_features, group, gen)
    kernel, scale16, offset16, weight = int4_kernel(q, scale, zero, group)
    x = torch.randn(rows, 3, in_features, generator=gen)
    y = kernel(x)
    torch.testing.assert_close(y, int4_product(x, q, scale16, offset16, group), atol=2e-5, rtol=2e-5)
    # Against x unquantized: each input moves by at most half its group's step d, and multiplies
    # w - zero = (q - 8) scale (the zero multiplies the exact sum of x).
    d = x.view(rows, 3, -1, group).abs().amax(-1) / 127  # (rows, 3, groups)
    centred = ((q.float() - 8).view(out_features, -1, group) * scale16[..., None]).abs().sum(-1)  # (out, groups)
    bound = (d[..., None, :] / 2 * centred).sum(-1)
    assert ((y - torch.nn.functional.linear(x, weight)).abs() <= bound * 1.001 + 1e-5).all()
    # ... where fp16 moved each weight by at most its rounding of q scale and of the offset (2^-11 of each)
    exact = ((q.float() - 8).view(out_features, -1, group) * scale[..., None] + zero[..., None]).view(out_features, -1)
    fp16 = 2**-11 * (15 * scale + (zero - 8 * scale).abs()).repeat_interleave(group, dim=1)
    assert ((weight - exact).abs() <= fp16 * 1.01).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_native_int4_sums_hold_the_largest_values_and_keep_nan(variant, use_kernels):
    # q = 15 against xq = 127 all along a group: the largest sums the int16 partial sums of the
    # vector kernels hold (8 pairs of 2 x 15 x 127 = 30480, below 32767) must come out exact.
    use_kernels(variant)
    group, in_features = 64, 128
    q, scale, zero = int4_weights(16, in_features, group, torch.Generator().manual_seed(3))
    q[:8] = 15
    kernel, scale16, offset16, _ = int4_kernel(q, scale, zero, group)
    x = torch.stack([torch.ones(in_features), -torch.ones(in_features), torch.randn(in_features)])
    torch.testing.assert_close(kernel(x), int4_product(x, q, scale16, offset16, group), atol=1e-4, rtol=1e-5)
    for bad in (float("nan"), float("inf")):
        x[2, 70] = bad
        y = kernel(x)
        assert torch.isnan(y[2]).all() and torch.isfinite(y[:2]).all(), bad


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_models_run_the_native_step_in_fp32(tiny_ckpt, mode, variant, use_kernels):
    use_kernels(variant)
    generator = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=3,
                            quantize=mode)
    model = generator.model
    assert model.tok_embeddings.weight.dtype == torch.float32  # the CPU default with the C step
    assert isinstance(generator.step.one_token, native.DecodeStep)
    tokens = torch.randint(3, 500, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model.forward(tokens[:, :6], 0)
        for pos in range(6, 9):
            eager = model.forward(tokens[:, pos : pos + 1], pos)
            torch.testing.assert_close(generator.step.one_token(tokens[:, pos : pos + 1], pos), eager,
                                       atol=2e-5, rtol=2e-5)
    ours = generator.generate([[1, 100, 200], [1, 5]], max_gen_len=12, temperature=0)[0]
    generator.step = DecodeStep(generator.model)  # eager
    assert generator.generate([[1, 100, 200], [1, 5]], max_gen_len=12, temperature=0)[0] == ours


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_prompts_run_the_c_product_with_fp32_activations(monkeypatch, variant, use_kernels):
    use_kernels(variant)
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-127, 128, (20, 48), generator=gen, dtype=torch.int8)
    scale = torch.rand(20, generator=gen) * 0.01
    kernel = kernels.quantized_kernel("int8", q, scale, None, None, torch.float32)
    x = torch.randn(2, 7, 48, generator=gen)
    want = torch.nn.functional.linear(x, q.float() * scale[:, None])
    torch.testing.assert_close(kernel(x), want, atol=2e-5, rtol=2e-5)
    calls = []
    real = native.matmul
    monkeypatch.setattr(native, "matmul", lambda *args: calls.append(args) or real(*args))
    kernel(x)
    assert len(calls) == 1  # not torch._weight_int8pack_mm, ~6x slower with fp32 inputs


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_model_runs_the_native_step_within_bf16_rounding(tiny_ckpt, variant, use_kernels):
    use_kernels(variant)
    generator = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=3,
                            dtype=torch.bfloat16)
    model = generator.model
    assert model.weight_layout == "rows" and isinstance(model.layers[0].attention.qkv_kernel, kernels.FusedLinear)
    assert isinstance(generator.step.one_token, native.DecodeStep)
    tokens = torch.randint(3, 500, (3, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        model.forward(tokens[:, :6], 0)
        for pos in range(6, 9):
            eager = model.forward(tokens[:, pos : pos + 1], pos)
            k = model.layers[-1].attention.cache_k[:, :, pos].clone()
            ours = generator.step.one_token(tokens[:, pos : pos + 1], pos)
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


MODES = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "int8": {"quantize": "int8"}, "int4": {"quantize": "int4"}}


def decode(ckpt, options):
    """Logits of a two-row prompt (eager; int8 and int4 products in C) and of three C steps after it."""
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=2, **options)
    assert isinstance(generator.step.one_token, native.DecodeStep)
    tokens = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        out = [generator.model.forward(tokens[:, :5], 0)[:, -1]]
        out += [generator.step.one_token(tokens[:, p : p + 1], p)[:, -1] for p in range(5, 8)]
    return torch.stack(out).float()


@pytest.mark.parametrize("mode", MODES)
def test_every_variant_computes_what_the_fastest_does(tiny_ckpt, use_kernels, mode):
    # The same sums in another order (bf16: rounded to bf16 at the same places, within a few bf16 steps).
    if len(VARIANTS) < 2:
        pytest.skip(f"this CPU runs one variant of the kernels only ({VARIANTS})")
    fastest = decode(tiny_ckpt, MODES[mode])
    for variant in VARIANTS[1:]:
        use_kernels(variant)
        torch.testing.assert_close(decode(tiny_ckpt, MODES[mode]), fastest, atol=0.1 if mode == "bf16" else 1e-4,
                                   rtol=0, msg=lambda text: f"{variant} against {VARIANTS[0]}: {text}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_decodes_the_golden_tokens(tiny_tokenizer, tiny_ckpt, tmp_path, use_kernels, variant):
    # tests/golden: the reference code's greedy tokens (and logprobs within 1e-5) on two shapes, and
    # test_generation.py's greedy tokens of the tiny checkpoint.
    from test_decoding_golden import SHAPES as GOLDEN_SHAPES
    from test_decoding_golden import assert_matches_golden, build, run_cases
    from test_generation import GOLDEN, GOLDEN_GEN_LEN, GOLDEN_PROMPTS

    use_kernels(variant)
    for shape, kwargs in GOLDEN_SHAPES.items():
        generator = build(make_tiny_checkpoint(tmp_path / shape, tokenizer=tiny_tokenizer, **kwargs))
        assert generator.step.kind == "native"
        assert_matches_golden(shape, run_cases(generator))
    generator = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=8)
    tokens, _ = generator.generate(GOLDEN_PROMPTS, max_gen_len=GOLDEN_GEN_LEN, temperature=0)
    assert tokens == json.loads(GOLDEN.read_text())["tokens"]


def run_with_kernels(ckpt, name: str):
    """`decode_in_a_process` with LLAMA_NATIVE_ISA=name: (its "llama:" lines, the variant that ran, the tokens)."""
    lines, ran = decode_in_a_process(ckpt, env={native.ISA_VARIABLE: name})
    assert ran["native"]
    return lines, ran["variant"], ran["tokens"]


def test_kernels_other_than_the_fastest_are_said_once(tiny_ckpt):
    if len(VARIANTS) < 2:
        pytest.skip(f"this CPU runs one variant of the kernels only ({VARIANTS})")
    lines, ran, tokens = run_with_kernels(tiny_ckpt, VARIANTS[-1])
    assert lines == [f"llama: the C step runs its {VARIANTS[-1]} kernels (LLAMA_NATIVE_ISA={VARIANTS[-1]}); "
                     f"this CPU's fastest are {VARIANTS[0]}"]
    assert ran == VARIANTS[-1]
    assert run_with_kernels(tiny_ckpt, VARIANTS[0]) == ([], VARIANTS[0], tokens)  # the fastest: nothing said


def test_kernels_the_cpu_cannot_run_are_refused_and_the_fastest_run(tiny_ckpt):
    # A library holds kernels for CPUs beyond this one (AVX-512 on an AVX2 CPU): naming them must not
    # end in an illegal instruction at the first step, but in the fastest this CPU has, said once.
    compiled = native._load().llama_native_variants().decode().split(",")
    beyond = [name for name in compiled if name not in VARIANTS]
    if not beyond:
        pytest.skip(f"this CPU runs every variant compiled in ({compiled})")
    expected = tokens_here(tiny_ckpt)
    for name in beyond:
        lines, ran, tokens = run_with_kernels(tiny_ckpt, name)
        assert lines == [f"llama: LLAMA_NATIVE_ISA={name} is refused: this CPU cannot run them; "
                         f"the C step runs its {VARIANTS[0]} kernels"]
        assert (ran, tokens) == (VARIANTS[0], expected), name
    lines, ran, _ = run_with_kernels(tiny_ckpt, "sse9")
    assert lines == [f"llama: LLAMA_NATIVE_ISA=sse9 is refused: there are none of that name (there are "
                     f"{','.join(compiled)}); the C step runs its {VARIANTS[0]} kernels"]
    assert ran == VARIANTS[0]


def test_one_build_holds_every_variant_and_no_march_flag():
    # setup.py compiles for the architecture's baseline: the instructions of each variant come from
    # its functions' target attributes, so that the library runs on every CPU of the architecture.
    import ast
    import platform

    flags = [ast.literal_eval(node.value) for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
             if isinstance(node, ast.keyword) and node.arg == "extra_compile_args"]
    assert flags and not any(flag.startswith(("-march", "-mavx", "-mtune")) for flag in flags[0])
    compiled = native._load().llama_native_variants().decode().split(",")
    x86 = platform.machine() in ("x86_64", "AMD64")
    assert compiled == (["avx512bf16", "avx512", "avx2", "portable"] if x86 else ["portable"])
    assert VARIANTS == [name for name in compiled if name in VARIANTS] and VARIANTS[-1] == "portable"


@pytest.mark.parametrize("shape", SHAPES)
def test_the_step_gives_the_same_logits_on_any_thread_count(shape, monkeypatch):
    """Each product's rows and each head's attention are split across threads, never a sum:
    so the count the step runs on (LLAMA_NATIVE_THREADS, or ThreadCount's choice) changes no bit."""
    model = native_model(**SHAPES[shape], max_seq_len=16, max_batch_size=4)
    tokens = torch.randint(0, SHAPES[shape]["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(2))
    logits = {}
    for threads in ("1", "2", "3"):
        monkeypatch.setenv(native.THREADS_VARIABLE, threads)
        step = native.DecodeStep(model)
        with torch.inference_mode():
            model.forward(tokens[:, :5], 0)
            logits[threads] = step(tokens[:, 5:6], 5)
    assert torch.equal(logits["1"], logits["2"]) and torch.equal(logits["1"], logits["3"])


def test_a_bad_thread_count_in_the_environment_is_named(monkeypatch):
    model = native_model(**SHAPES["gqa"], max_seq_len=8, max_batch_size=1)
    for text in ("0", "two", "-1"):
        monkeypatch.setenv(native.THREADS_VARIABLE, text)
        with pytest.raises(ValueError, match=f"LLAMA_NATIVE_THREADS={text!r}: expected a whole number"):
            native.DecodeStep(model)


def test_the_step_leaves_torchs_thread_count_as_it_was(monkeypatch):
    model = native_model(**SHAPES["gqa"], max_seq_len=8, max_batch_size=1)
    before = torch.get_num_threads()
    monkeypatch.setenv(native.THREADS_VARIABLE, "1")
    with torch.inference_mode():
        native.DecodeStep(model)(torch.tensor([[5]]), 0)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("product", ["torch", "c"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_prompt_takes_the_weights_made_fp32_a_block_at_a_time(mode, product, monkeypatch):
    """Where torch multiplies prompts (LLAMA_NATIVE_PROMPT=torch), from PROMPT_ROWS rows of x on the
    product converts W's rows to fp32 once, a block at a time, for torch's matrix product: x times
    those weights, to fp32 rounding, across blocks and a last, partial int4 tile (int4's one-row
    path takes x quantized per group instead, int4_product). Where C does, no block is made, and
    each row's sums are its one-row product's, bit for bit."""

    monkeypatch.setenv(native.PROMPT_VARIABLE, product)

    gen = torch.Generator().manual_seed(5)
    out_features, in_features, group = 72, 96, 32  # four and a half int4 tiles
    if mode == "int8":
        q = torch.randint(-127, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
        scale = torch.rand(out_features, generator=gen) * 0.01
        kernel = kernels.quantized_kernel("int8", q, scale, None, None, torch.float32)
        weight = q.float() * scale[:, None]
    else:
        q, scale, zero = int4_weights(out_features, in_features, group, gen)
        kernel, scale16, offset16, weight = int4_kernel(q, scale, zero, group)
    x = torch.randn(2, native.PROMPT_ROWS, in_features, generator=gen)
    # what C's product computes: int4 takes x quantized per group (int4_product)
    c_product = (torch.nn.functional.linear(x, weight) if mode == "int8"
                 else int4_product(x, q, scale16, offset16, group))
    monkeypatch.setattr(native, "_BLOCK_FLOATS", 32 * in_features)  # blocks of 32 rows: 32, 32, 8
    calls = []
    real = native._dequantized_product
    monkeypatch.setattr(native, "_dequantized_product", lambda *args: calls.append(1) or real(*args))
    blocked = kernel(x)
    rows = [kernel(x[:, i:i + 1]) for i in range(4)]  # one row at a time: the C product
    torch.testing.assert_close(torch.cat(rows, dim=1), c_product[:, :4], atol=2e-5, rtol=2e-5)
    if product == "torch":
        assert len(calls) == 1, "a prompt of PROMPT_ROWS rows did not take the fp32 blocks once"
        torch.testing.assert_close(blocked, torch.nn.functional.linear(x, weight), atol=2e-5, rtol=2e-5)
    else:
        torch.testing.assert_close(blocked, c_product, atol=2e-5, rtol=2e-5)
        assert not calls, "the C product made fp32 blocks"
        assert torch.equal(blocked[:, :4], torch.cat(rows, dim=1))


def test_the_prompt_product_follows_the_variable_and_else_the_cpu(monkeypatch, capsys):
    """LLAMA_NATIVE_PROMPT=c|torch picks who multiplies prompts; another value is refused with one
    line, once; unset, C on AMD CPUs running AVX-512 kernels (where it measured faster), else torch."""
    for value in ("c", "torch"):
        monkeypatch.setenv(native.PROMPT_VARIABLE, value)
        assert native.prompt_product() == value
    monkeypatch.delenv(native.PROMPT_VARIABLE)
    for vendor, variant, want in [("AuthenticAMD", "avx512bf16", "c"), ("AuthenticAMD", "avx512", "c"),
                                  ("AuthenticAMD", "avx2", "torch"), ("GenuineIntel", "avx512bf16", "torch"),
                                  (None, "avx512", "torch"), ("AuthenticAMD", None, "torch")]:
        monkeypatch.setattr(native, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(native, "variant", lambda: variant)
        assert native.prompt_product() == want, (vendor, variant)
    monkeypatch.setattr(native, "_prompt_notice", None)
    monkeypatch.setenv(native.PROMPT_VARIABLE, "gpu")
    assert native.prompt_product() == "torch"  # the last CPU above
    assert native.prompt_product() == "torch"
    err = capsys.readouterr().err
    assert err.count("LLAMA_NATIVE_PROMPT=gpu is refused: it takes c or torch") == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_prompts_run_the_c_product_where_chosen(monkeypatch, variant, use_kernels):
    """With LLAMA_NATIVE_PROMPT=c an fp32 model in the C step's layout multiplies a prompt in C: the
    logits of torch's products to fp32 rounding, each row's products the same bits as in a
    shorter prompt (its sums are its own), one row of x (the last position's logits) too."""
    use_kernels(variant)
    model = native_model(**SHAPES["odd"], max_seq_len=32, max_batch_size=2)
    tokens = torch.randint(0, 333, (2, 11), generator=torch.Generator().manual_seed(8))
    calls = []
    real = native.dense_matmul
    monkeypatch.setattr(native, "dense_matmul", lambda *args: calls.append(args) or real(*args))
    logits = {}
    with torch.inference_mode():
        for product in ("torch", "c"):
            monkeypatch.setenv(native.PROMPT_VARIABLE, product)
            logits[product] = model.forward(tokens, 0)
            assert bool(calls) == (product == "c")
        kernel = model.layers[0].feed_forward.w13_kernel
        x = torch.randn(1, 9, kernel.layers[0].weight.shape[1], generator=torch.Generator().manual_seed(9))
        assert torch.equal(kernel(x)[:, :4], kernel(x[:, :4]))
        assert torch.equal(kernel(x)[:, 2:3], kernel(x[:, 2:3]))  # one row of x: C, the same bits
        calls.clear()
        model.forward(tokens[:1], 0, last_logits_only=True)
        assert len(calls) == 4 * 2 + 1  # every product, the output's one row included
    torch.testing.assert_close(logits["c"], logits["torch"], atol=2e-5, rtol=2e-5)


def test_a_bf16_prompt_on_a_cpu_without_bf16_arithmetic_runs_widened_to_fp32(monkeypatch):
    """Where the CPU has no bf16 arithmetic, the bf16 rows layout's prompts multiply fp32 copies
    of the weights (torch's bf16 product is slow there) and round once to bf16: the logits of
    Meta's bf16 products (F.linear in bf16), to bf16 rounding; one-row steps keep x @ fused."""
    from llama import distributed

    monkeypatch.setattr(kernels, "mkldnn_bf16_available", lambda: False)
    monkeypatch.setattr(native, "_BLOCK_FLOATS", 16 * 64)  # blocks of 16 rows: several a matrix
    distributed.init_distributed(torch.device("cpu"), 1)
    shape = dict(SHAPES["gqa"], max_seq_len=80, max_batch_size=1)
    models = {}
    for layout in ("meta", "native"):
        args = ModelArgs(**shape)
        with checkpoint.init_on_meta():
            model = Transformer(args)
        checkpoint.load_into(model, random_weights(args, seed=3), torch.device("cpu"), torch.bfloat16,
                             source="random")
        model.setup_caches()
        kernels.prepare(model, layout)
        models[layout] = model.eval()
    assert isinstance(models["native"].layers[0].attention.qkv_kernel, kernels.WidenedBf16Linear)
    tokens = torch.randint(0, shape["vocab_size"], (1, native.PROMPT_ROWS + 3), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        meta, widened = (models[k].forward(tokens, 0) for k in ("meta", "native"))
    assert widened.dtype == meta.dtype
    torch.testing.assert_close(widened, meta, atol=0.05, rtol=0.02)
    assert (widened.argmax(-1) == meta.argmax(-1)).float().mean() > 0.9

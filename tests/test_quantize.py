"""Weight-only quantization (llama/quantization.py) and the kernels that run it (llama/kernels.py)."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_torchrun
from llama import Llama, kernels, quantization
from llama import quantize as quantize_cli
from llama.model import ModelArgs
from llama.reshard import reshard
from quant_worker import MODES, run


def build(ckpt_dir, **kwargs) -> Llama:
    return Llama.build(str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), max_seq_len=64, max_batch_size=2,
                       **kwargs)


def test_int8_roundtrip_and_kernel():
    torch.manual_seed(0)
    w = torch.randn(48, 64) / 8
    parts = quantization.quantize_tensor("layers.0.attention.wq.weight", w, quantization.make_config("int8"))
    q, scale = parts["layers.0.attention.wq.weight"], parts["layers.0.attention.wq.weight_scale"]
    assert q.dtype == torch.int8 and scale.shape == (48,)
    approx = quantization.dequantize(parts, "layers.0.attention.wq.weight", quantization.make_config("int8"))
    # Round to nearest: off by at most half a step of each row.
    assert ((approx - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 64)
    torch.testing.assert_close(kernels.Int8Linear(q, scale, torch.float32)(x), F.linear(x, approx),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_roundtrip_and_kernel(group_size):
    torch.manual_seed(0)
    w = torch.randn(32, 128) / 8
    config = quantization.make_config("int4", group_size)
    parts = quantization.quantize_tensor("output.weight", w, config)
    nibbles = parts["output.weight"]
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (32, 64)
    scale = parts["output.weight_scale"]
    assert scale.shape == (32, 128 // group_size)
    approx = quantization.dequantize(parts, "output.weight", config)
    step = scale.repeat_interleave(group_size, dim=1)
    assert ((approx - w).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(3, 128)
    kernel = kernels.Int4Linear(nibbles, scale, parts["output.weight_zero"], group_size, torch.float32)
    torch.testing.assert_close(kernel(x), F.linear(x, approx), atol=1e-3, rtol=1e-3)


def test_unknown_quantize_and_bad_group_sizes_are_clear_errors(tiny_ckpt):
    with pytest.raises(ValueError, match="unknown quantize='int3'"):
        build(tiny_ckpt, quantize="int3")
    with pytest.raises(ValueError, match="group_size must be one of 32, 64, 128, 256"):
        build(tiny_ckpt, quantize="int4", group_size=48)
    with pytest.raises(ValueError, match="group_size is for int4"):
        build(tiny_ckpt, quantize="int8", group_size=64)
    # dim 64: group 128 does not divide the inputs of q/k/v, w1 and w3.
    with pytest.raises(ValueError, match="int4 group size 128 does not divide dim = 64; group sizes that fit: 32, 64"):
        build(tiny_ckpt, quantize="int4", group_size=128)


def test_group_size_must_divide_each_ranks_part():
    # wo's 64 inputs are 32 a rank on two ranks: group 64 fits one process, not two.
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, multiple_of=32, vocab_size=512)
    config = quantization.make_config("int4", 64)
    quantization.check_fit(args, config, [1])
    with pytest.raises(ValueError, match="does not divide the attention output width .* = 32 on each of 2"):
        quantization.check_fit(args, config, [2])


@pytest.mark.parametrize("name,options", MODES, ids=[m[0] for m in MODES])
def test_each_mode_builds_and_generates(tiny_ckpt, name, options):
    got = run(str(tiny_ckpt), **options)
    reference = run(str(tiny_ckpt))
    assert [len(t) for t in got["tokens"]] == [8, 8]
    # The first greedy token of a random tiny model is not a near-tie: every mode agrees on it.
    assert [t[0] for t in got["tokens"]] == [t[0] for t in reference["tokens"]]
    generator = build(tiny_ckpt, **options)
    kernel = type(generator.model.layers[0].attention.qkv_kernel)
    from llama import native

    int4_fp32 = kernels.NativeInt4Linear if native.available() else kernels.Int4Linear
    int8_fp32 = kernels.NativeInt8Linear if native.available() else kernels.Int8Linear
    # bf16: Meta's rows stacked for the C step (prompts widened to fp32 where the CPU has no bf16
    # arithmetic), else oneDNN's packed layout
    rows = kernels.FusedLinear if kernels.mkldnn_bf16_available() else kernels.WidenedBf16Linear
    bf16 = rows if native.available() else kernels.MkldnnLinear
    expected = {"int8": int8_fp32, "int4": int4_fp32, "int4-bf16": kernels.Int4Linear, "bf16": bf16}
    assert kernel is expected[name]


def test_quantized_model_keeps_embeddings_norms_and_cache_in_the_activation_dtype(tiny_ckpt):
    model = build(tiny_ckpt, quantize="int8", dtype=torch.bfloat16).model
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.norm.weight.dtype == torch.bfloat16
    assert model.layers[0].attention.cache_k.dtype == torch.bfloat16
    assert model.layers[0].attention.wq.weight is None  # no unquantized copy is kept
    assert model.output_kernel.qweight.dtype == torch.int8


def test_offline_checkpoint_gives_the_tokens_of_quantizing_at_load(tiny_ckpt, tmp_path):
    for mode, group_size in (("int8", None), ("int4", 32)):
        dst = tmp_path / mode
        assert quantize_cli.main([str(tiny_ckpt), str(dst), "--quantize", mode]
                             + ([] if group_size is None else ["--group-size", str(group_size)])) == 0
        params = json.loads((dst / "params.json").read_text())
        assert params["quantization"]["mode"] == mode
        shard = torch.load(dst / "consolidated.00.pth", weights_only=True)
        assert shard["layers.0.attention.wq.weight"].dtype == (torch.int8 if mode == "int8" else torch.uint8)
        assert shard["tok_embeddings.weight"].dtype == torch.float32
        # quantize=None loads it as it was quantized; so does the same mode named again.
        offline = run(str(dst))
        assert offline == run(str(tiny_ckpt), quantize=mode, group_size=group_size)
        assert offline == run(str(dst), quantize=mode)
        with pytest.raises(ValueError, match="already quantized"):
            build(dst, quantize="int4" if mode == "int8" else "int8")


def test_quantized_checkpoint_reshards_and_loads_at_any_size(tiny_ckpt, tiny_ckpt_mp2, tmp_path):
    # Quantized from two shards, resharded to one: the same numbers as quantizing one shard.
    for mode in ("int8", "int4"):
        group = ["--group-size", "32"] if mode == "int4" else []
        assert quantize_cli.main([str(tiny_ckpt_mp2), str(tmp_path / f"{mode}2"), "--quantize", mode] + group) == 0
        assert quantize_cli.main([str(tiny_ckpt), str(tmp_path / f"{mode}1"), "--quantize", mode] + group) == 0
        reshard(tmp_path / f"{mode}2", tmp_path / f"{mode}2to1", 1, progress=False)
        one = torch.load(tmp_path / f"{mode}1" / "consolidated.00.pth", weights_only=True)
        joined = torch.load(tmp_path / f"{mode}2to1" / "consolidated.00.pth", weights_only=True)
        assert one.keys() == joined.keys()
        assert all(torch.equal(one[k], joined[k]) for k in one)
        assert json.loads((tmp_path / f"{mode}2to1" / "params.json").read_text())["quantization"]["mode"] == mode
        # and the two-shard checkpoint loads on one process directly
        assert run(str(tmp_path / f"{mode}2")) == run(str(tmp_path / f"{mode}1"))


def test_each_mode_on_two_ranks(tiny_ckpt, tiny_ckpt_mp2, tmp_path):
    offline = tmp_path / "int8-mp2"
    assert quantize_cli.main([str(tiny_ckpt_mp2), str(offline), "--quantize", "int8"]) == 0
    out = tmp_path / "mp2.json"
    run_torchrun(2, ["tests/quant_worker.py", out, tiny_ckpt_mp2, offline])
    mp2 = json.loads(out.read_text())
    assert mp2["world_size"] == 2
    for name, options in MODES:
        got, want = mp2[f"{tiny_ckpt_mp2}:{name}"], run(str(tiny_ckpt), **options)
        if name.endswith("bf16"):  # bf16 sums over ranks round differently: the run itself is the check
            assert [len(t) for t in got["tokens"]] == [8, 8]
            continue
        # The same quantized numbers on each rank's part as in one process (fp32 activations).
        assert got["tokens"] == want["tokens"]
        torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]),
                                   atol=1e-4, rtol=0)
    assert mp2[str(offline)]["tokens"] == run(str(tiny_ckpt), quantize="int8", dtype=torch.float32)["tokens"]


def test_example_scripts_pass_quantize_to_build(tiny_ckpt):
    import sys

    from conftest import run_checked

    out = run_checked([sys.executable, "example_text_completion.py", "--ckpt_dir", str(tiny_ckpt),
                       "--quantize", "int4", "--group_size", "32", "--max_gen_len", "4"]).stdout
    assert sum(1 for line in out.splitlines() if line.startswith("> ") and "initializing" not in line) == 3
    # A group size build refuses shows that both flags reached it (an unknown
    # --quantize mode is refused by the command line itself).
    for script in ("example_text_completion.py", "example_chat_completion.py", "chat.py"):
        with pytest.raises(AssertionError, match="int4 group_size must be one of 32, 64, 128, 256, got 48"):
            run_checked([sys.executable, script, "--ckpt_dir", str(tiny_ckpt), "--quantize", "int4",
                         "--group_size", "48"])


def test_int4_cpu_packing_in_row_blocks_equals_packing_whole():
    # Int4Linear packs 4096 rows at a time to bound the int32 temporary.
    torch.manual_seed(0)
    w = torch.randn(4096 + 48, 64)
    nibbles, scale, zero = quantization.quantize_int4(w, 32)
    kernel = kernels.Int4Linear(nibbles, scale, zero, 32, torch.float32)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(kernels.unpack_nibbles(nibbles).to(torch.int32), 1)
    assert torch.equal(kernel.packed, whole)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_step_of_a_quantized_model_decodes_as_the_c_step(tiny_ckpt, mode):
    # The C products are a custom op (llama::native_matmul) that torch.compile keeps whole;
    # as a plain ctypes call, fullgraph tracing refused them.
    compiled = build(tiny_ckpt, quantize=mode, compile=True)
    eager = build(tiny_ckpt, quantize=mode)
    prompts = [[1, 5, 6, 7], [1, 9, 10]]
    got, _ = compiled.generate(prompts, max_gen_len=6, temperature=0)
    want, _ = eager.generate(prompts, max_gen_len=6, temperature=0)
    assert got == want

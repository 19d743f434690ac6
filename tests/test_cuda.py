"""The real CUDA path: NCCL, half precision. Skipped where there is no GPU."""

import json

import pytest
import torch

from conftest import cuda_only, run_torchrun
from llama import Llama
from mp_worker import results
from test_generation import GOLDEN, GOLDEN_PROMPTS

pytestmark = cuda_only


def build(ckpt, **kwargs):
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=8, **kwargs)


def test_cuda_defaults_to_fp16_on_the_gpu(tiny_ckpt):
    generator = build(tiny_ckpt)
    weight = generator.model.output.weight
    assert weight.device.type == "cuda" and weight.dtype == torch.float16
    assert generator.model.layers[0].attention.cache_k.dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_and_tokens_track_fp32(tiny_ckpt, dtype):
    half = build(tiny_ckpt, dtype=dtype)
    full = build(tiny_ckpt, device="cpu", dtype=torch.float32)
    tokens = torch.tensor([GOLDEN_PROMPTS[0]])
    with torch.inference_mode():
        diff = half.model.forward(tokens.cuda(), 0).cpu() - full.model.forward(tokens, 0)
    assert diff.abs().max() < 0.25  # half precision rounding on O(1..10) logits
    golden = json.loads(GOLDEN.read_text())["tokens"]
    got, _ = half.generate(GOLDEN_PROMPTS, max_gen_len=12, temperature=0)
    # Rounding may flip a near tie late in a sequence; the first tokens must agree.
    for row, expected in zip(got, golden):
        assert row[:3] == expected[:3]


def test_torchrun_on_the_gpu_uses_nccl_and_matches_one_process(tiny_ckpt, tiny_ckpt_mp2, tmp_path):
    if torch.cuda.device_count() < 2:
        # One GPU: two ranks cannot each own a device under NCCL; check the
        # single-rank NCCL path against the same build in this process.
        out = tmp_path / "mp1.json"
        run_torchrun(1, ["tests/mp_worker.py", tiny_ckpt, out], env={"CUDA_VISIBLE_DEVICES": "0"})
    else:
        out = tmp_path / "mp2.json"
        run_torchrun(2, ["tests/mp_worker.py", tiny_ckpt_mp2, out], env={"CUDA_VISIBLE_DEVICES": "0,1"})
    result = json.loads(out.read_text())
    assert result["backend"] == "nccl"
    assert result["device"] == "cuda:0" and result["dtype"] == "torch.float16"
    here = results(Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=64,
                               max_batch_size=4, seed=5))
    if torch.cuda.device_count() < 2:  # the same device, dtype and seed: the same numbers
        assert result["greedy"] == here["greedy"] and result["sampled"] == here["sampled"]
    else:  # fp16 over two ranks sums in another order: a near tie may flip late
        assert [row[:3] for row in result["greedy"]] == [row[:3] for row in here["greedy"]]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_modes_on_the_gpu_track_the_cpu_kernels(tiny_ckpt, mode, capsys):
    gpu = build(tiny_ckpt, quantize=mode)  # bf16 activations, the CUDA default
    # Eager int8 on CUDA converts each matrix every step: said, not silent.
    assert ("int8 on CUDA is fast with compile=True" in capsys.readouterr().err) == (mode == "int8")
    assert gpu.model.tok_embeddings.weight.dtype == torch.bfloat16
    kernel = gpu.model.layers[0].attention.qkv_kernel
    assert next(kernel.buffers()).device.type == "cuda"
    cpu = build(tiny_ckpt, device="cpu", dtype=torch.float32, quantize=mode)  # the same quantized values
    tokens = torch.tensor([GOLDEN_PROMPTS[0]])
    with torch.inference_mode():
        diff = gpu.model.forward(tokens.cuda(), 0).float().cpu() - cpu.model.forward(tokens, 0)
    assert diff.abs().max() < 0.25  # bf16 activations against fp32 ones, on the same weights
    got, _ = gpu.generate(GOLDEN_PROMPTS, max_gen_len=8, temperature=0)
    expected, _ = cpu.generate(GOLDEN_PROMPTS, max_gen_len=8, temperature=0)
    assert [row[:3] for row in got] == [row[:3] for row in expected]
    # The compiled step (int8: dequantization fused into the one-row products) decodes the same.
    compiled = build(tiny_ckpt, quantize=mode, compile=True)
    got_compiled, _ = compiled.generate(GOLDEN_PROMPTS, max_gen_len=8, temperature=0)
    assert [row[:3] for row in got_compiled] == [row[:3] for row in got]


def test_int4_on_the_gpu_names_the_activation_dtype_it_needs(tiny_ckpt):
    with pytest.raises(ValueError, match="takes bfloat16 activations"):
        build(tiny_ckpt, quantize="int4", dtype=torch.float16)

"""The decoding layout set up by `Transformer.prepare_for_inference`: fused,
transposed weights that stay Meta's parameters, and the alternative entry
points of the forward pass (a chunk after cached positions, a tensor position)."""

import os

from pathlib import Path

import pytest
import torch

from llama import Llama, checkpoint, memory
from llama.model import MetaLinear, Transformer


@pytest.fixture(scope="module")
def fast(tiny_ckpt):
    """`generator`'s checkpoint built with the decoding layout asked for."""
    return Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=8,
                       device="cpu", fast_layout=True)


@pytest.fixture(scope="module")
def mapped(tiny_ckpt):
    """The same checkpoint left in Meta's layout, in the memory-mapped file (the opt-out)."""
    return Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=8,
                       device="cpu", fast_layout=False)


def storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.fixture(scope="module")
def transposed(tiny_ckpt):
    """The checkpoint in torch's decoding layout (the CPU fp32 default where the C step is not compiled)."""
    from llama import kernels

    generator = Llama.build(str(tiny_ckpt), str(tiny_ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=8,
                            device="cpu", fast_layout=False, mmap=False)
    kernels.prepare(generator.model, "transposed")
    return generator


@pytest.mark.parametrize("layout", ["native", "transposed"])
def test_meta_parameters_are_views_of_the_fused_matrices(fast, transposed, tiny_ckpt, layout):
    model = (fast if layout == "native" else transposed).model
    assert model.weight_layout == ("rows" if layout == "native" else "transposed")
    shard = checkpoint.load_shard(tiny_ckpt / "consolidated.00.pth")
    state = model.state_dict()
    assert set(state) == set(shard)  # Meta's keys, nothing more
    for key, tensor in shard.items():
        assert torch.equal(state[key], tensor), key
    for layer in model.layers:
        attention, feed_forward = layer.attention, layer.feed_forward
        for linear in (attention.wq, attention.wk, attention.wv):
            assert storage_ptr(linear.weight) == storage_ptr(attention.qkv_kernel.fused)
        for linear in (feed_forward.w1, feed_forward.w3):
            assert storage_ptr(linear.weight) == storage_ptr(feed_forward.w13_kernel.fused)
        if layout == "transposed":  # the [out, in] parameter reads [in, out] memory
            assert attention.wo.weight.t().is_contiguous() and feed_forward.w2.weight.t().is_contiguous()
        else:  # Meta's [out, in] rows, q|k|v stacked: what the C step reads
            assert attention.wo.weight.is_contiguous() and feed_forward.w2.weight.is_contiguous()
            assert attention.qkv_kernel.fused.t().is_contiguous() and feed_forward.w13_kernel.fused.t().is_contiguous()
    assert (model.output.weight.t() if layout == "transposed" else model.output.weight).is_contiguous()


def test_loading_into_a_prepared_model_fuses_the_matrices_again(fast, tiny_ckpt):
    model = fast.model
    shard = checkpoint.load_shard(tiny_ckpt / "consolidated.00.pth")
    tokens = torch.tensor([[1, 45, 300, 12, 99]])
    with torch.inference_mode():
        before = model.forward(tokens, 0)
        try:
            doubled = {k: (2 * v if k == "layers.0.attention.wk.weight" else v) for k, v in shard.items()}
            model.load_state_dict(doubled, strict=True, assign=True)
            attention = model.layers[0].attention
            k_columns = slice(attention.wq.weight.shape[0], attention.wq.weight.shape[0] + attention.wk.weight.shape[0])
            assert torch.equal(attention.qkv_kernel.fused[:, k_columns].t(), doubled["layers.0.attention.wk.weight"])
            assert storage_ptr(attention.wk.weight) == storage_ptr(attention.qkv_kernel.fused)
            assert not torch.allclose(model.forward(tokens, 0), before)
        finally:
            model.load_state_dict(shard, strict=True, assign=True)
        torch.testing.assert_close(model.forward(tokens, 0), before, atol=0, rtol=0)


def test_unprepared_model_gives_the_prepared_logits(mapped, fast, transposed):
    assert isinstance(mapped.model.layers[0].attention.qkv_kernel, MetaLinear)  # fast_layout=False keeps the mapped weights
    tokens = torch.tensor([[1, 45, 300, 12, 99, 7, 250, 3]])
    with torch.inference_mode():
        for prepared in (fast, transposed):
            torch.testing.assert_close(prepared.model.forward(tokens, 0), mapped.model.forward(tokens, 0),
                                       atol=1e-5, rtol=1e-5)


def mapped_file(t: torch.Tensor):
    """The file whose mapping holds `t`'s memory (from /proc/self/maps), or None."""
    address = t.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_only_fast_layout_false_leaves_the_weights_in_the_mapped_file(mapped, fast, tiny_ckpt):
    shard = str(tiny_ckpt / "consolidated.00.pth")
    assert mapped_file(mapped.model.layers[0].attention.wq.weight) == shard
    assert mapped_file(mapped.model.output.weight) == shard
    assert mapped_file(fast.model.layers[0].attention.wq.weight) != shard


@pytest.mark.parametrize("layout", ["mapped", "fast"])
def test_a_chunk_after_cached_positions_and_a_tensor_position_match_the_full_forward(mapped, fast, layout):
    model = (fast if layout == "fast" else mapped).model
    tokens = torch.tensor([[1, 17, 230, 42, 5, 311, 90, 61, 8, 400]])
    with torch.inference_mode():
        full = model.forward(tokens, 0)
        # 4 positions, then a chunk of 5 behind them (the widened causal mask),
        # then the last one with its position given as a tensor (the compiled step's form).
        steps = [model.forward(tokens[:, :4], 0), model.forward(tokens[:, 4:9], 4)]
        steps.append(model.forward(tokens[:, 9:], torch.tensor([9])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_last_logits_only_is_the_last_row_of_all_logits(generator):
    tokens = torch.tensor([[1, 17, 230, 42, 5], [1, 9, 8, 7, 6]])
    with torch.inference_mode():
        full = generator.model.forward(tokens, 0)
        last = generator.model.forward(tokens, 0, last_logits_only=True)
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_the_default_cpu_build_uses_the_layout_the_benchmark_measures(generator, tiny_ckpt):
    """fp32 on the CPU: `Llama.build` with no option lays the weights out for
    decoding, and bench.py's first "llama" row (from_model with no option) is
    that same layout (not one the benchmark chose for itself)."""
    import sys

    from conftest import REPO, TINY
    from llama import kernels
    from llama.model import ModelArgs
    from llama.tiny import random_weights

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench

    from llama import native

    # pip install -e . compiles the C step; without it this is a slower product, and this test says why.
    assert native.available(), native.unavailable_reason()
    assert kernels.choose_layout(torch.device("cpu"), torch.float32) == "native"
    args = ModelArgs(**{k: v for k, v in TINY.items() if k != "seed"}, max_seq_len=32, max_batch_size=2)
    runner = bench.OurRunner("llama", random_weights(args), args, generator.tokenizer,
                             torch.device("cpu"), torch.float32)
    for built in (generator, runner.generator):  # build's default, bench's first row
        model = built.model
        assert model.weight_layout == "rows" and isinstance(built.step.one_token, native.DecodeStep)
        for layer in model.layers:
            assert isinstance(layer.attention.qkv_kernel, kernels.FusedLinear) and isinstance(layer.feed_forward.w13_kernel, kernels.FusedLinear)
            assert layer.attention.wo.weight.is_contiguous() and layer.feed_forward.w2.weight.is_contiguous()
        assert model.output.weight.is_contiguous()
    # The opt-out is Meta's layout, in both.
    assert kernels.choose_layout(torch.device("cpu"), torch.float32, fast_layout=False) == "meta"


def test_the_page_releaser_drops_only_tensors_mapped_from_the_shards(tiny_ckpt):
    shard_path = tiny_ckpt / "consolidated.00.pth"
    shard = checkpoint.load_shard(shard_path)
    release = memory.mapped_page_releaser([shard_path])
    big = torch.arange(1 << 20, dtype=torch.float32)  # anonymous memory, several pages
    release(big)
    assert torch.equal(big, torch.arange(1 << 20, dtype=torch.float32))  # untouched
    weight = shard["output.weight"]
    before = weight.clone()
    release(weight)  # its pages are dropped, and read back from the file on use
    assert torch.equal(weight, before)


def _file_backed_resident_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status on this platform")


def test_the_page_releaser_drops_a_mapped_tensors_pages(tmp_path):
    # 16 MiB in a shard: read once, its pages count as resident file pages;
    # released, they no longer do.
    path = tmp_path / "consolidated.00.pth"
    torch.save({"w": torch.ones(4 << 20)}, path)
    weight = checkpoint.load_shard(path)["w"]
    assert float(weight.sum()) == 4 << 20  # every page read
    resident = _file_backed_resident_kib()
    memory.mapped_page_releaser([path])(weight)
    assert resident - _file_backed_resident_kib() > 12 * 1024
    assert float(weight.sum()) == 4 << 20  # read back from the file

"""The rotary names of Meta's `llama.model` that code written against the
reference imports: apply_rotary_emb, reshape_for_broadcast, Transformer.freqs_cis."""

import pytest
import torch

from llama.model import apply_rotary, apply_rotary_emb, precompute_freqs_cis, reshape_for_broadcast


def reference_style_rotary(xq, xk, freqs_cis):
    """The reference's computation: pairs as complex numbers times the rotations."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    rotations = freqs_cis[None, :, None, :]
    return (
        torch.view_as_real(xq_ * rotations).flatten(3).type_as(xq),
        torch.view_as_real(xk_ * rotations).flatten(3).type_as(xk),
    )


@pytest.mark.parametrize("model_fixture", ["generator", "infiller_model"])
def test_freqs_cis_is_the_reference_table(request, model_fixture):
    model = request.getfixturevalue(model_fixture).model
    params = model.params
    head_dim = params.dim // params.n_heads
    freqs_cis = model.freqs_cis
    assert freqs_cis.dtype == torch.complex64
    assert freqs_cis.shape == (2 * params.max_seq_len, head_dim // 2)
    assert torch.equal(freqs_cis, precompute_freqs_cis(head_dim, 2 * params.max_seq_len, params.rope_theta))


@pytest.fixture(scope="module")
def infiller_model(tiny_infill_ckpt):
    # rope_theta 1e6 (Code Llama), not Llama 2's 10000.
    from llama import Llama

    return Llama.build(str(tiny_infill_ckpt), str(tiny_infill_ckpt / "tokenizer.model"), 32, 1, device="cpu")


@pytest.mark.parametrize("model_fixture", ["generator", "infiller_model"])
@pytest.mark.parametrize("start_pos, seqlen", [(0, 7), (13, 1), (5, 20)])
def test_apply_rotary_emb_equals_the_fast_path_and_the_reference(request, model_fixture, start_pos, seqlen):
    model = request.getfixturevalue(model_fixture).model
    head_dim = model.params.dim // model.params.n_heads
    gen = torch.Generator().manual_seed(start_pos)
    xq = torch.randn(2, seqlen, 4, head_dim, generator=gen)
    xk = torch.randn(2, seqlen, 2, head_dim, generator=gen)
    freqs_cis = model.freqs_cis[start_pos : start_pos + seqlen]

    rq, rk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
    # What the model's attention computes at these positions, bit for bit.
    rope = model.rope[:, start_pos : start_pos + seqlen]
    assert torch.equal(rq, apply_rotary(xq, rope)) and torch.equal(rk, apply_rotary(xk, rope))
    # The reference's complex product, to float rounding.
    eq, ek = reference_style_rotary(xq, xk, freqs_cis)
    torch.testing.assert_close(rq, eq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rk, ek, atol=1e-6, rtol=1e-6)
    assert rq.shape == xq.shape and rk.shape == xk.shape


def test_apply_rotary_emb_keeps_the_dtype():
    freqs_cis = precompute_freqs_cis(8, 6)
    xq, xk = torch.randn(1, 6, 2, 8, dtype=torch.float16), torch.randn(1, 6, 1, 8, dtype=torch.bfloat16)
    rq, rk = apply_rotary_emb(xq, xk, freqs_cis)
    assert (rq.dtype, rk.dtype) == (torch.float16, torch.bfloat16)
    eq, ek = reference_style_rotary(xq, xk, freqs_cis)
    torch.testing.assert_close(rq, eq)
    torch.testing.assert_close(rk, ek)


def test_reshape_for_broadcast():
    freqs_cis = precompute_freqs_cis(8, 5)  # (5, 4)
    x = torch.zeros(3, 5, 2, 4, dtype=torch.complex64)
    view = reshape_for_broadcast(freqs_cis, x)
    assert view.shape == (1, 5, 1, 4) and torch.equal(view[0, :, 0], freqs_cis)
    assert (x * view).shape == x.shape
    with pytest.raises(ValueError, match=r"freqs_cis of shape \(5, 4\) does not fit x of shape \(3, 6, 2, 4\)"):
        reshape_for_broadcast(freqs_cis, torch.zeros(3, 6, 2, 4))
    with pytest.raises(ValueError, match="does not fit"):
        apply_rotary_emb(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), freqs_cis)

import json

import pytest
import torch

from llama.model import ModelArgs, ffn_hidden_dim, repeat_kv
from naive_llama import naive_logits


def full_state(ckpt):
    return torch.load(ckpt / "consolidated.00.pth", weights_only=True)


def test_logits_match_an_independent_implementation(generator, tiny_ckpt):
    tokens = torch.tensor([[1, 45, 300, 12, 99, 7, 250, 3]])
    ours = generator.model.forward(tokens, 0)
    params = json.loads((tiny_ckpt / "params.json").read_text())
    expected = naive_logits(full_state(tiny_ckpt), params, tokens)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=1e-4)


def test_kv_cache_decoding_equals_full_forward(generator):
    tokens = torch.tensor([[1, 17, 230, 42, 5, 311, 90, 61, 8, 400]])
    with torch.inference_mode():
        full = generator.model.forward(tokens, 0)
        # Prefill 4 positions, then one position at a time from the cache.
        steps = [generator.model.forward(tokens[:, :4], 0)]
        for pos in range(4, tokens.shape[1]):
            steps.append(generator.model.forward(tokens[:, pos : pos + 1], pos))
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)


def test_repeat_kv_is_repeat_interleave_on_heads():
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(repeat_kv(x, 4), torch.repeat_interleave(x, dim=2, repeats=4))
    assert repeat_kv(x, 1) is x


@pytest.mark.parametrize(
    "dim, multiple_of, multiplier, hidden",
    [
        (4096, 256, None, 11008),  # Llama 2 7B
        (5120, 256, None, 13824),  # Llama 2 13B
        (8192, 4096, 1.3, 28672),  # Llama 2 70B
    ],
)
def test_ffn_hidden_size_matches_meta_models(dim, multiple_of, multiplier, hidden):
    assert ffn_hidden_dim(dim, multiple_of, multiplier) == hidden


def test_model_args_defaults_are_the_references():
    args = ModelArgs()
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (4096, 32, 32, None)
    assert (args.vocab_size, args.multiple_of, args.ffn_dim_multiplier) == (-1, 256, None)
    assert (args.norm_eps, args.max_batch_size, args.max_seq_len) == (1e-5, 32, 2048)


def test_state_dict_keys_are_metas(generator):
    keys = set(generator.model.state_dict())
    layer = {
        "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
        "attention_norm.weight", "ffn_norm.weight",
    }
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected |= {f"layers.{i}.{name}" for i in range(2) for name in layer}
    assert keys == expected  # caches and the rotary table stay out of checkpoints

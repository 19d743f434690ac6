"""A straight, independent Llama 2 forward pass for checking the library's numbers.

No cache, no model parallelism, no fairscale: plain tensor math written from
the Llama 2 paper's description (RMSNorm, rotary embeddings on adjacent
pairs, grouped-query attention, SwiGLU), reading weights by Meta's keys.
"""

import math

import torch


def naive_logits(state, params, tokens: torch.Tensor, rope_theta: float = 10000.0) -> torch.Tensor:
    """(bsz, seqlen) token ids -> (bsz, seqlen, vocab) float64 logits."""
    sd = {k: v.double() for k, v in state.items()}
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    eps = params.get("norm_eps", 1e-5)
    hd = dim // n_heads
    bsz, seqlen = tokens.shape

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rotate(x):  # x: (bsz, seqlen, heads, hd); pairs (2i, 2i+1) rotate by pos * theta^(-2i/hd)
        pos = torch.arange(seqlen, dtype=torch.float64)[:, None]
        inv = rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = pos * inv[None, :]  # (seqlen, hd/2)
        cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    h = sd["tok_embeddings.weight"][tokens]
    causal = torch.triu(torch.full((seqlen, seqlen), float("-inf"), dtype=torch.float64), 1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q = (x @ sd[p + "attention.wq.weight"].T).view(bsz, seqlen, n_heads, hd)
        k = (x @ sd[p + "attention.wk.weight"].T).view(bsz, seqlen, n_kv, hd)
        v = (x @ sd[p + "attention.wv.weight"].T).view(bsz, seqlen, n_kv, hd)
        q, k = rotate(q), rotate(k)
        group = n_heads // n_kv
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + causal
        out = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(bsz, seqlen, dim)
        h = h + out @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(x @ sd[p + "feed_forward.w1.weight"].T)
        h = h + (gate * (x @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T

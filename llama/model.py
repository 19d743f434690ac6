"""The Llama transformer (Llama 2, Code Llama, Llama 3.x text): the math only.

Mirrors Meta's reference `model.py` layer for layer, with the same parameter
names (so Meta's state dicts load unchanged) and the same computation (so the
logits match to float rounding). What differs, for speed and placement:

- the rotary table and the KV cache are non-persistent buffers set up by
  `setup_caches`, so a model built on the `meta` device can take its weights
  by assignment and then get its caches on the weights' device and dtype;
- the cache is laid out (bsz, heads, seq, head_dim) and attention is one
  `scaled_dot_product_attention` call; rotary embedding uses real cos/sin
  tables (the same numbers as the reference's complex ones; the reference's
  `apply_rotary_emb`, `reshape_for_broadcast` and `Transformer.freqs_cis`
  remain for code that uses them, computed from those tables);
- every linear product is a kernel set once, not chosen in `forward`:
  `Attention.qkv_kernel` (x -> q|k|v) and `wo_kernel`, `FeedForward.w13_kernel`
  (x -> w1 x|w3 x) and `w2_kernel`, `Transformer.output_kernel`. By default
  each is `MetaLinear`, Meta's `F.linear` on the loaded weights;
  `llama/kernels.py` swaps in a fused, packed, quantized or C-read one. The
  Meta-named parameters stay (as views into a fused copy, or dropped where a
  quantized kernel holds the weights), so `state_dict()` keys do not change;
- the model-parallel collectives are applied as plain functions, only where
  the model-parallel size exceeds one (the fairscale layers' Python overhead
  dominates small models' decode steps).
"""

import math
from typing import Optional, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.mappings import (
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from llama.args import ModelArgs, ffn_hidden_dim, swiglu_hidden_dim  # noqa: F401  (callers import them from here too)


# Which KV-cache rows a batch's rows use (Transformer.forward): None for 0 .. bsz - 1.
CacheRows = Optional[Union[slice, torch.Tensor]]


def _no_init(tensor: torch.Tensor) -> torch.Tensor:
    # Weights always come from a checkpoint; initialising them is wasted work.
    return tensor


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        # Meta's helper, kept for code written against the reference; forward
        # computes the same with F.rms_norm.
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        # Normalise in fp32 whatever the weights' dtype, as the reference does;
        # F.rms_norm is the same x * rsqrt(mean(x^2) + eps) in fewer kernels.
        output = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return output * self.weight


# Meta's Llama 3.1 rotary scaling: frequencies whose wavelength fits in a
# quarter of the original 8192-token context are kept, those longer than the
# whole context are divided by the factor, and the band between is blended.
ROPE_SCALING_FACTOR = 8.0
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192


def apply_scaling(freqs: torch.Tensor, scale_factor: float = ROPE_SCALING_FACTOR) -> torch.Tensor:
    """Llama 3.1's scaled rotary base frequencies (Meta's `apply_scaling`, with the factor as an argument)."""
    low_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR
    high_freq_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR
    wavelen = 2 * math.pi / freqs
    smooth = (ROPE_ORIGINAL_CONTEXT / wavelen - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def precompute_freqs_cis(
    dim: int,
    end: int,
    theta: float = 10000.0,
    use_scaled: bool = False,
    scale_factor: float = ROPE_SCALING_FACTOR,
) -> torch.Tensor:
    """Complex rotations e^(i * t * theta^(-2k/dim)), shape (end, dim // 2);
    with `use_scaled`, the frequencies pass through `apply_scaling` first."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    if use_scaled:
        freqs = apply_scaling(freqs, scale_factor)
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def rotary_tables(
    dim: int,
    end: int,
    theta: float = 10000.0,
    use_scaled: bool = False,
    scale_factor: float = ROPE_SCALING_FACTOR,
) -> torch.Tensor:
    """The rotations of `precompute_freqs_cis` as real tables for `apply_rotary`.

    Shape (2, end, dim): [0] holds cos(angle) for both members of each pair,
    [1] holds -sin(angle) for the first member and +sin(angle) for the second.
    """
    return rope_of_freqs_cis(precompute_freqs_cis(dim, end, theta, use_scaled, scale_factor))


def rope_of_freqs_cis(freqs_cis: torch.Tensor) -> torch.Tensor:
    """Complex rotations (seqlen, head_dim // 2) as the real (2, seqlen, head_dim) table of `rotary_tables`."""
    cos, sin = freqs_cis.real, freqs_cis.imag
    return torch.stack((cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)))


def freqs_cis_of_rope(rope: torch.Tensor) -> torch.Tensor:
    """The inverse of `rope_of_freqs_cis`: the complex rotations, exactly."""
    return torch.complex(rope[0][..., ::2], rope[1][..., 1::2])


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of x (bsz, seqlen, heads, head_dim)
    by its position's angle; `rope` is the (2, seqlen, head_dim) slice of `rotary_tables`.

    Meta's layout, computed as the complex product (a + ib)(cos + i sin) of the
    reference in three kernels: x * cos + swap_pairs(x) * (-sin, sin).
    """
    xf = x.float()
    cos, signed_sin = rope[0][None, :, None, :], rope[1][None, :, None, :]
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, a) for each pair (a, b)
    return torch.addcmul(xf * cos, swapped, signed_sin).type_as(x)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reference's helper: `freqs_cis` (seqlen, d) viewed as (1, seqlen, 1, ..., d)
    to broadcast against `x` (bsz, seqlen, ..., d). Raises ValueError if the shapes disagree."""
    ndim = x.ndim
    if ndim < 2 or tuple(freqs_cis.shape) != (x.shape[1], x.shape[-1]):
        raise ValueError(
            f"freqs_cis of shape {tuple(freqs_cis.shape)} does not fit x of shape {tuple(x.shape)}: "
            "it must be (x.shape[1], x.shape[-1])"
        )
    shape = [d if i == 1 or i == ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(
    xq: torch.Tensor,
    xk: torch.Tensor,
    freqs_cis: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference's rotary embedding: xq (bsz, seqlen, n_heads, head_dim) and
    xk (bsz, seqlen, n_kv_heads, head_dim) rotated by the complex `freqs_cis`
    (seqlen, head_dim // 2), e.g. `Transformer.freqs_cis[start_pos : start_pos + seqlen]`.

    Returns (xq, xk) rotated, in their dtypes. Computed by the model's own
    real-valued `apply_rotary`: the reference's complex product, to float rounding.
    """
    for name, x in (("xq", xq), ("xk", xk)):
        if x.ndim != 4 or x.shape[-1] % 2:
            raise ValueError(f"{name} must be (bsz, seqlen, heads, head_dim) with an even head_dim, got {tuple(x.shape)}")
        # The reference's check, on the complex view (..., head_dim // 2) of x.
        reshape_for_broadcast(freqs_cis, x.unflatten(-1, (-1, 2))[..., 0])
    rope = rope_of_freqs_cis(freqs_cis).to(xq.device)
    return apply_rotary(xq, rope), apply_rotary(xk, rope)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """torch.repeat_interleave(x, dim=2, repeats=n_rep)"""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


class MetaLinear(nn.Module):
    """Meta's products, the default kernel of a slot: `F.linear` of x with each
    layer's weight as loaded, the outputs side by side (x -> q|k|v for wq, wk, wv).

    The layers are held in a tuple, not as children: they stay their owner's
    (`attention.wq`, ...), so the state-dict keys are Meta's, and a load that
    replaces their weights is read at the next call.
    """

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.layers) == 1:
            return F.linear(x, self.layers[0].weight)
        return torch.cat([F.linear(x, layer.weight) for layer in self.layers], -1)

    def c_matrix(self):
        """("dense", weight [out, in], None, 0) where one layer's weight is stored
        row by row (what the C step reads, `llama/native.py`), else None."""
        if len(self.layers) != 1 or not self.layers[0].weight.is_contiguous():
            return None
        return "dense", self.layers[0].weight, None, 0


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_kv_heads = args.kv_heads()
        model_parallel_size = fs_init.get_model_parallel_world_size()
        self.model_parallel_size = model_parallel_size
        # With more ranks than KV heads, each rank keeps a copy of the one KV
        # head its query heads share, so wk/wv span max(n_kv_heads, mp) heads.
        self.n_local_heads, self.n_local_kv_heads = args.local_heads(model_parallel_size)
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.dim // args.n_heads
        kv_width = self.n_local_kv_heads * model_parallel_size * self.head_dim

        self.wq = ColumnParallelLinear(
            args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False, init_method=_no_init
        )
        self.wk = ColumnParallelLinear(
            args.dim, kv_width, bias=False, gather_output=False, init_method=_no_init
        )
        self.wv = ColumnParallelLinear(
            args.dim, kv_width, bias=False, gather_output=False, init_method=_no_init
        )
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=_no_init
        )
        # The products: x -> q|k|v, and wo's. Meta's F.linear's until llama/kernels.py
        # swaps in another kernel (fused, packed, quantized); forward calls whichever is set.
        self.qkv_kernel: nn.Module = MetaLinear(self.wq, self.wk, self.wv)
        self.wo_kernel: nn.Module = MetaLinear(self.wo)
        # (max_batch_size, n_local_kv_heads, max_seq_len, head_dim), set by setup_cache
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def setup_cache(self, max_batch_size: int, max_seq_len: int, device, dtype) -> None:
        shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: Union[int, torch.Tensor],
        rope: torch.Tensor,
        mask: Optional[torch.Tensor],
        cache_rows: CacheRows = None,
    ):
        """`mask` None means: every cached position is visible and, for more
        than one new position, they are causal among themselves from position 0.
        `cache_rows`: see `Transformer.forward`."""
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.n_local_heads * self.head_dim, self.n_local_kv_heads * self.head_dim
        xqkv = self.qkv_kernel(x)  # (bsz, seqlen, local q | k | v)
        per_row = cache_rows is not None and isinstance(start_pos, torch.Tensor)
        # q and k are adjacent columns: one rotation serves both. With a position
        # per row, the rows take the place of the sequence in the rotation.
        xqk = xqkv[..., : q_size + kv_size].reshape(*((1, bsz) if per_row else (bsz, seqlen)), -1, self.head_dim)
        xqk = apply_rotary(xqk, rope).view(bsz, seqlen, -1, self.head_dim)
        xq, xk = xqk.split([self.n_local_heads, self.n_local_kv_heads], dim=2)
        xv = xqkv[..., q_size + kv_size :].view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)

        if per_row:
            # Continuous batching (llama/batching.py): row b is one token at its own
            # position start_pos[b], cached in row cache_rows[b]; attention spans the
            # longest row's positions and `mask` hides each row's positions after its own.
            rows = cache_rows if isinstance(cache_rows, torch.Tensor) else torch.arange(bsz, device=x.device) + cache_rows.start
            self.cache_k[rows, :, start_pos] = xk[:, 0]
            self.cache_v[rows, :, start_pos] = xv[:, 0]
            span = mask.shape[-1]
            keys, values = self.cache_k[cache_rows, :, :span], self.cache_v[cache_rows, :, :span]
        elif isinstance(start_pos, torch.Tensor):
            # The contract of the compiled and graphed steps (llama/decode_step.py):
            # one position given as data, so that one static-shape graph serves
            # every position. Attention then spans the whole cache and `mask`
            # hides the positions after start_pos. Kept apart from the int path,
            # which reads only the filled positions: a softmax over max_seq_len
            # positions, most masked, rounds differently, and the eager logits
            # stay those of the golden tests.
            self.cache_k[:bsz, :, start_pos] = xk.transpose(1, 2)
            self.cache_v[:bsz, :, start_pos] = xv.transpose(1, 2)
            keys, values = self.cache_k[:bsz], self.cache_v[:bsz]
        else:
            rows = slice(0, bsz) if cache_rows is None else cache_rows
            self.cache_k[rows, :, start_pos : start_pos + seqlen] = xk.transpose(1, 2)
            self.cache_v[rows, :, start_pos : start_pos + seqlen] = xv.transpose(1, 2)
            keys = self.cache_k[rows, :, : start_pos + seqlen]  # (bsz, n_local_kv_heads, cache_len + seqlen, head_dim)
            values = self.cache_v[rows, :, : start_pos + seqlen]

        # Grouped-query attention: each KV head serves n_rep query heads.
        output = F.scaled_dot_product_attention(
            xq.transpose(1, 2),  # (bsz, n_local_heads, seqlen, head_dim)
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None and seqlen > 1,
            enable_gqa=self.n_rep > 1,
        )
        output = output.transpose(1, 2).reshape(bsz, seqlen, -1)
        return row_parallel(self.wo_kernel(output), self.model_parallel_size)


def row_parallel(partial: torch.Tensor, model_parallel_size: int) -> torch.Tensor:
    """What RowParallelLinear(input_is_parallel=True) returns, given this rank's
    product with its input columns: the sum over the ranks."""
    return reduce_from_model_parallel_region(partial) if model_parallel_size > 1 else partial


class FeedForward(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        multiple_of: int,
        ffn_dim_multiplier: Optional[float],
    ):
        super().__init__()
        # Meta's sizing from `hidden_dim` (TransformerBlock passes 4 * dim, as the reference does).
        hidden_dim = swiglu_hidden_dim(hidden_dim, multiple_of, ffn_dim_multiplier)
        self.model_parallel_size = fs_init.get_model_parallel_world_size()

        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_no_init)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)
        # As Attention's: x -> w1 x | w3 x, and w2's product (llama/kernels.py swaps them)
        self.w13_kernel: nn.Module = MetaLinear(self.w1, self.w3)
        self.w2_kernel: nn.Module = MetaLinear(self.w2)

    def forward(self, x):
        gate, up = self.w13_kernel(x).chunk(2, dim=-1)
        return row_parallel(self.w2_kernel(F.silu(gate) * up), self.model_parallel_size)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.dim = args.dim
        self.head_dim = args.dim // args.n_heads
        self.attention = Attention(args)
        self.feed_forward = FeedForward(
            dim=args.dim,
            hidden_dim=4 * args.dim,
            multiple_of=args.multiple_of,
            ffn_dim_multiplier=args.ffn_dim_multiplier,
        )
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: Union[int, torch.Tensor],
        rope: torch.Tensor,
        mask: Optional[torch.Tensor],
        cache_rows: CacheRows = None,
    ):
        h = x + self.attention(self.attention_norm(x), start_pos, rope, mask, cache_rows)
        out = h + self.feed_forward(self.ffn_norm(h))
        return out


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.model_parallel_size = fs_init.get_model_parallel_world_size()

        # Llama 2 splits the embedding's columns across ranks, Llama 3 its vocabulary rows.
        embedding = VocabParallelEmbedding if params.tok_embeddings_split_dim == 0 else ParallelEmbedding
        self.tok_embeddings = embedding(params.vocab_size, params.dim, init_method=_no_init)

        self.layers = torch.nn.ModuleList()
        for layer_id in range(params.n_layers):
            self.layers.append(TransformerBlock(layer_id, params))

        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=_no_init)

        # (2, 2 * max_seq_len, head_dim): cos and signed sin, set by setup_caches
        self.register_buffer("rope", None, persistent=False)
        # How llama/kernels.py laid the weights out: "meta" (as loaded), "transposed",
        # "rows" (the C step's), "mkldnn", or a quantized mode.
        self.weight_layout = "meta"
        # Counts re-layouts and new caches: the C step (llama/native.py) then re-reads its pointers.
        self.layout_version = 0
        self.output_kernel: nn.Module = MetaLinear(self.output)
        # Loading weights replaces (assign=True) or overwrites the parameters:
        # kernels that copied them (llama/kernels.py's fused layouts) copy them again.
        self.register_load_state_dict_post_hook(Transformer._reload_kernels_after_load)
        if self.output.weight.device.type != "meta":
            self.setup_caches(device=self.output.weight.device, dtype=self.output.weight.dtype)

    def setup_caches(self, device=None, dtype=None) -> None:
        """(Re)allocate the rotary table and the KV cache on `device` in `dtype`.

        The cache holds `max_batch_size` rows of `max_seq_len` positions. The
        rotary table covers twice `max_seq_len`, as the reference's does.
        """
        # The embedding is never quantized: it carries the activation dtype.
        device = self.tok_embeddings.weight.device if device is None else torch.device(device)
        dtype = self.tok_embeddings.weight.dtype if dtype is None else dtype
        self.register_buffer(
            "rope",
            rotary_tables(
                self.params.dim // self.params.n_heads,
                self.params.max_seq_len * 2,
                self.params.rope_theta,
                self.params.use_scaled_rope,
                self.params.rope_scaling_factor or ROPE_SCALING_FACTOR,
            ).to(device),
            persistent=False,
        )
        for layer in self.layers:
            layer.attention.setup_cache(self.params.max_batch_size, self.params.max_seq_len, device, dtype)
        self.layout_version += 1

    def clear_cache(self, bsz: int, end: int) -> None:
        """Zero the cached keys and values of rows :bsz at positions :end, in place
        (the C step and captured CUDA graphs keep the buffers' addresses)."""
        for layer in self.layers:
            layer.attention.cache_k[:bsz, :, :end].zero_()
            layer.attention.cache_v[:bsz, :, :end].zero_()

    def clear_cache_row(self, row: int) -> None:
        """Zero every cached key and value of cache row `row`, in place."""
        for layer in self.layers:
            layer.attention.cache_k[row].zero_()
            layer.attention.cache_v[row].zero_()

    @property
    def freqs_cis(self) -> Optional[torch.Tensor]:
        """The reference's rotary table: complex64, (2 * max_seq_len, head_dim // 2),
        on the model's device. Made from the real table the model uses
        (`rope`), with the same values; None before `setup_caches`."""
        return None if self.rope is None else freqs_cis_of_rope(self.rope)

    @staticmethod
    def _reload_kernels_after_load(module: "Transformer", incompatible_keys) -> None:
        reloaded = False
        for owner, slot, _ in module.kernel_slots():
            reload = getattr(getattr(owner, slot), "reload", None)
            if reload is not None:
                reload()
                reloaded = True
        if reloaded:
            module.layout_version += 1

    def kernel_slots(self):
        """Each linear product's slot: (module, attribute naming its kernel,
        [paths of the Meta layers whose weights it computes with]), in the order
        the C step lists them (`llama/kernels.py` swaps the kernels)."""
        for i, block in enumerate(self.layers):
            p = f"layers.{i}."
            attention, feed_forward = block.attention, block.feed_forward
            yield attention, "qkv_kernel", [p + "attention.wq", p + "attention.wk", p + "attention.wv"]
            yield attention, "wo_kernel", [p + "attention.wo"]
            yield feed_forward, "w13_kernel", [p + "feed_forward.w1", p + "feed_forward.w3"]
            yield feed_forward, "w2_kernel", [p + "feed_forward.w2"]
        yield self, "output_kernel", ["output"]

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: Union[int, torch.Tensor],
        last_logits_only: bool = False,
        cache_rows: CacheRows = None,
    ):
        """Logits (float32) for `tokens` (bsz, seqlen) placed at `start_pos`.

        Keys and values of these positions enter the cache; positions before
        `start_pos` must already be there. With `last_logits_only` the logits
        are those of the last position alone, (bsz, 1, vocab): a prompt's
        other positions then skip the largest matrix of the model.

        `cache_rows` (a slice, or a long tensor (bsz,)) names the cache row of
        each batch row; None: rows 0 .. bsz - 1. With it, a tensor `start_pos`
        of shape (bsz,) gives each row of one token its own position (the
        server's continuous batching, llama/batching.py).
        """
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens) if self.model_parallel_size > 1 else F.embedding(tokens, self.tok_embeddings.weight)

        if isinstance(start_pos, torch.Tensor) and cache_rows is not None:
            if seqlen != 1 or start_pos.shape != (bsz,):
                raise ValueError(
                    f"positions per row take one token a row and one position each: got tokens of shape "
                    f"{tuple(tokens.shape)} and positions of shape {tuple(start_pos.shape)}"
                )
            rope = self.rope[:, start_pos]  # (2, bsz, head_dim): the rows in the sequence's place
            span = int(start_pos.max()) + 1
            mask = (torch.arange(span, device=tokens.device)[None, :] <= start_pos[:, None])[:, None, None, :]
        elif isinstance(start_pos, torch.Tensor):
            # A one-element position tensor, for one token (see Attention.forward).
            if seqlen != 1:
                raise ValueError(f"a tensor start_pos serves one position at a time, got {seqlen} tokens")
            rope = self.rope[:, start_pos]
            mask = (torch.arange(self.params.max_seq_len, device=tokens.device) <= start_pos)[None, :]
        else:
            rope = self.rope[:, start_pos : start_pos + seqlen]
            mask = None
            if seqlen > 1 and start_pos > 0:
                # The cached positions before start_pos are all visible, so the
                # causal mask is widened on the left (True: may attend). From
                # position 0 the attention is plainly causal and needs no mask.
                mask = torch.ones((seqlen, start_pos + seqlen), dtype=torch.bool, device=tokens.device)
                mask = mask.tril(diagonal=start_pos)

        for layer in self.layers:
            h = layer(h, start_pos, rope, mask, cache_rows)
        if last_logits_only:
            h = h[:, -1:]
        h = self.norm(h)
        output = self.output_kernel(h)
        if self.model_parallel_size > 1:
            output = gather_from_model_parallel_region(output)
        return output.float()

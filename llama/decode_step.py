"""How one decoding step runs: chosen once, when a `Llama` is made.

A `DecodeStep` maps (tokens (bsz, seqlen), start_pos) to the float32 logits
of `Transformer.forward`. In `generate`, prompts (seqlen > 1) run the eager
forward; a one-token step runs one of:

    kind         what runs the one-token step                       when
    eager        Transformer.forward                                 otherwise
    native       llama/native.c, one call a step (native.DecodeStep)  CPU, one rank, a model C can read
    compiled     torch.compile of Transformer.forward, static shapes  Llama.build(compile=True)
    cuda_graph   a CUDA graph of the eager forward (cuda_graph.py)    Llama.build(cuda_graph=True)

The server (llama/batching.py) runs `rows` (one token a row, each at its own
position and cache row) and `prompts_and_rows` (prompts beside such a step):
in C on the native step, every token a row computed as it would be alone;
with the eager forward on the other kinds.

The compiled and graphed steps pass the position as a one-element tensor:
the shapes stay static, attention spans the whole cache and a mask hides
the positions after it (see `Attention.forward`).
"""

import sys
from typing import Callable, Optional, Tuple

import torch

from llama import distributed, native
from llama.cuda_graph import GraphedDecodeStep
from llama.model import Transformer


class DecodeStep:
    """The logits of `model` for `tokens` at `start_pos`: the eager forward, or
    `one_token(tokens, start_pos)` for a (bsz, 1) step where one is given."""

    def __init__(self, model: Transformer, kind: str = "eager", one_token: Optional[Callable] = None):
        self.model = model
        self.kind = kind
        self.one_token = one_token

    def __call__(self, tokens: torch.Tensor, start_pos: int, last_logits_only: bool = False) -> torch.Tensor:
        if self.one_token is not None and tokens.shape[1] == 1:
            return self.one_token(tokens, start_pos)
        return self.model.forward(tokens, start_pos, last_logits_only=last_logits_only)

    # The server's steps (llama/batching.py): each request keeps one cache row
    # for its life, and the rows of a step stand at different positions.

    def rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor) -> torch.Tensor:
        """Logits (bsz, vocab) for one token a row: tokens[b] at position
        positions[b] of cache row cache_rows[b] (long tensors (bsz,)).

        The C step computes each row as it would alone (its products are
        batch-invariant), so a request's tokens do not depend on the others in
        the batch. The other kinds run the eager forward with a position per
        row; a single row runs as `generate` runs it at batch 1."""
        native_rows = getattr(self.one_token, "rows", None)
        if native_rows is not None:
            return native_rows(tokens, positions, cache_rows)
        if tokens.shape[0] == 1:
            row = int(cache_rows[0])
            return self.model.forward(tokens.view(1, 1), int(positions[0]), cache_rows=slice(row, row + 1))[:, 0]
        return self.model.forward(tokens.view(-1, 1), positions, cache_rows=cache_rows)[:, 0]

    def prompts_and_rows(self, prompts, tokens: torch.Tensor, positions: torch.Tensor,
                         cache_rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The server's forward: the last position's logits of each of `prompts` ((token ids
        (seqlen,), cache row) pairs, each placed at position 0 of its own cache row), and one step
        of rows as `rows` takes them (bsz may be 0). Returns (logits (prompts, vocab), (bsz, vocab)).

        The C step runs them all in one pass over the weights, every token a row computed as it
        would be alone (`native.DecodeStep.prompts_and_rows`). The other kinds run each prompt as
        `generate` runs a batch of one, then the step."""
        packed = getattr(self.one_token, "prompts_and_rows", None)
        if packed is not None:
            return packed(prompts, tokens, positions, cache_rows)
        vocab = self.model.params.vocab_size
        device = self.model.tok_embeddings.weight.device
        prompt_logits = [self._eager_prompt(prompt, row) for prompt, row in prompts]
        prompt_logits = torch.stack(prompt_logits) if prompt_logits else torch.empty(0, vocab, device=device)
        row_logits = self.rows(tokens, positions, cache_rows) if len(tokens) else torch.empty(0, vocab, device=device)
        return prompt_logits, row_logits

    def _eager_prompt(self, tokens: torch.Tensor, cache_row: int) -> torch.Tensor:
        """The last position's logits (vocab,) for a prompt `tokens` (seqlen,) placed at position 0
        of cache row `cache_row`, where the step has no forward of its own for prompts: the same
        computation as `generate`'s first step for a batch of one."""
        if tokens.shape[0] == 1:
            zero = torch.zeros(1, dtype=torch.long, device=tokens.device)
            return self.rows(tokens, zero, torch.full_like(zero, cache_row))[0]
        logits = self.model.forward(tokens.view(1, -1), 0, last_logits_only=True, cache_rows=slice(cache_row, cache_row + 1))
        return logits[0, -1]


class CompiledDecodeStep:
    """`model.forward` for one token a row, compiled with `torch.compile` on static shapes.

    The position is a tensor on the device, so one compiled graph serves every
    position (one compilation per batch size). On CPU: inductor's own matrix
    templates (`max_autotune`) on frozen weights. On CUDA: CUDA graphs
    (`triton.cudagraphs`), and for int8 coordinate-descent tuning, with which a
    one-row product is lowered to a fused multiply-and-sum, so the int8-to-bf16
    conversion of the weights happens in registers (without it the product is
    cuBLAS's, on a bf16 copy of each matrix written every step). A `mode`
    (torch.compile's) replaces these options (benchmarks/gpu_profile.py).
    """

    def __init__(self, model: Transformer, mode: Optional[str] = None):
        device = model.tok_embeddings.weight.device
        if mode is not None:
            self.compiled = torch.compile(model.forward, mode=mode, fullgraph=True)
        else:
            if device.type == "cuda":
                options = {"triton.cudagraphs": True}
                if quantized_mode(model) == "int8":
                    options["coordinate_descent_tuning"] = True
            else:
                options = {"max_autotune": True, "freezing": True}
            self.compiled = torch.compile(model.forward, fullgraph=True, options=options)
        self.position: Optional[torch.Tensor] = None

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        # Set in place: a new tensor from a Python int would be a
        # host-to-device copy, which waits for the GPU to catch up.
        if self.position is None:
            self.position = torch.zeros(1, dtype=torch.long, device=tokens.device)
        position = self.position.fill_(start_pos)
        # A copy with fresh strides: the graph is specialised to its input's
        # strides, and a (1, 1) slice of the tokens keeps the row stride of
        # the whole sequence (contiguous() would not copy it), so each new
        # sequence length would compile the step again.
        return self.compiled(tokens.clone(memory_format=torch.contiguous_format), position)


def check_options(device: torch.device, compile: bool, cuda_graph: bool) -> None:
    """Raise ValueError for a way of running the step that `device` cannot take."""
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device; the model is on {device}")
    if cuda_graph and compile:
        raise ValueError(
            "pass compile=True or cuda_graph=True, not both: on CUDA the compiled step "
            "already runs from CUDA graphs"
        )


def quantized_mode(model: Transformer) -> Optional[str]:
    """"int8" or "int4" for a model `llama.quantization.install` made, else None."""
    config = getattr(model, "quantization", None)
    return None if config is None else config.mode


def _refuse_model_parallel(model: Transformer, option: str) -> None:
    if model.model_parallel_size > 1:
        raise ValueError(
            f"{option}=True supports a model-parallel size of 1 only; "
            f"this model is split over {model.model_parallel_size} ranks"
        )


def choose(model: Transformer, compile: bool = False, cuda_graph: bool = False) -> DecodeStep:
    """The step for `model`, loaded and laid out: a CUDA graph or a compiled step
    where asked for (one rank only: ValueError otherwise), else C where it can
    read the model, else eager."""
    device = model.tok_embeddings.weight.device
    check_options(device, compile, cuda_graph)
    if device.type == "cuda" and quantized_mode(model) == "int8" and not compile:
        # The int8 product is fused only when compiled: say so rather than run slowly unannounced.
        if distributed.is_first_rank():
            print("llama: int8 on CUDA is fast with compile=True; without it each step converts every matrix "
                  "to bf16 first (slower than fp16)", file=sys.stderr)
    if cuda_graph:
        _refuse_model_parallel(model, "cuda_graph")
        return DecodeStep(model, "cuda_graph", GraphedDecodeStep(model))
    if compile:
        _refuse_model_parallel(model, "compile")
        return DecodeStep(model, "compiled", CompiledDecodeStep(model))
    if native.supports(model):
        return DecodeStep(model, "native", native.DecodeStep(model))
    if device.type == "cpu" and model.model_parallel_size > 1 and native.available() and distributed.is_first_rank():
        # On one machine the ranks split its cores and memory bandwidth, and each layer's two
        # all-reduces would cost a C step there more than it saves (benchmarks/cpu_mp.py).
        print(f"llama: on the CPU, {model.model_parallel_size} ranks decode with PyTorch's step; on one machine "
              "world size 1 (torchrun --nproc_per_node 1) loads this checkpoint too and decodes faster, in C "
              "on every core", file=sys.stderr)
    return DecodeStep(model)

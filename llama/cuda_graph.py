"""The one-token decode step replayed from a CUDA graph: `Llama.build(cuda_graph=True)`.

At batch 1 a 7B step is a few hundred small kernels, and eager PyTorch
launches them slower than the GPU runs them (benchmarks/NOTES.md, "On a
GPU"). A CUDA graph launches the whole step at once. `llama/decode_step.py`
chooses it for `Llama.build(cuda_graph=True)`.
Unlike `compile=True`, which also uses CUDA graphs, nothing is compiled: the
graph holds the kernels the eager forward runs, captured in well under a
second, so its numbers are the eager step's (on the tensor-position path
that `compile=True` uses too: attention spans the whole cache under a mask).
"""

from typing import Dict, Tuple

import torch

from llama.model import Transformer


class GraphedDecodeStep:
    """`model.forward(tokens, start_pos)` for one new token a row, replayed
    from a CUDA graph captured at the first step of each batch size.

    The graph holds the addresses of the model's weights and KV cache: it
    stays valid as long as those tensors do (a `Llama` never reallocates
    them). The logits returned are the graph's own output buffer, rewritten
    by the next replay, so they are read before the next step, as
    `generate` does.
    """

    def __init__(self, model: Transformer):
        self.model = model
        self.pool = torch.cuda.graph_pool_handle()  # shared by the graphs of every batch size
        self.graphs: Dict[int, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        bsz = tokens.shape[0]
        if bsz not in self.graphs:
            self.graphs[bsz] = self._capture(tokens, start_pos)
        graph, static_tokens, static_position, logits = self.graphs[bsz]
        static_tokens.copy_(tokens)
        static_position.fill_(start_pos)
        graph.replay()
        return logits

    def _capture(self, tokens: torch.Tensor, start_pos: int):
        device = tokens.device
        static_tokens = tokens.clone(memory_format=torch.contiguous_format)
        static_position = torch.full((1,), start_pos, dtype=torch.long, device=device)
        # Capture needs a warm-up run on a side stream (lazy initialisations
        # must not land in the graph). The warm-up computes this very step,
        # so the keys and values it writes into the cache are the ones the
        # first replay writes again.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.model.forward(static_tokens, static_position)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.forward(static_tokens, static_position)
        return graph, static_tokens, static_position, logits

"""Inference for Meta-format Llama checkpoints (Llama 2, Code Llama, Llama 3.x text), on CUDA or CPU, at any world size."""

import importlib
from typing import TYPE_CHECKING

# The one place the version is written; setup.py reads it from here.
__version__ = "0.1.0"

# The public names, imported on first use: `import llama.cli` (and so every
# command line's --help) must not pay for importing torch.
_EXPORTS = {
    "ChatPrediction": "llama.generation",
    "CompletionPrediction": "llama.generation",
    "Dialog": "llama.generation",
    "Llama": "llama.generation",
    "Message": "llama.generation",
    "ModelArgs": "llama.model",
    "Tokenizer": "llama.tokenizer",
    "Transformer": "llama.model",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from llama.generation import ChatPrediction, CompletionPrediction, Dialog, Llama, Message
    from llama.model import ModelArgs, Transformer
    from llama.tokenizer import Tokenizer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llama' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)

"""Process group, model parallelism, device and dtype: chosen here, once.

Meta's reference hard-codes NCCL and CUDA. Here the backend follows the
device (NCCL for CUDA, gloo for CPU), a plain `python` run with no torchrun
variables becomes a world of one, and the dtype defaults to half precision
on CUDA (as the reference's `torch.cuda.HalfTensor`) and fp32 elsewhere.
"""

import os
import sys
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def choose_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """The given device, or this process's GPU (`LOCAL_RANK`) when CUDA exists, else the CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def choose_dtype(device: torch.device, dtype: Optional[Union[str, torch.dtype]] = None) -> torch.dtype:
    """The given dtype, or fp16 on CUDA (as the reference) and fp32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating point type such as torch.float32, got {dtype}")
    return dtype


def planned_model_parallel_size(model_parallel_size: Optional[int] = None) -> int:
    """The model-parallel size `init_distributed` will set up, known before it runs:
    the one given, else the world size. Raises ValueError unless a positive int."""
    if model_parallel_size is None:
        default = dist.get_world_size() if dist.is_initialized() else 1
        model_parallel_size = int(os.environ.get("WORLD_SIZE", default))
    if isinstance(model_parallel_size, bool) or not isinstance(model_parallel_size, int) or model_parallel_size < 1:
        raise ValueError(f"model_parallel_size must be a positive int, got {model_parallel_size!r}")
    return model_parallel_size


def init_distributed(device: torch.device, model_parallel_size: Optional[int] = None) -> int:
    """Start the process group and fairscale's model parallelism if not yet done.

    Returns the model-parallel size. May be called again (a second `build`):
    a live process group is kept, and model parallelism is set up anew when
    the size asked for differs from the one in place.
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if _launched_by_torchrun():
            dist.init_process_group(backend)
        else:
            # A plain `python` run: a world of one that needs no port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    world_size = dist.get_world_size()
    model_parallel_size = planned_model_parallel_size(model_parallel_size)
    if world_size % model_parallel_size != 0:
        raise ValueError(
            f"model_parallel_size {model_parallel_size} does not divide the world size {world_size}"
        )

    if fs_init.model_parallel_is_initialized():
        if fs_init.get_model_parallel_world_size() == model_parallel_size:
            return model_parallel_size
        fs_init.destroy_model_parallel()
    fs_init.initialize_model_parallel(model_parallel_size)
    return model_parallel_size


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank()


def silence_other_ranks() -> None:
    """Send stdout of every rank but the first to /dev/null, as the reference does."""
    if dist.get_rank() > 0 and getattr(sys.stdout, "name", None) != os.devnull:
        sys.stdout = open(os.devnull, "w")


def is_first_rank() -> bool:
    """True on global rank 0 (or without a process group): the rank that reports progress."""
    return not dist.is_initialized() or dist.get_rank() == 0

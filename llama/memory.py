"""Will the KV cache fit? Its size, computed before anything is allocated.

The cache is allocated whole at build time: `max_batch_size` rows of
`max_seq_len` positions in every layer. A size that cannot fit would
otherwise grow until the kernel's OOM killer ends the process (and maybe
others on the machine), or until CUDA fails halfway through.
"""

import os
from typing import Optional

import torch

from llama.model import ModelArgs


def cache_bytes(args: ModelArgs, model_parallel_size: int, dtype: torch.dtype) -> int:
    """Bytes of one rank's KV cache (in `dtype`) and rotary table (float32), as
    `Transformer.setup_caches` allocates them."""
    n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
    # A rank keeps its share of the KV heads, or a copy of one (see Attention).
    n_local_kv_heads = max(1, n_kv_heads // model_parallel_size)
    head_dim = args.dim // args.n_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    kv = 2 * args.n_layers * args.max_batch_size * n_local_kv_heads * args.max_seq_len * head_dim * itemsize
    rope = 2 * (2 * args.max_seq_len) * head_dim * 4  # cos and signed sin over twice max_seq_len
    return kv + rope


def available_bytes(device: torch.device) -> Optional[int]:
    """Bytes that can be allocated on `device` now, or None where that is unknown.

    CPU: the kernel's MemAvailable (RAM free or reclaimable without swapping).
    CUDA: the device's free memory plus what torch's allocator holds unused.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return _cpu_available_bytes()
    return None


def _cpu_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    try:  # elsewhere: free pages only, an underestimate
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_cache_fits(
    args: ModelArgs, model_parallel_size: int, device: torch.device, dtype: torch.dtype, already_held: int = 0
) -> None:
    """Raise ValueError, giving the bytes needed and available, when the KV cache
    for `args.max_batch_size` x `args.max_seq_len` cannot be allocated on `device`.

    `already_held`: bytes of caches in place that the new ones replace.
    Nothing is checked where the available memory cannot be known.
    """
    needed = cache_bytes(args, model_parallel_size, dtype)
    available = available_bytes(device)
    if available is None:
        return
    available += already_held
    if needed > available:
        raise ValueError(
            f"the KV cache for max_batch_size={args.max_batch_size} and max_seq_len={args.max_seq_len} "
            f"needs {needed:,} bytes ({_gib(needed)}) on {device}, but only {available:,} bytes "
            f"({_gib(available)}) are available; build with a smaller max_seq_len or max_batch_size"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"

"""Memory: will the KV cache fit, and the pages a load maps and gives back.

The KV cache is allocated whole at build time: `max_batch_size` rows of
`max_seq_len` positions in every layer. A size that cannot fit would
otherwise grow until the kernel's OOM killer ends the process (and maybe
others on the machine), or until CUDA fails halfway through.

Shards are memory-mapped (`checkpoint.load_shard`): `MappedFiles` remembers
which files a loaded model still reads, `release_pages` and
`mapped_page_releaser` drop mapped pages once their contents were copied,
and `return_freed_memory` hands the heap's freed pages back to the system.
"""

import ctypes
import functools
import mmap
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from llama.args import ModelArgs


def cache_bytes(args: ModelArgs, model_parallel_size: int, dtype: torch.dtype) -> int:
    """Bytes of one rank's KV cache (in `dtype`) and rotary table (float32), as
    `Transformer.setup_caches` allocates them."""
    _, n_local_kv_heads = args.local_heads(model_parallel_size)
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


class MappedFiles:
    """The shard files a loaded model still reads through memory maps, and
    their size and modification time when they were opened.

    Writing such a file in place changes the model's weights under it, and
    truncating it makes the next read of a lost page kill the process with
    SIGBUS. `check()` compares each file with what it was: a cheap stat a
    file, run before each generation. A file replaced by a new one (renamed
    over the path) is harmless: the map keeps the old file's contents.
    """

    def __init__(self):
        # path -> (lowest, highest) address of its tensors' storages, and its stat
        self._ranges: Dict[str, Tuple[int, int]] = {}
        self._stats: Dict[str, os.stat_result] = {}

    def add(self, path, tensors) -> None:
        """Remember where the tensors of shard `path`, just opened, are mapped."""
        storages = [t.untyped_storage() for t in tensors if t.device.type == "cpu"]
        if not storages:
            return
        low = min(s.data_ptr() for s in storages)
        high = max(s.data_ptr() + s.nbytes() for s in storages)
        self._ranges[str(path)] = (low, high)
        self._stats[str(path)] = os.stat(path)

    def keep_used_by(self, tensors) -> "MappedFiles":
        """Forget the files none of `tensors` (the model's, once loaded) lies in; returns self."""
        pointers = []
        for tensor in tensors:
            if tensor.device.type == "cpu":
                try:
                    pointers.append(tensor.untyped_storage().data_ptr())
                except (NotImplementedError, RuntimeError):  # packed (opaque) weights: copies, never mapped
                    pass
        for path, (low, high) in list(self._ranges.items()):
            if not any(low <= p < high for p in pointers):
                del self._ranges[path], self._stats[path]
        return self

    @property
    def paths(self) -> List[str]:
        return sorted(self._ranges)

    def check(self) -> None:
        """Raise RuntimeError naming a mapped file that was rewritten or truncated since it was opened."""
        for path, before in self._stats.items():
            try:
                now = os.stat(path)
            except OSError:
                continue  # deleted: the map keeps the file's contents alive
            if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
                continue  # replaced by another file: the map still reads the old one
            if now.st_size != before.st_size or now.st_mtime_ns != before.st_mtime_ns:
                change = (
                    f"its size went from {before.st_size} to {now.st_size} bytes"
                    if now.st_size != before.st_size
                    else "it was rewritten in place"
                )
                raise RuntimeError(
                    f"checkpoint shard {path!r} changed on disk after it was loaded ({change}). "
                    "The model reads its weights from that file through a memory map, so its "
                    "output would change or the process would be killed (SIGBUS). Build the "
                    "model again, or build with mmap=False to hold the weights in memory."
                )


_MADV_DONTNEED = 4  # Linux


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the memory-mapped pages wholly inside `tensor` from resident memory.

    Without this, a shard's pages read while slicing or converting stay
    resident next to the copies until the shard is unmapped, so a join or a
    bf16 -> fp32 load would peak at 1.5-2x. The mapping is file-backed, so a
    later read would fetch the bytes again; pages shared with a neighbouring
    tensor are left alone. A no-op where madvise is not available.
    """
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them after a load's
    temporaries are freed, so resident memory would stay above the model's size)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def mapped_page_releaser(paths) -> Callable[[torch.Tensor], None]:
    """A function that drops a tensor's pages from resident memory (`release_pages`)
    when the tensor lies wholly in a mapping of one of the files `paths`, and
    leaves any other tensor alone (dropping anonymous pages would lose data).

    For copies made after loading (`Llama.build`'s fast layout): the mapped
    original of each matrix stops counting against memory once it is copied.
    The mappings are those of the moment it is called (Linux: /proc/self/maps).
    """
    names = {str(Path(p).resolve()) for p in paths}
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() in names:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass

    def release(tensor: torch.Tensor) -> None:
        first = tensor.data_ptr()
        if tensor.device.type == "cpu" and any(s <= first and first + tensor.nbytes <= e for s, e in ranges):
            release_pages(tensor)

    return release


@functools.lru_cache(maxsize=None)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

"""The one-token decoding step in C (`llama/native.c`) on the CPU: fp32 or bf16
activations, with fp32, bf16, int8 or int4 weights.

`pip install -e .` compiles `llama/native.c` into `llama/_native*.so` where a
C compiler is found (setup.py; the build is optional). Where the library is
there, `Llama.build` on the CPU in fp32 or bf16 lays the weights out for it
(Meta's [out, in] matrices, q|k|v and w1|w3 stacked, copied into RAM: layout
"native" in `llama.kernels`), and int8 and int4 models with fp32 activations
keep their kernels' matrices (each kernel's `c_matrix()` says what C reads;
`Transformer.kernel_slots()` lists the slots). Every one-token
step of a model on one rank then runs through `llama_decode_step`
(`llama.decode_step` chooses it); prompts and everything else run the eager
forward on the same weights. Where it is not, fp32 runs torch's kernels
("transposed" layout) and one line says why. `LLAMA_NATIVE=0` turns it off.

The library holds the products for several instruction sets (on x86-64:
avx512bf16, avx512, avx2, portable) and runs the fastest the CPU can;
`LLAMA_NATIVE_ISA=<name>` picks another (`variant()` names the one that runs).
A name the CPU cannot run, or an unknown one, is refused with one line on
stderr, and the fastest runs instead.

Each step runs on as many OpenMP threads as torch uses, or fewer while fewer
measure faster (`ThreadCount`: on a machine whose cores other jobs hold, a
product's threads wait for a descheduled peer at every barrier).
`LLAMA_NATIVE_THREADS=<n>` fixes the count.
"""

import ctypes
import importlib.machinery
import os
import statistics
import struct
import sys
import time
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from llama import distributed

ABI = 12  # LLAMA_NATIVE_ABI in native.c
ISA_VARIABLE = "LLAMA_NATIVE_ISA"
PROMPT_VARIABLE = "LLAMA_NATIVE_PROMPT"
THREADS_VARIABLE = "LLAMA_NATIVE_THREADS"
FP32, INT8, INT4, BF16 = 0, 1, 2, 3  # llama_matrix kinds
DTYPES = (torch.float32, torch.bfloat16)  # of a model's activations the step runs

_lib: Optional[ctypes.CDLL] = None
_reason: Optional[str] = None  # why the library is not used, once known
_noticed = False
_variant_notice: Optional[str] = None  # said once where the kernels that run are not the CPU's fastest
_prompt_notice: Optional[str] = None  # said once where LLAMA_NATIVE_PROMPT names no product


class _Matrix(ctypes.Structure):
    """native.c's llama_matrix."""

    _fields_ = [("kind", ctypes.c_int64), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("group", ctypes.c_int64), ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    """native.c's llama_model, field for field."""

    _fields_ = [
        *[(name, ctypes.c_int64) for name in (
            "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden", "vocab", "max_seq", "max_batch",
            "rope_rows", "bf16",
        )],
        ("eps", ctypes.c_double),
        *[(name, ctypes.c_void_p) for name in (
            "tok_embeddings", "attention_norm", "wqkv", "wo", "ffn_norm", "w13", "w2", "cache_k", "cache_v",
            "norm", "output", "rope",
        )],
    ]


def library_path() -> Optional[Path]:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_native{suffix}"
        if path.is_file():
            return path
    return None


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib
    if os.environ.get("LLAMA_NATIVE", "1") == "0":
        _reason = "LLAMA_NATIVE=0 is set"
        return None
    path = library_path()
    if path is None:
        _reason = "llama/native.c was not compiled (pip install -e . compiles it where a C compiler is found)"
        return None
    # A file cut short (an interrupted copy or install) passes the loader's
    # checks and then kills the process with SIGBUS when a missing page is
    # touched: its size is checked against what its headers say it holds.
    try:
        size, needed = path.stat().st_size, _elf_extent(path)
    except OSError as error:
        _reason = f"{path.name} did not load ({error})"
        return None
    if needed is not None and size < needed:
        _reason = (f"{path.name} is cut short ({size} bytes of the {needed} its ELF headers describe): "
                   "run pip install -e . again")
        return None
    torch.get_num_threads()  # torch's OpenMP runtime is loaded first: the library then uses the same one
    try:
        lib = ctypes.CDLL(str(path))
        lib.llama_native_abi.restype = ctypes.c_int64
        abi = lib.llama_native_abi()
    except (OSError, AttributeError) as error:
        _reason = f"{path.name} did not load ({error})"
        return None
    if abi != ABI:
        _reason = f"{path.name} is from another version of llama (ABI {abi}, not {ABI}): run pip install -e . again"
        return None
    lib.llama_scratch_floats.restype = ctypes.c_int64
    lib.llama_scratch_floats.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64]
    lib.llama_matmul_scratch_floats.restype = ctypes.c_int64
    lib.llama_matmul_scratch_floats.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.llama_matmul.restype = None
    lib.llama_matmul.argtypes = [ctypes.POINTER(_Matrix), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_void_p]
    lib.llama_dequantize.restype = ctypes.c_int64
    lib.llama_dequantize.argtypes = [ctypes.POINTER(_Matrix), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.llama_decode_step.restype = ctypes.c_int64
    lib.llama_decode_step.argtypes = [
        ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64,
    ]
    lib.llama_decode_rows.restype = ctypes.c_int64
    lib.llama_decode_rows.argtypes = [
        ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64,
    ]
    lib.llama_forward_rows.restype = ctypes.c_int64
    lib.llama_forward_rows.argtypes = [
        ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
    ]
    lib.llama_mt19937_advance.restype = ctypes.c_int64
    lib.llama_mt19937_advance.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    for name in ("llama_native_variants", "llama_native_variant", "llama_native_best_variant"):
        getattr(lib, name).restype = ctypes.c_char_p
    for name in ("llama_native_can_run", "llama_native_use"):
        getattr(lib, name).restype = ctypes.c_int64
        getattr(lib, name).argtypes = [ctypes.c_char_p]
    _choose_variant(lib)
    _lib = lib
    return lib


def _elf_extent(path: Path) -> Optional[int]:
    """The bytes an ELF file must hold for its section header table and its
    segments to be whole (at least its size where they are not: the loader
    would read past its end). None for a file that is no ELF or is shorter
    than the ELF header: the loader refuses those itself, naming why."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            return None
        wide = ident[4] == 2  # ELFCLASS64, else 32-bit
        order = "<" if ident[5] == 1 else ">"
        word = order + ("Q" if wide else "I")
        # The rest of the header: e_type e_machine e_version e_entry e_phoff e_shoff e_flags
        # e_ehsize e_phentsize e_phnum e_shentsize e_shnum e_shstrndx.
        header = struct.Struct(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"))
        fields = f.read(header.size)
        if len(fields) < header.size:
            return None
        _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _ = header.unpack(fields)
        needed = 16 + header.size
        if shoff:
            # A count of 0 sections (0xffff segments) means: the real one is in section 0.
            if (shnum == 0 or phnum == 0xFFFF) and shoff + shentsize <= size:
                first = _read_at(f, shoff, shentsize)
                if shnum == 0 and len(first) >= (40 if wide else 24):
                    shnum = struct.unpack_from(word, first, 32 if wide else 20)[0]  # sh_size
                if phnum == 0xFFFF and len(first) >= (48 if wide else 32):
                    phnum = struct.unpack_from(order + "I", first, 44 if wide else 28)[0]  # sh_info
            needed = max(needed, shoff + max(shnum, 1) * shentsize)
        needed = max(needed, phoff + phnum * phentsize)
        if needed > size or phentsize < (56 if wide else 32):
            return needed
        table = _read_at(f, phoff, phnum * phentsize)
        # p_offset and p_filesz of each program header.
        offset_at, filesz_at = (8, 32) if wide else (4, 16)
        for start in range(0, len(table), phentsize):
            offset = struct.unpack_from(word, table, start + offset_at)[0]
            filesz = struct.unpack_from(word, table, start + filesz_at)[0]
            needed = max(needed, offset + filesz)
        return needed


def _read_at(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _choose_variant(lib: ctypes.CDLL) -> None:
    """Run the variant LLAMA_NATIVE_ISA names where the CPU can, else the fastest; keep the line
    to say (`notice_variant`) where that is not the CPU's fastest, or the name was refused."""
    global _variant_notice
    best = lib.llama_native_best_variant().decode()
    wanted = os.environ.get(ISA_VARIABLE, "")
    can = lib.llama_native_use((wanted or best).encode())
    if not wanted or wanted == best:
        _variant_notice = None
    elif can == 1:
        _variant_notice = (f"llama: the C step runs its {wanted} kernels ({ISA_VARIABLE}={wanted}); "
                           f"this CPU's fastest are {best}")
    else:
        lib.llama_native_use(best.encode())
        why = ("this CPU cannot run them" if can == 0 else
               f"there are none of that name (there are {lib.llama_native_variants().decode()})")
        _variant_notice = f"llama: {ISA_VARIABLE}={wanted} is refused: {why}; the C step runs its {best} kernels"


def variant() -> Optional[str]:
    """The name of the kernels the C step runs (None where it is not available)."""
    lib = _load()
    return lib.llama_native_variant().decode() if lib is not None else None


def variants() -> List[str]:
    """The kernel variants this CPU can run, fastest first (empty where the C step is not available)."""
    lib = _load()
    if lib is None:
        return []
    names = lib.llama_native_variants().decode().split(",")
    return [name for name in names if lib.llama_native_can_run(name.encode()) == 1]


def notice_variant() -> None:
    """One line on stderr, once per process (first rank only), where the kernels that run are not the
    CPU's fastest (LLAMA_NATIVE_ISA) or the variable named kernels that cannot run."""
    global _variant_notice
    _load()
    if _variant_notice is None:
        return
    if distributed.is_first_rank():
        print(_variant_notice, file=sys.stderr)
    _variant_notice = None


def prompt_product() -> str:
    """Who multiplies x by a matrix the C step reads in the eager forward (a prompt, and its last
    position's logits):

    - "c": the C products (`llama_matmul`), fp32, int8 and int4 alike; they read each weight once
      for every row of x, in registers a few rows at a time, and each row's sums are the ones the
      C step takes for that row alone;
    - "torch": fp32 matrices by torch's matrix product (MKL), and int8 and int4 by the C products
      below `PROMPT_ROWS` rows, made fp32 a block of rows at a time for torch's product above.

    `LLAMA_NATIVE_PROMPT=c|torch` picks (another value is refused with one line on stderr).
    Otherwise "c" on an AMD CPU running an AVX-512 variant, where whole prompts of 16 to 512
    tokens ran 1.25x to 2.2x faster in C than with torch's product (a Zen 5 EPYC,
    benchmarks/prompt_products.py and NOTES.md), and "torch"
    elsewhere: on the AVX2 EPYC torch's product of fp32 blocks was the faster from 64 rows on, and
    on Intel CPUs MKL's product was not measured against C. The choice depends on the CPU only,
    never on timings, so the same machine always gives the same sums."""
    global _prompt_notice
    wanted = os.environ.get(PROMPT_VARIABLE, "").strip()
    if wanted in ("c", "torch"):
        return wanted if wanted == "torch" or available() else "torch"
    if wanted and _prompt_notice is None:
        _prompt_notice = f"llama: {PROMPT_VARIABLE}={wanted} is refused: it takes c or torch; the CPU's default runs"
        if distributed.is_first_rank():
            print(_prompt_notice, file=sys.stderr)
    return "c" if (variant() or "").startswith("avx512") and cpu_vendor() == "AuthenticAMD" else "torch"


def cpu_vendor() -> Optional[str]:
    """The CPU's vendor string as /proc/cpuinfo gives it ("AuthenticAMD", "GenuineIntel"), None where unknown."""
    global _vendor
    if _vendor is None:
        _vendor = ""
        try:
            with open("/proc/cpuinfo") as info:
                for line in info:
                    if line.startswith("vendor_id"):
                        _vendor = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return _vendor or None


_vendor: Optional[str] = None


def available() -> bool:
    """True where the compiled step can be used (built, loadable, not turned off)."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why `available()` is False (None when it is True)."""
    _load()
    return _reason


def notice_fallback() -> None:
    """One line on stderr, once per process (first rank only), when fp32 on the CPU falls back to torch."""
    global _noticed
    reason = unavailable_reason()
    if _noticed or reason is None:
        return
    _noticed = True
    if distributed.is_first_rank():
        print(f"llama: fp32 on the CPU decodes with torch's kernels, slower at batch 1: {reason}", file=sys.stderr)


def advance_generator(generator: torch.Generator, outputs: int) -> bool:
    """Move a CPU generator past `outputs` of its 32-bit draws without making them
    (`llama_mt19937_advance` on its `get_state()`); False, and the generator as it was, where the
    library is not loaded or does not recognise the state."""
    lib = _load()
    if lib is None:
        return False
    state = generator.get_state()
    if lib.llama_mt19937_advance(state.data_ptr(), state.numel(), outputs) != 0:
        return False
    generator.set_state(state)
    return True


def _checked(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.dtype != dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise RuntimeError(f"the native step needs contiguous {dtype} CPU tensors, got {tensor.dtype} "
                           f"{tuple(tensor.shape)} {tensor.stride()} on {tensor.device}")
    return tensor


def _index_vector(values, name: str) -> torch.Tensor:
    """`values` (a 1-D tensor or a list of ints) as a contiguous int64 CPU tensor."""
    vector = torch.as_tensor(values)
    if vector.dim() != 1 or (vector.numel() and (vector.is_floating_point() or vector.is_complex()
                                                 or vector.dtype == torch.bool)):
        raise ValueError(f"{name} must be one integer a row, shape (bsz,); got {vector.dtype} {tuple(vector.shape)}")
    return vector.to("cpu", torch.int64).contiguous()


def matrix(kernel, keep: List) -> "_Matrix":
    """The C description of one slot's kernel, from what its `c_matrix()` names:
    an int8 or int4 matrix, or a dense fp32 / bf16 [out, in] one stored row by row.
    Raises RuntimeError where C cannot read it."""
    described = kernel.c_matrix() if hasattr(kernel, "c_matrix") else None
    if described is None:
        raise RuntimeError(f"the native step cannot read a {type(kernel).__name__}: it reads the native layout "
                           "(kernels.prepare(model, 'native')) and the int8 and int4 kernels")
    kind, weight, scale, group = described
    if kind != "dense":
        return _quantized_matrix(weight, scale, _KINDS[kind], group, kernel.out_features, keep)
    weight = _checked(weight, torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32)
    keep.append(weight)
    kind = BF16 if weight.dtype == torch.bfloat16 else FP32
    return _Matrix(kind, weight.shape[0], weight.shape[1], 0, weight.data_ptr(), None)


def supports(model) -> bool:
    """Whether `DecodeStep(model)` can run `model`: CPU, one rank, and either
    fp32 activations with every matrix fp32 in the native layout or int8 / int4
    in a kernel C reads, or bf16 throughout with the matrices in the native layout."""
    weight = model.tok_embeddings.weight
    if not (available() and model.model_parallel_size == 1 and weight.device.type == "cpu"
            and weight.dtype in DTYPES):
        return False
    try:
        keep: List = []
        kinds = {matrix(getattr(owner, slot), keep).kind for owner, slot, _ in model.kernel_slots()}
    except RuntimeError:
        return False
    return kinds == {BF16} if weight.dtype == torch.bfloat16 else BF16 not in kinds


_KINDS = {"int8": INT8, "int4": INT4}


def _quantized_parts(kernel):
    """(w, scale or None, kind, group) of an int8 or int4 kernel module that C reads, else None."""
    described = kernel.c_matrix() if hasattr(kernel, "c_matrix") else None
    if described is None or described[0] not in _KINDS:
        return None
    kind, w, scale, group = described
    return w, scale, _KINDS[kind], group


def _quantized_matrix(w: torch.Tensor, scale: Optional[torch.Tensor], kind: int, group: int, rows: int,
                      keep: List) -> "_Matrix":
    """The C description of an int8 matrix (w int8 [rows, cols], scale fp32 [rows]) or an int4 one
    (w `NativeInt4Linear.packed`, no scale)."""
    if kind == INT8:
        w, scale = _checked(w, torch.int8), _checked(scale, torch.float32)
        keep += [w, scale]
        return _Matrix(INT8, rows, w.shape[1], 0, w.data_ptr(), scale.data_ptr())
    w = _checked(w, torch.uint8)
    if w.dim() != 3 or w.shape[2] != 8 * group + 64 or not 0 <= 16 * w.shape[0] - rows < 16:
        raise ValueError(f"int4 records of shape {tuple(w.shape)} do not hold {rows} rows in groups of {group}")
    keep.append(w)
    return _Matrix(INT4, rows, w.shape[1] * group, group, w.data_ptr(), None)


def matmul(kernel, x: torch.Tensor) -> torch.Tensor:
    """x (..., in) times an int8 or int4 kernel module's matrix, in C: the eager
    forward (prompts) of the matrices only C reads. A custom op, so that
    `torch.compile` keeps it as one opaque call."""
    parts = _quantized_parts(kernel)
    if parts is None:
        raise RuntimeError(f"the native product cannot read a {type(kernel).__name__}")
    notice_variant()
    return torch.ops.llama.native_matmul(x, *parts, kernel.out_features)


def dense_matmul(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x (..., in) times an fp32 [out, in] matrix stored row by row, in C (`prompt_product`)."""
    notice_variant()
    return torch.ops.llama.native_matmul(x, rows, None, FP32, 0, rows.shape[0])


@torch.library.custom_op("llama::native_matmul", mutates_args=())
def _native_matmul(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor], kind: int, group: int,
                   rows: int) -> torch.Tensor:
    """y (..., rows) = x (..., cols) W^T, W described as `_quantized_matrix` takes it, or (kind FP32)
    an fp32 [rows, cols] matrix."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the native product is not available: {unavailable_reason()}")
    if kind == FP32:
        w = _checked(w, torch.float32)
        desc = _Matrix(FP32, rows, w.shape[1], 0, w.data_ptr(), None)
    else:
        desc = _quantized_matrix(w, scale, kind, group, rows, [])
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    if x2.shape[1] != desc.cols:
        raise ValueError(f"input of {x2.shape[1]} features for a matrix of {desc.cols} columns")
    if kind != FP32 and x2.shape[0] >= PROMPT_ROWS and prompt_product() == "torch":
        y = _dequantized_product(lib, desc, x2)
    else:
        y = torch.empty(x2.shape[0], rows, dtype=torch.float32)
        work = torch.empty(lib.llama_matmul_scratch_floats(x2.shape[0], x2.shape[1]), dtype=torch.float32)
        lib.llama_matmul(ctypes.byref(desc), x2.data_ptr(), y.data_ptr(), x2.shape[0], work.data_ptr())
    return y.view(*x.shape[:-1], rows).to(x.dtype)


# From this many rows of x on (a prompt), where `prompt_product()` is "torch", the weights are made
# fp32 a block of rows at a time and multiplied by torch's matrix product, instead of each row of x
# converting every weight again.
PROMPT_ROWS = 64
_BLOCK_FLOATS = 1 << 21  # 8 MB of fp32 weights a block


def blocked_product(x: torch.Tensor, rows: int, cols: int, fill, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x [n, cols] (fp32) W^T for a W [rows, cols] that `fill(first, count, buffer)` writes into the
    fp32 `buffer` a block of rows at a time (whole 16-row int4 tiles), as [count, cols] or, where it
    returns True, transposed [cols, count]; torch's matrix product then multiplies every row of x by
    the block. The result, [n, rows], is stored in `dtype` (rounded once)."""
    block = max(16, _BLOCK_FLOATS // cols // 16 * 16)
    buffer = torch.empty(min(block, rows) * cols, dtype=torch.float32)
    y = torch.empty(x.shape[0], rows, dtype=dtype)
    for first in range(0, rows, block):
        n = min(block, rows - first)
        if fill(first, n, buffer):
            y[:, first:first + n] = torch.mm(x, buffer[:n * cols].view(cols, n))
        else:
            y[:, first:first + n] = torch.mm(x, buffer[:n * cols].view(n, cols).t())
    return y


def _dequantized_product(lib: ctypes.CDLL, desc: "_Matrix", x: torch.Tensor) -> torch.Tensor:
    """x [n, cols] W^T as `_native_matmul` computes it, W made fp32 by C a block at a time."""

    def fill(first: int, n: int, buffer: torch.Tensor) -> bool:
        transposed = lib.llama_dequantize(ctypes.byref(desc), first, n, buffer.data_ptr())
        if transposed < 0:
            raise ValueError(f"llama_dequantize reads int8 and int4 matrices, not kind {desc.kind}")
        return bool(transposed)

    return blocked_product(x, desc.rows, desc.cols, fill)


@_native_matmul.register_fake
def _(x, w, scale, kind, group, rows):
    return x.new_empty(*x.shape[:-1], rows)


def fixed_threads() -> Optional[int]:
    """The thread count LLAMA_NATIVE_THREADS fixes, or None where it is unset (the count adapts)."""
    text = os.environ.get(THREADS_VARIABLE, "").strip()
    if not text:
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{THREADS_VARIABLE}={text!r}: expected a whole number of threads, 1 or more")
    return count


class ThreadCount:
    """How many threads the C step runs on: the most (torch's count) unless fewer measure faster.

    On an idle machine every thread has a core, and more threads are faster (or, for a tiny
    model, barely slower). When other jobs hold the cores, each product's threads wait at its
    barrier for a peer the kernel has descheduled, and a step can take a hundred times longer
    on two threads than on one. So the count is re-chosen from the step times themselves: now
    and then one step runs on the neighbouring count (half, or double up to the most), and the
    count moves there when that step was clearly faster than the recent steps at this one.

    A count is first tried after four steps, and again only after the steps since it last ran have
    taken `patience` times its last step, or `longest_wait` seconds if that is sooner. Each try that
    does not move the count doubles that patience, up to `most_patience`: on a machine that stays
    as it is, trying costs less and less (where one thread takes 1.6x two: about 3.5% of the time
    with a patience that stays at 10, 0.6% with the doubling, over 2000 steps). The patience is
    back at `patience` after a move; and where the recent steps have become `slower` times slower
    or faster than at the last try or move (the machine has changed: other jobs came or went),
    the neighbouring counts are tried at once. A machine that changes is thus noticed within a
    few steps, and never later than `longest_wait` seconds of decoding.
    """

    def __init__(self, most: int, patience: float = 10.0, longest_wait: float = 2.0, faster: float = 0.8,
                 most_patience: float = 160.0, slower: float = 1.5):
        self.most, self.patience, self.longest_wait, self.faster = most, patience, longest_wait, faster
        self.most_patience, self.slower = most_patience, slower
        self.current = most
        self._recent: deque = deque(maxlen=8)  # seconds of the latest steps at `current`
        self._last: Dict[int, float] = {}  # count -> seconds of its latest step
        self._since: Dict[int, float] = {}  # count -> seconds of steps run since it last ran
        self._patience: Dict[int, float] = {}  # count -> its patience, where a try has doubled it
        self._settled: Optional[float] = None  # the recent steps' median at the last try or move
        self._trying: Optional[int] = None

    def _neighbours(self) -> List[int]:
        return sorted({max(1, self.current // 2), min(self.most, self.current * 2)} - {self.current})

    def choose(self) -> int:
        """The count to run the next step on."""
        if len(self._recent) >= 4:
            typical = statistics.median(self._recent)
            if self._settled is not None and not self._settled / self.slower <= typical <= self.slower * self._settled:
                # The steps have slowed down or sped up: the machine has changed, and what the
                # other counts measured before is no guide. They are tried again at once.
                self._patience.clear()
                self._settled = None
                for count in self._neighbours():
                    self._last.pop(count, None)
            for count in self._neighbours():
                last = self._last.get(count)  # None: never run, so tried at once
                patience = self._patience.get(count, self.patience)
                if last is None or self._since.get(count, 0.0) >= min(patience * last, self.longest_wait):
                    self._trying = count
                    return count
        self._trying = None
        return self.current

    def record(self, count: int, seconds: float) -> None:
        """The step that `choose` gave `count` took `seconds`."""
        for other in self._since:
            self._since[other] += seconds
        self._since.setdefault(count, 0.0)
        self._since[count] = 0.0
        self._last[count] = seconds
        if count != self._trying:
            for other in self._neighbours():
                self._since.setdefault(other, 0.0)
            self._recent.append(seconds)
            return
        self._trying = None
        typical = statistics.median(self._recent)
        if seconds < self.faster * typical:
            self._last[self.current], self._since[self.current] = typical, 0.0
            self.current = count
            self._recent.clear()
            self._recent.append(seconds)
            self._patience.clear()
            self._settled = seconds
        else:
            self._patience[count] = min(2 * self._patience.get(count, self.patience), self.most_patience)
            self._settled = typical


# The most rows (tokens) of one llama_forward_rows call: its scratch grows with them, about
# 60 KB a row at the 100M shape and 310 KB at 7B.
PIECE_ROWS = 256


class DecodeStep:
    """`model.forward(tokens, start_pos)` for one token per row (tokens (bsz, 1)), in C; and
    `rows(tokens, positions, cache_rows)`, the step of rows each at a position and in a cache row
    of its own.

    Returns the same float32 logits (bsz, 1, vocab), to float rounding (in a
    bf16 model, to the rounding of two bf16 kernels: each value is rounded to
    bf16 where the eager forward stores one, the sums are in fp32). The
    model's tensors are read in place: the KV cache gets this position's keys
    and values as the eager forward would write them, so the two can take
    turns (prompts run eager, then the steps here).

    A row's logits are the same bits whatever other rows share its step (up to
    the cache's max_batch_size rows): each of its sums is taken alone, in the
    same order at any batch size.
    """

    def __init__(self, model):
        if not supports(model):
            raise ValueError("the native step needs a CPU model on one rank: fp32 with its matrices in the native "
                             "layout or quantized int8 / int4, or bf16 in the native layout")
        self.model = model
        self._lib = _load()
        notice_variant()
        self._bound_to = None
        self._scratch = torch.empty(0, dtype=torch.float32)  # grown to the largest call's rows
        self._fixed_threads = fixed_threads()
        self._threads: Dict[int, ThreadCount] = {}  # batch size -> its chooser

    def _bind(self) -> None:
        """Point the C struct at the model's current tensors (again after a reload or a new cache)."""
        model, params = self.model, self.model.params
        dtype = model.tok_embeddings.weight.dtype
        keep: List = []

        def ptr(tensor: torch.Tensor, dtype: torch.dtype = dtype) -> int:
            keep.append(_checked(tensor, dtype))
            return tensor.data_ptr()

        def per_layer(get) -> int:
            array = (ctypes.c_void_p * len(model.layers))(*[ptr(get(layer)) for layer in model.layers])
            keep.append(array)
            return ctypes.addressof(array)

        def matrices(owner_of, slot) -> int:
            array = (_Matrix * len(model.layers))(
                *[matrix(getattr(owner_of(layer), slot), keep) for layer in model.layers]
            )
            keep.append(array)
            return ctypes.addressof(array)

        output = matrix(model.output_kernel, keep)
        keep.append(output)
        attention = model.layers[0].attention
        self._model = _Model(
            dim=params.dim, n_layers=len(model.layers), n_heads=attention.n_local_heads,
            n_kv_heads=attention.n_local_kv_heads, head_dim=attention.head_dim,
            hidden=model.layers[0].feed_forward.w2.in_features, vocab=params.vocab_size,
            max_seq=attention.cache_k.shape[2], max_batch=attention.cache_k.shape[0], rope_rows=model.rope.shape[1],
            bf16=int(dtype == torch.bfloat16), eps=model.norm.eps,
            tok_embeddings=ptr(model.tok_embeddings.weight),
            attention_norm=per_layer(lambda layer: layer.attention_norm.weight),
            wqkv=matrices(lambda layer: layer.attention, "qkv_kernel"),
            wo=matrices(lambda layer: layer.attention, "wo_kernel"),
            ffn_norm=per_layer(lambda layer: layer.ffn_norm.weight),
            w13=matrices(lambda layer: layer.feed_forward, "w13_kernel"),
            w2=matrices(lambda layer: layer.feed_forward, "w2_kernel"),
            cache_k=per_layer(lambda layer: layer.attention.cache_k),
            cache_v=per_layer(lambda layer: layer.attention.cache_v),
            norm=ptr(model.norm.weight), output=ctypes.addressof(output), rope=ptr(model.rope, torch.float32),
        )
        self._keep = keep
        self._bound_to = model.layout_version

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        bsz = tokens.shape[0]
        ids = tokens.reshape(bsz).to(torch.int64).contiguous()
        positions = torch.full((bsz,), int(start_pos), dtype=torch.int64)
        return self._run(ids, positions, torch.arange(bsz)).view(bsz, 1, -1)

    def rows(self, tokens, positions, cache_rows) -> torch.Tensor:
        """One step of rows each on its own: row b is token tokens[b] at position positions[b], its
        keys and values in the KV cache's row cache_rows[b] (written at that position; attention
        reads positions 0 .. positions[b] of that cache row). Each argument: (bsz,) integers, as
        a tensor or a list. Returns float32 logits (bsz, vocab). Raises IndexError for a token
        outside the vocabulary, ValueError for a position or a cache row outside the cache, a cache
        row given twice, or a batch larger than the cache (the cache is untouched then)."""
        ids, positions, cache_rows = (_index_vector(values, name) for values, name in (
            (tokens, "tokens"), (positions, "positions"), (cache_rows, "cache_rows")))
        if not len(ids) == len(positions) == len(cache_rows):
            raise ValueError(f"one position and one cache row a token: got {len(ids)} tokens, {len(positions)} "
                             f"positions and {len(cache_rows)} cache rows")
        return self._run(ids, positions, cache_rows)

    def prompts_and_rows(self, prompts, tokens, positions, cache_rows) -> Tuple[torch.Tensor, torch.Tensor]:
        """The last position's logits of each prompt of `prompts` ((token ids (seqlen,), cache row)
        pairs, each placed at position 0 of its cache row), and one step of rows as `rows` takes it
        (tokens, positions, cache_rows: (bsz,) each; bsz may be 0), with the weights read once for
        all: (float32 logits (len(prompts), vocab), (bsz, vocab)).

        Every token is a row of its own (llama_forward_rows), so each prompt's logits and keys and
        values are the same bits as that prompt's alone, with or beside any other rows, and the
        step's as `rows` gives them. The rows go in calls of at most `PIECE_ROWS`: the step's rows
        first, then the prompts' tokens in order, a long prompt over several calls. Everything is
        checked before the first call, so that an error leaves the cache as it was: IndexError for
        a token outside the vocabulary, ValueError for a position, a cache row or a prompt outside
        the cache, an empty prompt, or a cache row given twice."""
        ids, step_positions, step_rows = (_index_vector(values, name) for values, name in (
            (tokens, "tokens"), (positions, "positions"), (cache_rows, "cache_rows")))
        if not len(ids) == len(step_positions) == len(step_rows):
            raise ValueError(f"one position and one cache row a token: got {len(ids)} tokens, "
                             f"{len(step_positions)} positions and {len(step_rows)} cache rows")
        if self._bound_to != self.model.layout_version:
            self._bind()
        all_ids, all_positions, all_rows, wanted = [ids], [step_positions], [step_rows], list(range(len(ids)))
        length, cache = min(self._model.max_seq, self._model.rope_rows), self._model.max_batch
        at, rows = step_positions.tolist(), step_rows.tolist()
        taken = set(rows)
        if len(taken) < len(rows) or len(rows) > cache or not all(0 <= a < length for a in at) or not all(
                0 <= r < cache for r in rows):
            raise ValueError(self._outside_the_cache(at, rows))
        total = len(ids)
        for p, (prompt, cache_row) in enumerate(prompts):
            prompt, cache_row = _index_vector(prompt, "a prompt's tokens"), int(cache_row)
            if len(prompt) == 0:
                raise ValueError(f"prompt {p} is empty: a prompt needs one token at least")
            if len(prompt) > length:
                raise ValueError(f"prompt {p} of {len(prompt)} tokens is longer than the cache ({length} positions)")
            if not 0 <= cache_row < cache:
                raise ValueError(f"prompt {p}'s cache row {cache_row} is outside the cache ({cache} rows: 0 to "
                                 f"{cache - 1})")
            if cache_row in taken:
                raise ValueError(f"prompt {p}'s cache row {cache_row} is given twice: each prompt and each row of "
                                 "a step needs a cache row of its own")
            taken.add(cache_row)
            all_ids.append(prompt)
            all_positions.append(torch.arange(len(prompt), dtype=torch.int64))
            all_rows.append(torch.full((len(prompt),), cache_row, dtype=torch.int64))
            total += len(prompt)
            wanted.append(total - 1)
        ids, positions, cache_rows = torch.cat(all_ids), torch.cat(all_positions), torch.cat(all_rows)
        if len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < self._model.vocab:
            bad = int(((ids < 0) | (ids >= self._model.vocab)).nonzero()[0])
            where, start = f"row {bad} of the step", len(step_rows)
            for p, part in enumerate(all_ids[1:]):
                if start <= bad < start + len(part):
                    where = f"prompt {p}, position {bad - start}"
                start += len(part)
            raise IndexError(f"token id {int(ids[bad])} ({where}) is outside the vocabulary of {self._model.vocab} "
                             f"(0 to {self._model.vocab - 1})")
        logits = torch.empty(len(wanted), self._model.vocab, dtype=torch.float32)
        done = 0  # logits filled
        for first in range(0, len(ids), PIECE_ROWS):
            end = min(first + PIECE_ROWS, len(ids))
            piece = [w - first for w in wanted[done:] if w < end]
            part = self._forward(ids[first:end], positions[first:end], cache_rows[first:end],
                                 torch.tensor(piece, dtype=torch.int64))
            logits[done : done + len(piece)] = part
            done += len(piece)
        bsz = len(wanted) - len(prompts)
        return logits[bsz:], logits[:bsz]

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor) -> torch.Tensor:
        """The C step of contiguous int64 (bsz,) tensors, one row to a cache row: logits (bsz, vocab)."""
        return self._forward(ids, positions, cache_rows, None)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor,
                 logit_rows: Optional[torch.Tensor]) -> torch.Tensor:
        """llama_decode_rows (logit_rows None), else llama_forward_rows: logits (rows, vocab)."""
        if self._bound_to != self.model.layout_version:
            self._bind()
        bsz = ids.shape[0]
        needed = self._lib.llama_scratch_floats(ctypes.byref(self._model), bsz)
        if self._scratch.numel() < needed:
            self._scratch = torch.empty(needed, dtype=torch.float32)
        logits = torch.empty(bsz if logit_rows is None else len(logit_rows), self._model.vocab, dtype=torch.float32)
        threads = self._thread_count(bsz)
        count = threads.choose() if threads is not None else self._fixed_threads
        start = time.perf_counter()
        if logit_rows is None:
            status = self._lib.llama_decode_rows(
                ctypes.byref(self._model), ids.data_ptr(), bsz, positions.data_ptr(), cache_rows.data_ptr(),
                logits.data_ptr(), self._scratch.data_ptr(), count,
            )
        else:
            status = self._lib.llama_forward_rows(
                ctypes.byref(self._model), ids.data_ptr(), bsz, positions.data_ptr(), cache_rows.data_ptr(),
                logit_rows.data_ptr(), len(logit_rows), logits.data_ptr(), self._scratch.data_ptr(), count,
            )
        if threads is not None:
            threads.record(count, time.perf_counter() - start)
        if status == -1:
            raise IndexError(f"a token id is outside the vocabulary of {self._model.vocab}: {ids.tolist()}")
        if status == -3:
            raise MemoryError("no memory was left for the attention's scores")
        if status != 0:
            raise ValueError(self._outside_the_cache(positions.tolist(), cache_rows.tolist(), logit_rows is None))
        return logits

    def _outside_the_cache(self, positions: List[int], cache_rows: List[int], one_per_cache_row: bool = True) -> str:
        """What C refused in rows that do not fit the cache (llama_decode_rows returned -2)."""
        rows, length = self._model.max_batch, min(self._model.max_seq, self._model.rope_rows)
        if not positions:
            return "an empty batch: a step needs one row at least"
        if len(positions) > rows and one_per_cache_row:
            return f"batch {len(positions)} is outside the cache ({rows} rows, {length} positions)"
        for b, (position, cache_row) in enumerate(zip(positions, cache_rows)):
            if not 0 <= position < length:
                return f"row {b}: position {position} is outside the cache ({length} positions: 0 to {length - 1})"
            if not 0 <= cache_row < rows:
                return f"row {b}: cache row {cache_row} is outside the cache ({rows} rows: 0 to {rows - 1})"
            if cache_row in cache_rows[:b] and one_per_cache_row:
                return (f"rows {cache_rows.index(cache_row)} and {b} both name cache row {cache_row}: "
                        "each row of a step needs a cache row of its own")
        return f"the C step refused rows at positions {positions} in cache rows {cache_rows}"

    def _thread_count(self, bsz: int) -> Optional[ThreadCount]:
        """The chooser of the threads of a step of `bsz` rows; None where LLAMA_NATIVE_THREADS fixes
        them. One a batch size: a chooser compares a step's time with its recent steps', and a
        server's batch changes size from step to step. A new one when torch's count changes
        (torch.set_num_threads)."""
        if self._fixed_threads is not None:
            return None
        most = torch.get_num_threads()
        chooser = self._threads.get(bsz)
        if chooser is None or chooser.most != most:
            chooser = self._threads[bsz] = ThreadCount(most)
        return chooser

"""Process group, model parallelism, device and dtype: chosen here, once.

Meta's reference hard-codes NCCL and CUDA. Here the backend follows the
device (NCCL for CUDA, gloo for CPU), a plain `python` run with no torchrun
variables becomes a world of one, and the dtype defaults to half precision
on CUDA (as the reference's `torch.cuda.HalfTensor`) and fp32 elsewhere.
"""

import atexit
import contextlib
import datetime
import gc
import math
import os
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


# The variables torchrun sets for each process that the library reads, with their least value.
LAUNCH_VARIABLES = {"WORLD_SIZE": 1, "RANK": 0, "LOCAL_RANK": 0}


def launch_variable(name: str, default: int) -> int:
    """The whole number in the environment variable `name` (one of LAUNCH_VARIABLES), or
    `default` when it is unset. Raises ValueError naming the variable and its value
    when that is not a whole number of at least the variable's least value."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < LAUNCH_VARIABLES[name]:
        raise ValueError(
            f"the environment variable {name} must be a whole number >= {LAUNCH_VARIABLES[name]}, "
            f"got {text!r} (torchrun sets it for each process; unset it for a plain python run)"
        )
    return value


def check_launch_variables() -> None:
    """Raise ValueError, naming it, for a set WORLD_SIZE, RANK or LOCAL_RANK that is not a usable number."""
    for name in LAUNCH_VARIABLES:
        launch_variable(name, 0)


def choose_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """The given device, or this process's GPU (`LOCAL_RANK`) when CUDA exists, else the CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", launch_variable("LOCAL_RANK", 0))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", launch_variable("LOCAL_RANK", 0))
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
        model_parallel_size = launch_variable("WORLD_SIZE", default)
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
        # Imported before the group exists: its functions' `group=group.WORLD` defaults,
        # evaluated at import, would otherwise hold the default group (and, for gloo, its
        # threads) until the interpreter is torn down; see _end_process_group_at_exit.
        import torch.distributed.nn  # noqa: F401

        if _launched_by_torchrun():
            dist.init_process_group(backend)
        else:
            # A plain `python` run: a world of one that needs no port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(_end_process_group_at_exit)

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


def _end_process_group_at_exit() -> None:
    """Leave no thread of ours or of gloo's running when the interpreter is torn down.

    A thread that is inside a C++ call with the GIL released when the interpreter
    finalizes is ended by CPython as it takes the GIL back, and that unwinding through
    C++ aborts the process: "terminate called without an active exception" (SIGABRT),
    after the script's work was done. Two such threads were left: the peer watch, in
    a store operation (stopped, but not waited for), and gloo's work threads, which
    `destroy_process_group` does not end: they end when their group is freed, and
    fairscale's module globals (and, before, torch.distributed.nn's defaults) kept
    the groups until the teardown itself. So the watch is stopped and waited for,
    fairscale lets go of its groups, and the groups are destroyed and freed here,
    while the interpreter is whole (torch releases the GIL while freeing a group,
    so its threads can finish). Not for NCCL: there a group's shutdown can wait on
    the device, and it was not seen to fail.
    """
    _stop_peer_watch()
    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    with contextlib.suppress(Exception):
        fs_init.destroy_model_parallel()
        dist.destroy_process_group()
    gc.collect()  # a group held in a reference cycle is freed now, not at the teardown


def _stop_peer_watch() -> None:
    global _peer_watch
    if _peer_watch is not None:
        _peer_watch.stop()
        _peer_watch = None


def end_process(status: int = 0) -> None:
    """End this process with `status`; under torchrun with gloo, without the C++ teardown.

    A finished multi-rank gloo job now and then ended with SIGABRT in the
    teardown ("terminate called without an active exception"); the exit
    handler (`_end_process_group_at_exit`) now ends the threads that caused
    it, and this goes further: where it applies (gloo, more than one rank,
    status 0), each rank waits at a barrier, so that none leaves while a peer
    still needs it, flushes its output and logging, and ends with `os._exit`,
    past any C++ teardown. The scripts end this way; a script of your own may
    too, as its last line. Otherwise (one process, NCCL, a failure) this is
    `sys.exit(status)`.
    """
    if status != 0 or not dist.is_initialized() or dist.get_world_size() == 1 or dist.get_backend() != "gloo":
        sys.exit(status)
    try:
        dist.barrier()
    except Exception as error:
        if not is_collective_failure(error):
            raise
        _exit(f"error: a collective failed at exit: {error}")
    _stop_peer_watch()
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank()


def silence_other_ranks() -> None:
    """Send stdout of every rank but the first to /dev/null, as the reference does."""
    if dist.get_rank() > 0 and getattr(sys.stdout, "name", None) != os.devnull:
        sys.stdout = open(os.devnull, "w")


def is_first_rank() -> bool:
    """True on global rank 0 (or without a process group): the rank that reports progress."""
    return not dist.is_initialized() or dist.get_rank() == 0


# -- frozen peers -------------------------------------------------------------------------------
#
# A rank that stops (SIGSTOP, a lost link) leaves the others waiting in a
# collective for torch's default timeout of 30 minutes. `build` can set a
# shorter one once loading is over; `PeerWatch` then learns which rank went
# quiet, and `exit_when_a_peer_is_lost` (the scripts) turns either into one
# line on rank 0 and a non-zero exit on every rank.


def check_collective_timeout(seconds) -> None:
    if seconds is None:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"collective_timeout_s must be a finite number of seconds > 0, got {seconds!r}")


def _groups() -> List:
    """Every process group this process's collectives use: the default one and fairscale's."""
    groups = [None]
    if fs_init.model_parallel_is_initialized():
        groups += [fs_init.get_model_parallel_group(), fs_init.get_data_parallel_group()]
        groups.append(fs_init.get_pipeline_parallel_group())
    return groups


def set_collective_timeout(seconds: Optional[float]) -> None:
    """Make each collective of this process's groups fail (raise) after `seconds`
    without an answer; None restores torch's default."""
    from torch.distributed import distributed_c10d

    if seconds is None:
        timeout = distributed_c10d.default_pg_timeout
    else:
        timeout = datetime.timedelta(seconds=seconds)
    # torch 2.14 made it public as dist.set_timeout and deprecated the private name with a
    # FutureWarning that every rank would print.
    set_timeout = getattr(dist, "set_timeout", None) or distributed_c10d._set_pg_timeout
    for group in _groups():
        with contextlib.suppress(ValueError):  # a group this rank is not in
            set_timeout(timeout, group)


class PeerWatch:
    """Each rank adds to a counter of its own in the process group's store
    every `interval` seconds, from a thread; rank 0 notes when it last saw each
    counter move. A stopped process stops counting, so rank 0 can tell which
    rank stopped answering. Counters, not clocks: nodes' clocks may differ.
    """

    def __init__(self, timeout_s: float):
        from torch.distributed import distributed_c10d

        self.timeout_s = timeout_s
        self.interval = min(max(timeout_s / 5, 0.1), 5.0)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._store = distributed_c10d._get_default_store()
        self._last_seen: Dict[int, float] = {r: time.monotonic() for r in range(self.world_size)}
        self._counts: Dict[int, int] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llama-peer-watch", daemon=True)
        self._thread.start()

    def _key(self, rank: int) -> str:
        return f"llama/alive/{rank}"

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self._store.add(self._key(self.rank), 1)
                if self.rank == 0:
                    self._look()
            except Exception:  # the store went away: the job is ending
                return

    def _look(self) -> None:
        now = time.monotonic()
        for rank in range(1, self.world_size):
            count = self._store.add(self._key(rank), 0)  # reads without blocking
            if count != self._counts.get(rank):
                self._counts[rank] = count
                self._last_seen[rank] = now
        lost = self.lost_ranks(self.timeout_s)
        if lost and _exit_on_lost_peer.is_set():
            _exit(None if a_peer_showed_an_error() else _lost_peer_line(lost, self.timeout_s))

    def lost_ranks(self, quiet_s: Optional[float] = None) -> List[int]:
        """Ranks (seen from rank 0) that have not counted for `quiet_s` seconds (default: 3 intervals)."""
        quiet_s = max(3 * self.interval, 1.0) if quiet_s is None else quiet_s
        now = time.monotonic()
        return [rank for rank, seen in sorted(self._last_seen.items()) if rank != 0 and now - seen > quiet_s]

    def stop(self) -> None:
        """Stop counting, and wait (a few seconds at most) for the thread to end: one left
        inside a store operation when the interpreter exits aborts the process."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 2 * self.interval))


_peer_watch: Optional[PeerWatch] = None
# Also where the caller, not init_distributed, made the process group (and no exit handler of
# ours ends it): a watch thread left running into the interpreter's teardown aborts the process.
atexit.register(_stop_peer_watch)


def relax_collective_timeout() -> None:
    """Before loading again (a second `build`): torch's long default timeout, no watch."""
    if _peer_watch is not None:
        _stop_peer_watch()
        set_collective_timeout(None)


def start_collective_timeout(seconds: Optional[float]) -> None:
    """After loading: wait for every rank (torch's long timeout), then let each
    collective wait at most `seconds` and watch which peers still answer.
    None keeps torch's default timeout. A world of one needs neither."""
    global _peer_watch
    if seconds is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    # Ranks finish loading at different times; the short timeout starts after this.
    dist.barrier()
    set_collective_timeout(seconds)
    _stop_peer_watch()
    _peer_watch = PeerWatch(seconds)


def _lost_peer_line(lost: List[int], seconds: float) -> str:
    which = ", ".join(map(str, lost))
    return (
        f"error: rank{'s' if len(lost) > 1 else ''} {which} stopped answering (nothing for {seconds:g} s, "
        "the collective timeout); stopping every rank"
    )


_exit_lock = threading.Lock()


def _exit(line: Optional[str]) -> None:
    """Print `line` (once, whichever thread gets here first) and end this process with status 1 at once:
    a normal exit would wait in the process group's shutdown for the peer that is gone."""
    with _exit_lock:
        if line:
            print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    signs = ("Timed out", "gloo/transport", "Connection closed by peer", "Connection reset by peer", "NCCL", "Broken pipe")
    return isinstance(error, RuntimeError) and any(sign in text for sign in signs)


# -- which rank shows an error -----------------------------------------------------------------
#
# Rank 0 speaks for the job. But an error that only another rank meets (its own shard
# damaged) would then never be seen: that rank exits, and torchrun ends rank 0 before it
# has anything to say. So, once the process group exists, a rank other than 0 first gives
# rank 0 a moment to report an error from the same place (the same check failing on every
# rank: a KV cache too large everywhere); if rank 0 does not, it shows its own error itself,
# after its rank. Each place is shown once, through the process group's store.

ERROR_GRACE_S = 2.0
_RANK_0_ERROR = "llama/error/rank0"  # where rank 0's error was raised
_SHOWN = "llama/error/shown"  # set once any rank has shown an error


def share_from_rank_0(command):
    """Rank 0's `command` (any picklable object), on every rank of the process group
    (`broadcast_object_list`); `command` itself without a group of several. The chat and
    the server send rank 0's decisions this way, so that every rank runs the same steps."""
    if not in_a_group_of_several():
        return command
    box = [command]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def in_a_group_of_several() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def claim_error(site: str) -> Optional[str]:
    """Under a process group of several ranks, for an error of this process raised at
    `site` (its type and where it was raised): the text to put before its message when
    this rank is to show it ('' on rank 0, 'rank N: ' on another), or None when another
    rank shows an error from the same place."""
    from torch.distributed import distributed_c10d

    rank = dist.get_rank()
    prefix = "" if rank == 0 else f"rank {rank}: "
    try:
        store = distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=10))  # the process ends next: never wait long
        if rank == 0:
            store.set(_RANK_0_ERROR, site)
        else:
            deadline = time.monotonic() + ERROR_GRACE_S
            while not store.check([_RANK_0_ERROR]) and time.monotonic() < deadline:
                time.sleep(0.05)
            if store.check([_RANK_0_ERROR]) and store.get(_RANK_0_ERROR).decode() == site:
                return None
        if store.add(f"llama/error/at/{site}", 1) > 1:
            return None  # another rank has shown it
        store.set(_SHOWN, "1")
    except Exception:  # no store to agree through: better shown twice than not at all
        pass
    return prefix


def a_peer_showed_an_error() -> bool:
    """True when another rank of the process group has shown an error of its own: this
    rank's collective failures then follow from it, and need no line of their own."""
    if not in_a_group_of_several():
        return False
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store().check([_SHOWN])
    except Exception:
        return False


def is_explained_by_a_peer(error: BaseException) -> bool:
    """True for a collective that failed because a peer that has shown its own error left."""
    return is_collective_failure(error) and a_peer_showed_an_error()


_exit_on_lost_peer = threading.Event()


@contextlib.contextmanager
def exit_when_a_peer_is_lost() -> Iterator[None]:
    """For the scripts: when a peer stops answering within the collective
    timeout (`build(collective_timeout_s=...)`, inside or before the block),
    rank 0 prints one line naming it and every rank exits with status 1,
    instead of waiting on. Rank 0 notices a silent peer even while no
    collective runs (the chat waiting for input). Without a timeout set, or
    with one rank, this does nothing."""
    _exit_on_lost_peer.set()
    try:
        yield
    except Exception as error:
        watch = _peer_watch
        if watch is None or not is_collective_failure(error):
            raise
        if watch.rank != 0 or a_peer_showed_an_error():
            _exit(None)  # rank 0 speaks for the job (its stdout is the one shown), or a peer has
        lost = watch.lost_ranks()
        _exit(_lost_peer_line(lost, watch.timeout_s) if lost else f"error: a collective failed: {error}")
    finally:
        _exit_on_lost_peer.clear()

"""Tool output that appears whole or not at all.

The command-line tools (`llama.reshard`, `llama.convert_hf`, `llama.tiny`,
...) write a directory of several files, some of them gigabytes. Written in
place, an interrupted run would leave a truncated `.pth` next to a complete
`params.json`: a directory that looks like a checkpoint, and that blocks a
rerun. `output_dir` writes into a temporary directory beside the
destination and renames it into place only once everything is written; on an
error, SIGINT or SIGTERM the temporary directory is removed instead.
Before the rename every file and the directory itself are flushed to disk
(fsync), and the parent after it, so that a power loss cannot leave a
complete-looking destination with empty files. A write that fails because
the disk is full is reported as such, with the space needed and free.
"""

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Iterator, Optional


def destination_problem(path) -> Optional[str]:
    """Why a tool may not write its output to `path`, or None when `path` is
    absent or an empty directory (not a symbolic link to one). The one
    wording of this check: the command lines say it too
    (`cli.refuse_used_destination`)."""
    path = Path(path)
    if path.is_symlink():
        # The output directory is renamed into place at the end, and a
        # directory cannot replace a link: refused before any work is done.
        try:
            target = os.readlink(path)
        except OSError as e:
            target = f"unreadable: {e.strerror}"
        return (
            f"{str(path)!r} is a symbolic link (to {target!r}); the output is a directory renamed into place, "
            "which cannot replace a link: give the directory it points to, or a new path"
        )
    try:
        in_use = path.exists() and (not path.is_dir() or any(path.iterdir()))
    except OSError as e:  # a directory we may not list
        return f"cannot look into {str(path)!r} ({e.strerror}); choose a new destination"
    return f"{str(path)!r} exists and is not an empty directory; choose a new one" if in_use else None


def require_new_dir(path) -> None:
    """Raise FileExistsError unless `path` is absent or an empty directory."""
    problem = destination_problem(path)
    if problem is not None:
        raise FileExistsError(problem)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a new file gets from `open(path, "w")` under the current umask."""
    return 0o666 & ~_umask()


def _default_dir_mode() -> int:
    return 0o777 & ~_umask()


@contextlib.contextmanager
def _signals_raise(cleaning: threading.Event) -> Iterator[None]:
    """While the block runs, SIGINT raises KeyboardInterrupt and SIGTERM
    SystemExit(143), so that `finally` clauses run; once `cleaning` is set,
    further signals are ignored until the block has left. Signals that were
    ignored before stay ignored. Only the main thread can set handlers;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if cleaning.is_set():
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


# torch.save reports a failed write in these words, without the OS's reason
# (caffe2/serialize/inline_container.cc, and the C++ stream it writes through).
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed", "iostream error")


def _says_disk_full(error: BaseException) -> Optional[bool]:
    """True when `error` says the disk is full; None when it is a failed write
    that does not say why (torch's); False for anything else."""
    if isinstance(error, WriteFailed):
        return error.full
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    text = str(error)
    # safetensors' SafetensorError carries Rust's io::Error text.
    if "No space left on device" in text or "os error 28" in text:
        return True
    if isinstance(error, RuntimeError) and any(words in text for words in _TORCH_WRITE_FAILURES):
        return None
    return False


class WriteFailed(OSError):
    """A write of a tool's output failed (`writing`): `needed_bytes` is what the
    whole output takes, `full` whether the disk said it is full (None: torch
    does not say why a write failed)."""

    def __init__(self, cause: BaseException, needed_bytes: Optional[int] = None):
        self.full = _says_disk_full(cause)
        self.needed_bytes, self.cause = needed_bytes, cause
        need = "" if needed_bytes is None else f"; the output needs about {needed_bytes:,} bytes"
        super().__init__(f"{'no space left on device' if self.full else 'a write failed'} ({cause}){need}")
        self.errno = errno.ENOSPC if self.full else errno.EIO


@contextlib.contextmanager
def writing(needed_bytes: int) -> Iterator[None]:
    """Around the writes of a tool's output: a write that fails (a full disk:
    torch's, safetensors' or the OS's words for it) becomes `WriteFailed`,
    which `output_dir` turns into an error naming the destination, the
    `needed_bytes` (the tensors' bytes in all the output's files) and the
    space free. Other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        if _says_disk_full(error) is False:
            raise
        raise WriteFailed(error, needed_bytes) from error


def _release_frames(error: BaseException) -> None:
    """Drop the local variables of the finished frames of `error`'s tracebacks,
    so that the file a failed `torch.save` still holds open is closed and its
    space freed when the temporary directory is removed (an unlinked file
    that is still open keeps its blocks)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _size(n: int) -> str:
    if n >= 2**30:
        return f"{n:,} bytes ({n / 2**30:.2f} GiB)"
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)" if n >= 2**20 else f"{n:,} bytes"


def _write_failure_error(error: BaseException, dst: Path) -> Optional[OSError]:
    """The error to raise for `error`, raised while writing the output for `dst` and
    after its temporary directory is removed; None when it is not a failed write."""
    if _says_disk_full(error) is False:
        return None
    failure = error if isinstance(error, WriteFailed) else WriteFailed(error)
    free = shutil.disk_usage(dst.parent).free
    needed = failure.needed_bytes
    full = failure.full or (failure.full is None and needed is not None and free < needed)
    if full:
        need = f"needs about {_size(needed)}, and " if needed is not None else "failed, and "
        message = (
            f"no space left on device: writing {str(dst)!r} {need}{_size(free)} are free on its file system "
            "(with the partial output removed); free some space or choose a destination on another disk"
        )
        code = errno.ENOSPC
    else:
        # torch's words, and room enough (or no size to compare with): not known to be a full disk.
        why = (
            f", enough for the {_size(needed)} needed, so the disk is not full (a disk quota? a failing disk?)"
            if needed is not None else " (a full disk?)"
        )
        message = f"could not write {str(dst)!r}: {failure.cause}; {_size(free)} are free on its file system{why}"
        code = errno.EIO
    result = OSError(message)  # one argument: str() is the message alone
    result.errno = code
    return result


@contextlib.contextmanager
def output_dir(dst) -> Iterator[Path]:
    """Yield a new temporary directory beside `dst`; when the block ends
    normally, flush every file in it and the directory to disk (fsync), move
    it to `dst` (one rename) with the permissions a new directory gets (or
    those of the empty `dst` it replaces), and flush the parent directory.

    Raises FileExistsError before anything is written unless `dst` is absent
    or an empty directory (not a symbolic link). When the block raises, or
    SIGINT or SIGTERM arrive while it runs (SIGTERM exits with status 143),
    the temporary directory is removed and `dst` and its parents are left as
    they were: parents created for it are removed again. A write that failed
    for want of space (see `writing`) is re-raised as an OSError (errno
    ENOSPC) that names `dst`, the bytes needed and the bytes free once the
    partial output is gone.
    """
    dst = Path(dst).absolute()
    require_new_dir(dst)
    created_parents = [p for p in reversed(dst.parents) if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    cleaning = threading.Event()
    with _signals_raise(cleaning):
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
            yield tmp
            os.chmod(tmp, dst.stat().st_mode & 0o7777 if dst.is_dir() else _default_dir_mode())
            sync_tree(tmp)  # else a power loss after the rename could leave empty files in place
            try:
                os.rename(tmp, dst)  # POSIX replaces an empty directory in one step
            except OSError:
                require_new_dir(dst)  # filled meanwhile: refuse rather than merge
                dst.rmdir()
                os.rename(tmp, dst)
            sync_directory(dst.parent)  # the rename itself
        except BaseException as error:
            cleaning.set()
            failed_write = isinstance(error, Exception) and _says_disk_full(error) is not False
            if failed_write:
                _release_frames(error)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            for parent in reversed(created_parents):
                with contextlib.suppress(OSError):
                    parent.rmdir()
            explained = _write_failure_error(error, dst) if failed_write else None
            if explained is not None:
                raise explained from error
            raise


# Some file systems and platforms refuse fsync on a directory: then there is nothing more to do.
_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


def _fsync(path, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (directory and e.errno in _FSYNC_UNSUPPORTED):
            raise
    finally:
        os.close(fd)


def sync_directory(path) -> None:
    """fsync the directory `path`, so that its entries (a rename into it) survive a power loss."""
    _fsync(path, directory=True)


def sync_tree(path) -> None:
    """fsync every file under `path`, then every directory, `path` itself last."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name), directory=False)
        _fsync(root, directory=True)

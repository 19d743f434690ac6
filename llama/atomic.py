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
complete-looking destination with empty files.
"""

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
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


@contextlib.contextmanager
def output_dir(dst) -> Iterator[Path]:
    """Yield a new temporary directory beside `dst`; when the block ends
    normally, flush every file in it and the directory to disk (fsync), move
    it to `dst` (one rename) with the permissions a new directory gets (or
    those of the empty `dst` it replaces), and flush the parent directory.

    Raises FileExistsError before anything is written unless `dst` is absent
    or an empty directory (not a symbolic link). When the block raises, or
    SIGINT or SIGTERM arrive while it runs (SIGTERM exits with status 143),
    the temporary directory is removed and `dst` and its parents are left as they were:
    parents created for it are removed again.
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
        except BaseException:
            cleaning.set()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            for parent in reversed(created_parents):
                with contextlib.suppress(OSError):
                    parent.rmdir()
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

"""The ``local`` transfer backend (``local://`` and ``file://`` locations): copies on a file system
the site shares with the location, e.g. a project directory mounted on the login and compute nodes.
``local:///prefix`` puts the location's paths under ``/prefix``; errors are still filed under the
destinations the agent passed.

Each task runs in a worker thread. A file or directory is copied next to its destination under a
hidden temporary name and renamed into place, so a destination is either absent, the old version
or the complete new one, never half-written (a directory copied onto an existing one is merged
into it, each file renamed into place, a symlink there replaced by a directory, never followed;
a destination that is itself a symlink to a directory is copied into, the link kept, as rsync
does) (an agent killed mid-copy leaves only a ``.NAME.balsam-partial-HOST-PID-START-*`` file,
which the next copy of that destination removes once that process no longer runs: a copy in
progress to the same destination is left alone). An error names the destination, never the
temporary. A sparse source (a file with holes) is copied with its holes,
only its data ranges written (``SEEK_DATA``/``SEEK_HOLE``). Task ids live
in this process: after an agent restart they are ``unknown`` and the agent copies those items
again, which is harmless because copies are atomic and idempotent.

Cancelling a task (the agent does when every job of the task was deleted, and when a task passes
``transfers.task_timeout_sec``) stops it between chunks of the file being copied (``CHUNK_BYTES``),
between files, and before the rename: the temporary copy is removed, so nothing more lands at a
destination. Files already renamed into place stay.

Stopping the agent (:meth:`ThreadedTasks.close`) stops every task the same way and waits for them
at most ``CLOSE_WAIT_SEC``: a copy blocked in a ``read()`` that never returns (a hung NFS mount)
cannot be interrupted, so the workers are daemon threads that never hold up the process's exit.
The items of a task stopped by close stay ``active`` on the server with their task id; the next
agent finds that id ``unknown`` and copies them again (the crash recovery of the transfers module),
so nothing is lost, marked done, or charged a failed try.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import queue
import shutil
import socket
import stat
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import attrs

from ..options import option
from ..states import TransferDirection
from ..transfer import TaskState, TaskStatus, TransferBackend, TransferError, TransferFile, TransferLocation, one_line
from ..util import process_start_time, same_process

__all__ = ["CopyCancelled", "LocalTransfer", "LocalTransferOptions", "StopFlag", "ThreadedTasks", "copy_into_place"]

logger = logging.getLogger(__name__)

PARTIAL_MARK = ".balsam-partial-"
#: Bytes copied between two looks at the stop flag: large enough to keep the kernel's copy fast
#: (one sendfile call each), small enough that a stop lands within a fraction of a second.
CHUNK_BYTES = 64 * 1024 * 1024
#: Longest wait of close() for tasks to notice their stop flag (the agent's stop waits 45 s in all).
CLOSE_WAIT_SEC = 10.0


class CopyCancelled(Exception):
    """The task was cancelled before the copy was renamed into place (the copy was removed)."""


def at_least_one(instance: object, attribute: "attrs.Attribute", value: int) -> None:
    """attrs validator: the settings loader reports the message on the option's own line."""
    if value < 1:
        raise ValueError(f"must be at least 1, got {value!r}")


@attrs.frozen
class LocalTransferOptions:
    threads: int = option(4, "Tasks copying at the same time (one thread each); at least 1.", validator=at_least_one)


class StopFlag(threading.Event):
    """A task's stop flag: :meth:`set` also runs the callbacks the task registered (the rsync
    backend kills the process group of the rsync it is waiting for), so a task blocked in a
    subprocess stops at once rather than at its next look at the flag."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []
        self._callbacks_lock = threading.Lock()

    def add_callback(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the flag is set (at once if it already is)."""
        with self._callbacks_lock:
            self._callbacks.append(fn)
            already = self.is_set()
        if already:
            fn()

    def remove_callback(self, fn: Callable[[], None]) -> None:
        with self._callbacks_lock:
            if fn in self._callbacks:
                self._callbacks.remove(fn)

    def set(self) -> None:
        with self._callbacks_lock:
            super().set()
            callbacks = list(self._callbacks)
        for fn in callbacks:
            try:
                fn()
            except Exception as exc:  # one failing callback must not keep the others from running
                logger.warning("stopping a transfer task: %s", exc)


def _check_stop(stop: Optional[threading.Event], dest: Path) -> None:
    if stop is not None and stop.is_set():
        raise CopyCancelled(f"cancelled before {dest} was written")


def _data_ranges(fd: int, size: int) -> Optional[list[tuple[int, int]]]:
    """Where a file with holes (a sparse file) has data: ``(start, end)`` ranges, from
    ``SEEK_DATA``/``SEEK_HOLE``; None when the file system cannot say (then every byte is copied)."""
    if not hasattr(os, "SEEK_DATA"):
        return None
    ranges: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # a hole to the end
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if end <= start:
                return None
            ranges.append((start, end))
            pos = end
    except OSError:
        return None
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return ranges


def _copy_sparse(fin: int, fout: int, dst: Path, ranges: list[tuple[int, int]], size: int,
                 stop: Optional[threading.Event]) -> None:
    """Copy only the data ranges of a sparse file, leaving its holes holes (a 1 GB file of 4 bytes
    of data took 1 GB of the destination's disk and quota), looking at ``stop`` between chunks."""
    use_sendfile = hasattr(os, "sendfile")
    for start, end in ranges:
        pos = start
        while pos < end:
            _check_stop(stop, dst)
            want = min(CHUNK_BYTES, end - pos)
            os.lseek(fout, pos, os.SEEK_SET)
            sent = 0
            if use_sendfile:
                try:
                    sent = os.sendfile(fout, fin, pos, want)
                except OSError:
                    use_sendfile = False
                    continue
            else:
                block = os.pread(fin, min(want, 1024 * 1024), pos)
                view = memoryview(block)
                while view:
                    view = view[os.write(fout, view):]
                sent = len(block)
            if sent == 0:  # the file shrank while being copied
                break
            pos += sent
    os.ftruncate(fout, size)


def _copy_file(src: Path, dst: Path, stop: Optional[threading.Event]) -> None:
    """Copy a file's bytes and mode in chunks of CHUNK_BYTES (sendfile, else read/write), looking
    at ``stop`` between chunks: a big copy stops within a chunk, not when it ends. A sparse source
    (fewer blocks than its size) is copied with its holes (see _copy_sparse)."""
    with open(src, "rb") as fin, open(dst, "wb", buffering=0) as fout:
        st = os.fstat(fin.fileno())
        size = st.st_size
        if stat.S_ISREG(st.st_mode) and size and getattr(st, "st_blocks", size) * 512 < size:
            ranges = _data_ranges(fin.fileno(), size)
            if ranges is not None:
                _copy_sparse(fin.fileno(), fout.fileno(), dst, ranges, size, stop)
                shutil.copymode(src, dst)
                return
        offset, use_sendfile = 0, hasattr(os, "sendfile")
        while True:
            _check_stop(stop, dst)
            if use_sendfile:
                try:
                    sent = os.sendfile(fout.fileno(), fin.fileno(), offset, CHUNK_BYTES)
                except OSError:
                    # Not supported for this pair of files (a pipe, a tty, some file systems): reads.
                    use_sendfile = False
                    if fin.seekable():
                        fin.seek(offset)
                    continue
                if sent == 0 and offset >= size:
                    break
                if sent == 0:  # the file shrank while being copied
                    break
                offset += sent
            else:
                # os.read returns what there is (a pipe's data so far), where a buffered read waits for all.
                block = os.read(fin.fileno(), min(CHUNK_BYTES, 1024 * 1024))
                if not block:
                    break
                view = memoryview(block)
                while view:
                    view = view[fout.write(view) or 0:]
                offset += len(block)
    shutil.copymode(src, dst)


def _resolve(path: Path) -> Optional[Path]:
    """``path`` with its links followed, or None for a link loop (A -> B -> A): Python 3.11 raises
    RuntimeError for one, later versions OSError ELOOP."""
    try:
        return path.resolve()
    except RuntimeError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise


def symlink_problem(path: str) -> str:
    """Why ``path`` cannot be read when a symbolic link on its way (itself, or a directory above it)
    points to nothing or into a loop, one line naming that link: ``X is a symbolic link to T, which
    does not exist`` or ``X is a symbolic link to T: a symbolic link loop``; '' when ``path``
    exists or no link explains its absence (a file simply missing). The words of the agent's check
    of a stage-out's source, of the rsync backend's look before it runs and of a link out of a tree
    here: all read ``no such file or directory: <path>`` while ``ls`` listed the path."""
    if os.path.exists(path):
        return ""
    p = Path(os.path.abspath(path))
    try:
        for q in (*reversed(p.parents), p):
            if not q.is_symlink():
                continue
            target = os.readlink(q)
            resolved = _resolve(q)
            if resolved is None:
                return f"{q} is a symbolic link to {target}: a symbolic link loop"
            if not resolved.exists():
                # A chain (result.h5 -> inner.h5 -> /scratch/gone.h5): ls shows inner.h5, so say where it ends.
                leads = f" (which leads to {resolved})" if os.path.islink(os.path.join(q.parent, target)) else ""
                return f"{q} is a symbolic link to {target}{leads}, which does not exist"
    except OSError:
        return ""  # changed while looked at: the caller's own words
    return ""


def _climbs_out(parent: Path, target: str) -> bool:
    """Whether a link ``target`` at ``parent`` (relative to a tree's root) is unsafe as rsync's
    --copy-unsafe-links judges it, on its text: absolute, or its ``..`` leave the root."""
    return os.path.isabs(target) or os.path.normpath(os.path.join(parent, target)).split(os.sep)[0] == ".."


def _copy_tree(src: Path, dst: Path, stop: Optional[threading.Event]) -> None:
    """Copy a directory as rsync --copy-unsafe-links does. A symlink whose text stays inside the
    tree (relative, its ``..`` read at its place in the tree) stays a link, as it is (a dangling one
    and a loop too: rsync copies them as links). One pointing out of it (absolute, or ``../`` past
    the root) is replaced by what it points to, which would otherwise dangle at the destination;
    the links inside a directory so copied are judged the same way, at their place in the copy
    (against ``src``'s root, as rsync does): a directory linked in from scratch arrives with its
    own links out of it copied too, not left pointing into scratch. Such a link that points to
    nothing, into a loop, or to a directory holding it (copied into itself for ever) raises
    OSError naming it, as rsync fails the item (exit 23: "symlink has no referent", "Too many
    levels of symbolic links"): one outcome from both backends."""

    def copy(a: str, b: str) -> None:
        _copy_file(Path(a), Path(b), stop)

    shutil.copytree(src, dst, symlinks=True, copy_function=copy)
    below = [dst]
    while below:
        top = below.pop()
        for link in sorted(p for p in top.rglob("*") if p.is_symlink()):
            _check_stop(stop, dst)
            rel = link.relative_to(dst)
            target = os.readlink(link)
            if not _climbs_out(rel.parent, target):
                continue  # the copy's link points into the copy
            # Named in the job's tree: through its links, where this part of the copy came from.
            original = src / rel
            resolved = _resolve(original)
            if resolved is None or not resolved.exists():
                raise OSError(symlink_problem(str(original))
                              or f"{original} is a symbolic link to {target}, which cannot be followed")
            if resolved.is_dir():
                holders = (Path(os.path.realpath(src / d)) for d in (rel.parent, *rel.parent.parents))
                if any(resolved == h or resolved in h.parents for h in holders):
                    raise OSError(f"{original} is a symbolic link to {target}, a directory holding it "
                                  "(its copy would hold itself, without end)")
                link.unlink()
                shutil.copytree(resolved, link, symlinks=True, copy_function=copy)
                below.append(link)  # its links, judged at their place in the tree
            else:
                link.unlink()
                _copy_file(resolved, link, stop)


#: :func:`_partial_owner` by pid (a forked child is another owner).
_owners: dict[int, str] = {}


def _partial_owner() -> str:
    """This process as a temporary's name carries it: ``<host>-<pid>-<start in ms>``."""
    pid = os.getpid()
    if pid not in _owners:
        started = process_start_time(pid) or 0.0
        _owners[pid] = f"{socket.gethostname()}-{pid}-{int(started * 1000)}"
    return _owners[pid]


def _is_stale(name: str, prefix: str) -> bool:
    """Whether the temporary ``name`` (``<prefix><host>-<pid>-<ms>-<token>``) is a leftover: its
    process, of this host, no longer runs. A copy in progress (another thread of this agent, another
    agent of this host) is not touched; one of another host cannot be told from a leftover and is
    left (its own host's next copy removes it). A name without an owner (an earlier version's) is a
    leftover."""
    parts = name[len(prefix):].rsplit("-", 3)
    if len(parts) != 4 or not (parts[1].isdecimal() and parts[2].isdecimal()):
        return True
    host, pid, started_ms = parts[0], int(parts[1]), int(parts[2])
    if host != socket.gethostname():
        return False
    return not same_process(pid, started_ms / 1000)


def _replace_with_directory(target: Path) -> None:
    """Make ``target`` a real directory: a symlink (to a directory too) or a file there is removed
    first, as rsync does; a link is never followed, so nothing is written outside the destination."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        target.unlink()
    target.mkdir(exist_ok=True)


def _as_given(text: str, tmp: str, dest: str) -> str:
    """``text`` with the temporary ``tmp`` (or a path below it) named as ``dest`` (the path below it)."""
    if text == tmp or text.startswith(tmp + "/"):
        return dest + text[len(tmp):]
    return text.replace(tmp, dest)


def _named_as_given(exc: OSError, tmp: Path, dest: Path) -> Optional[OSError]:
    """``exc`` with the hidden temporary it names (``[Errno 13] Permission denied:
    '/d/.a.txt.balsam-partial-...'``, a name the job never gave) named as the destination it stands
    for; None when it names no temporary. A rename of the temporary onto the destination names the
    destination once. shutil.Error (copytree's list of per-file errors) keeps its type, which
    _run_task tells a cancelled copy by."""
    t, d = str(tmp), str(dest)
    if isinstance(exc, shutil.Error):
        if t not in str(exc):
            return None
        rows = exc.args[0] if exc.args and isinstance(exc.args[0], list) else None
        if rows is None:
            return shutil.Error(_as_given(str(exc), t, d))
        return shutil.Error([tuple(_as_given(str(v), t, d) for v in row) if isinstance(row, tuple) else row
                             for row in rows])
    names = (exc.filename, exc.filename2)
    if exc.errno is None or not any(isinstance(n, str) and t in n for n in names):
        return None
    first, second = (_as_given(n, t, d) if isinstance(n, str) else n for n in names)
    if second == first:
        second = None
    return OSError(exc.errno, exc.strerror, first, None, second)


def names_a_directory(dest: str) -> bool:
    """Whether a file item's destination is written as a directory's name: ending in ``/``, or in
    a ``.`` or ``..`` component. ``Path`` drops a trailing ``/`` (``local`` wrote a file ``out``
    for ``out/``), rsync writes ``out/<name>``: both refuse it instead."""
    return dest.endswith("/") or dest.rpartition("/")[2] in (".", "..")


def names_a_directory_error(dest: str) -> str:
    return f"destination {dest} names a directory (the transfer slot is not recursive)"


def copy_into_place(src: Path, dest: Path, recursive: bool, *, stop: Optional[threading.Event] = None) -> int:
    """Copy ``src`` to ``dest`` atomically; return the bytes copied. Raises OSError/ValueError, or
    :class:`CopyCancelled` when ``stop`` is set before the copy is renamed into place (it is looked
    at between chunks of each file; the partial copy is then removed)."""
    if not src.exists():
        raise FileNotFoundError(f"no such file or directory: {src}")
    if src.is_dir() and not recursive:
        raise IsADirectoryError(f"{src} is a directory (the transfer slot is not recursive)")
    if recursive and not src.is_dir():
        # A directory slot given a file: the file was written where the directory should be and
        # reported done (rsync fails it: "change_dir ... Not a directory").
        raise NotADirectoryError(f"{src} is not a directory (the transfer slot is recursive)")
    if dest.is_dir() and not src.is_dir():
        raise IsADirectoryError(f"destination {dest} is a directory")
    # Errors name ``given``, the path the job gave, never the temporary (see _named_as_given).
    given = dest
    if dest.is_symlink() and dest.is_dir():
        # A directory copied onto a link to a directory goes into the link's target, as rsync's does
        # (it changes into its destination directory); the link stays. The copy is made next to the
        # target, on its file system, to be renamed into it. The agent refuses a stage-in whose
        # destination a link in the workdir leads out of (item_transfer_paths).
        dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Named with this process, so that the clean-up below tells another copy in progress to the same
    # destination (its process runs) from the leftover of a killed agent.
    prefix = f".{dest.name}{PARTIAL_MARK}"
    tmp = dest.parent / f"{prefix}{_partial_owner()}-{uuid.uuid4().hex[:12]}"
    try:
        if src.is_dir():
            _copy_tree(src, tmp, stop)
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file() and not p.is_symlink())
        else:
            # A symlinked source is followed: its content arrives, never a link.
            _copy_file(src, tmp, stop)
            size = tmp.stat().st_size
        # Cancelled (its job was deleted, its deadline passed, the agent stops): the destination
        # must not appear.
        _check_stop(stop, dest)
        if dest.is_dir() and not dest.is_symlink():
            # Into an existing directory (a workdir holding other inputs, a results directory):
            # merge, each file renamed into place, as rsync and Globus do.
            for path in sorted(tmp.rglob("*")):
                target = dest / path.relative_to(tmp)
                if path.is_dir() and not path.is_symlink():
                    # mkdir(exist_ok) would take a symlink to a directory, and the files below
                    # would be renamed into the link's target, outside the destination.
                    _replace_with_directory(target)
                else:
                    os.replace(path, target)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        renamed = _named_as_given(exc, tmp, given) if isinstance(exc, OSError) else None
        if renamed is not None:
            raise renamed from exc
        raise
    # Leftovers of copies interrupted by a killed agent. Escaped: a name holding glob characters
    # ("run[1].h5") would otherwise match other names (another copy's partial in progress) and
    # miss its own.
    for stale in dest.parent.glob(glob.escape(prefix) + "*"):
        if not _is_stale(stale.name, prefix):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return size


def _run_task(files: Sequence[tuple[str, TransferFile]], stop: Optional[threading.Event] = None) -> TaskStatus:
    """Copy each ``(key, file)``; a failure is filed under ``key``, the ``dest`` the agent passed
    (not the prefixed path copied to: the agent matches errors to its items by that key). When
    ``stop`` is set (the task was cancelled), no further file is copied or renamed into place."""
    errors: dict[str, str] = {}
    copied = 0
    for key, f in files:
        if stop is not None and stop.is_set():
            return TaskStatus(TaskState.failed, "cancelled", retryable=True)
        if not f.recursive and names_a_directory(f.dest):
            errors[key] = names_a_directory_error(f.dest)
            continue
        try:
            copied += copy_into_place(Path(f.src), Path(f.dest), f.recursive, stop=stop)
        except CopyCancelled:
            return TaskStatus(TaskState.failed, "cancelled", retryable=True)
        except shutil.Error as exc:
            # copytree gathers its files' errors, a cancelled copy among them.
            if stop is not None and stop.is_set():
                return TaskStatus(TaskState.failed, "cancelled", retryable=True)
            errors[key] = one_line(exc)
        except Exception as exc:
            # Whatever goes wrong with one item (a RuntimeError from a link loop was one) fails that
            # item only: failing the task would charge a try to every file batched with it.
            if not isinstance(exc, (OSError, ValueError)):
                logger.warning("local copy of %s to %s: %s", f.src, f.dest, exc, exc_info=True)
                errors[key] = one_line(f"{type(exc).__name__}: {exc}")
            else:
                errors[key] = one_line(exc)
    info = {"files": len(files), "files_done": len(files) - len(errors), "bytes": copied}
    return TaskStatus(TaskState.done, info=info, file_errors=errors)


class ThreadedTasks:
    """Tasks run by worker threads of this process, for backends that do the copying themselves.

    At most ``threads`` tasks run at once; a task waiting for a free worker polls ``active`` with
    ``queued`` set (the agent's deadline starts when a worker takes it).

    A finished task's status is kept for ``keep_sec`` after it was first reported, so a poll
    repeated after a lost PATCH still answers (afterwards the id is unknown and the agent submits
    the items again).

    The workers are daemon threads (not a ThreadPoolExecutor, whose threads the interpreter joins at
    exit): a task stuck in a call that never returns must not keep the agent from exiting. A started
    task that is cancelled is replaced by a new worker, so a stuck one does not take a slot for ever.
    """

    def __init__(self, threads: int, name: str, keep_sec: float = 3600.0, close_wait_sec: Optional[float] = None) -> None:
        self._name = name
        self._queue: "queue.SimpleQueue[Optional[tuple[Future, Callable[..., TaskStatus], tuple, dict]]]" = queue.SimpleQueue()
        self._running: dict[str, Future] = {}
        #: Stop flags of the tasks started with ``stoppable=True``.
        self._stops: dict[str, StopFlag] = {}
        self._finished: dict[str, tuple[float, TaskStatus]] = {}
        self._lock = threading.Lock()
        self._keep_sec = keep_sec
        self._close_wait_sec = close_wait_sec
        self._closed = False
        #: Workers to retire when their task ends (one was started in place of each cancelled task).
        self._retire = 0
        self._workers: list[threading.Thread] = []
        for _ in range(threads):
            self._add_worker()

    def _add_worker(self) -> None:
        worker = threading.Thread(target=self._work, name=f"{self._name}-{len(self._workers)}", daemon=True)
        self._workers.append(worker)
        worker.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            with self._lock:
                if self._retire > 0:
                    self._retire -= 1
                    return

    def start(self, fn: Callable[..., TaskStatus], *args: object, stoppable: bool = False) -> str:
        """Run ``fn(*args)`` as a task; with ``stoppable``, ``fn`` also gets ``stop=`` (a
        :class:`StopFlag` that :meth:`cancel` and :meth:`close` set) and must return soon after it
        is set, having written nothing more."""
        task_id = uuid.uuid4().hex
        kwargs: dict[str, object] = {}
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise TransferError("the transfer backend is closed (the agent is stopping)", retryable=True)
            if stoppable:
                kwargs["stop"] = self._stops[task_id] = StopFlag()
            self._running[task_id] = future
        self._queue.put((future, fn, args, kwargs))
        return task_id

    def statuses(self, task_ids: Sequence[str]) -> dict[str, TaskStatus]:
        now = time.monotonic()
        found: dict[str, TaskStatus] = {}
        with self._lock:
            if self._closed:
                # Stopped by close(): unknown, so the items are copied again (no try used).
                return found
            for tid in [t for t, (at, _) in self._finished.items() if now - at > self._keep_sec]:
                del self._finished[tid]
            for tid in task_ids:
                if tid in self._finished:
                    found[tid] = self._finished[tid][1]
                    continue
                future = self._running.get(tid)
                if future is None:
                    continue
                if not future.done():
                    # Queued behind busy workers until one takes it (set_running_or_notify_cancel):
                    # the agent's deadline does not run meanwhile.
                    found[tid] = TaskStatus(TaskState.active, queued=not (future.running() or future.done()))
                    continue
                del self._running[tid]
                self._stops.pop(tid, None)
                if future.cancelled():  # cancelled before it started (exception() would raise)
                    status = TaskStatus(TaskState.failed, "cancelled", retryable=True)
                else:
                    exc = future.exception()
                    status = (TaskStatus(TaskState.failed, one_line(f"{type(exc).__name__}: {exc}"))
                              if exc is not None else future.result())
                self._finished[tid] = (now, status)
                found[tid] = status
        return found

    def cancel(self, task_id: str) -> None:
        """Cancel a task: one not started never runs; a started stoppable one is told to stop (and a
        new worker takes its slot, in case it is stuck). A task unknown or already finished has
        nothing left to cancel. Raises a non-retryable TransferError for a started task that cannot
        be stopped."""
        with self._lock:
            future = self._running.get(task_id)
            stop = self._stops.get(task_id)
        if future is None or future.cancel() or future.done():
            return
        if stop is None:
            raise TransferError(f"task {task_id} has started; it cannot be stopped", retryable=False)
        stop.set()
        with self._lock:
            if not future.done() and not self._closed:
                self._retire += 1
                self._add_worker()

    def close(self) -> None:
        """Stop every task: queued ones never run, running ones have their stop flag set (which
        kills their subprocesses); wait for them at most ``close_wait_sec``."""
        with self._lock:
            self._closed = True
            futures = list(self._running.values())
            stops = list(self._stops.values())
        for future in futures:
            future.cancel()
        for stop in stops:
            stop.set()
        for _ in self._workers:
            self._queue.put(None)
        wait = CLOSE_WAIT_SEC if self._close_wait_sec is None else self._close_wait_sec
        deadline = time.monotonic() + wait
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        stuck = [w.name for w in self._workers if w.is_alive()]
        if stuck:
            logger.warning("%d transfer task(s) did not stop within %.0f s (blocked in a system call?); "
                           "left behind, their items are copied again by the next agent", len(stuck), wait)


class LocalTransfer(TransferBackend):
    """Copy on a shared file system (``local://`` or ``file://``)."""

    options_schema = LocalTransferOptions
    description = "copies on a shared file system (local:// and file:// locations), atomically"
    #: Small copies end in about a second: polled soon after their submission (see TransferBackend).
    quick_poll = True

    def __init__(self, options: object = None, *, site_path: Optional[str] = None) -> None:
        super().__init__(options, site_path=site_path)
        self._tasks = ThreadedTasks(self.options.threads, "balsam-local-transfer")

    def submit_batch(self, location: TransferLocation, direction: TransferDirection, files: Sequence[TransferFile]) -> str:
        for f in files:
            for side in (f.src, f.dest):
                if not os.path.isabs(side):
                    raise TransferError(f"local transfer needs absolute paths, got {side!r}", retryable=False)
        # local:///scratch/inputs: remote paths are inside that directory.
        remote = "src" if direction == TransferDirection.stage_in else "dest"
        copies = [(f.dest, attrs.evolve(f, **{remote: location.remote_path(getattr(f, remote))})) for f in files]
        return self._tasks.start(_run_task, copies, stoppable=True)

    @classmethod
    def check_location(cls, location: TransferLocation) -> None:
        # local://scratch/inputs parses "scratch" as a host, which a copy on this file system would
        # silently drop; localhost is what file://localhost/path means.
        if location.netloc and location.netloc.lower() != "localhost":
            raise TransferError(
                f"local:// takes no host, got {location.netloc!r}: write local:///{location.netloc}{location.path} "
                f"for the directory /{location.netloc}{location.path}, or local:// for none",
                retryable=False,
            )

    def poll_tasks(self, task_ids: Sequence[str]) -> Mapping[str, TaskStatus]:
        return self._tasks.statuses(task_ids)

    def cancel_task(self, task_id: str) -> None:
        self._tasks.cancel(task_id)

    def close(self) -> None:
        self._tasks.close()

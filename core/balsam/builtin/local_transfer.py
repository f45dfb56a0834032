"""The ``local`` transfer backend (``local://`` and ``file://`` locations): copies on a file system
the site shares with the location, e.g. a project directory mounted on the login and compute nodes.
``local:///prefix`` puts the location's paths under ``/prefix``; errors are still filed under the
destinations the agent passed.

Each task runs in a worker thread. A file or directory is copied next to its destination under a
hidden temporary name and renamed into place, so a destination is either absent, the old version
or the complete new one, never half-written (a directory copied onto an existing one is merged
into it, each file renamed into place) (an agent killed mid-copy leaves only a
``.NAME.balsam-partial-*`` file, which the next copy of that destination removes). Task ids live
in this process: after an agent restart they are ``unknown`` and the agent copies those items
again, which is harmless because copies are atomic and idempotent.

Cancelling a task (the agent does when every job of the task was deleted) stops it between files
and before the rename of the file being copied: that file finishes into its temporary name, which
is then removed, so nothing more lands at a destination. Files already renamed into place stay.
"""

from __future__ import annotations

import glob
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import attrs

from ..options import option
from ..states import TransferDirection
from ..transfer import TaskState, TaskStatus, TransferBackend, TransferError, TransferFile, TransferLocation, one_line

__all__ = ["CopyCancelled", "LocalTransfer", "LocalTransferOptions", "ThreadedTasks", "copy_into_place"]

PARTIAL_MARK = ".balsam-partial-"


class CopyCancelled(Exception):
    """The task was cancelled before the copy was renamed into place (the copy was removed)."""


@attrs.frozen
class LocalTransferOptions:
    threads: int = option(4, "Tasks copying at the same time (one thread each).")


def copy_into_place(src: Path, dest: Path, recursive: bool, *, stop: Optional[threading.Event] = None) -> int:
    """Copy ``src`` to ``dest`` atomically; return the bytes copied. Raises OSError/ValueError, or
    :class:`CopyCancelled` when ``stop`` is set by the time the copy is ready to be renamed."""
    if not src.exists():
        raise FileNotFoundError(f"no such file or directory: {src}")
    if src.is_dir() and not recursive:
        raise IsADirectoryError(f"{src} is a directory (the transfer slot is not recursive)")
    if dest.is_dir() and not src.is_dir():
        raise IsADirectoryError(f"destination {dest} is a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = dest.parent / f".{dest.name}{PARTIAL_MARK}{token}"
    try:
        if src.is_dir():
            shutil.copytree(src, tmp, symlinks=True)
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file() and not p.is_symlink())
        else:
            shutil.copyfile(src, tmp)
            shutil.copymode(src, tmp)
            size = tmp.stat().st_size
        if stop is not None and stop.is_set():
            # Cancelled while copying (its job was deleted): the destination must not appear.
            raise CopyCancelled(f"cancelled before {dest} was written")
        if dest.is_dir() and not dest.is_symlink():
            # Into an existing directory (a workdir holding other inputs, a results directory):
            # merge, each file renamed into place, as rsync and Globus do.
            for path in sorted(tmp.rglob("*")):
                target = dest / path.relative_to(tmp)
                if path.is_dir() and not path.is_symlink():
                    target.mkdir(exist_ok=True)
                else:
                    os.replace(path, target)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    # Leftovers of copies interrupted by a killed agent. Escaped: a name holding glob characters
    # ("run[1].h5") would otherwise match other names (another copy's partial in progress) and
    # miss its own.
    for stale in dest.parent.glob(glob.escape(f".{dest.name}{PARTIAL_MARK}") + "*"):
        if stale.is_dir():
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
            return TaskStatus(TaskState.failed, "cancelled", retryable=False)
        try:
            copied += copy_into_place(Path(f.src), Path(f.dest), f.recursive, stop=stop)
        except CopyCancelled:
            return TaskStatus(TaskState.failed, "cancelled", retryable=False)
        except (OSError, ValueError, shutil.Error) as exc:
            errors[key] = one_line(exc)
    info = {"files": len(files), "files_done": len(files) - len(errors), "bytes": copied}
    return TaskStatus(TaskState.done, info=info, file_errors=errors)


class ThreadedTasks:
    """Tasks run by a thread pool of this process, for backends that do the copying themselves.

    A finished task's status is kept for ``keep_sec`` after it was first reported, so a poll
    repeated after a lost PATCH still answers (afterwards the id is unknown and the agent submits
    the items again).
    """

    def __init__(self, threads: int, name: str, keep_sec: float = 3600.0) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._running: dict[str, Future] = {}
        #: Stop flags of the tasks started with ``stoppable=True``.
        self._stops: dict[str, threading.Event] = {}
        self._finished: dict[str, tuple[float, TaskStatus]] = {}
        self._lock = threading.Lock()
        self._keep_sec = keep_sec

    def start(self, fn: Callable[..., TaskStatus], *args: object, stoppable: bool = False) -> str:
        """Run ``fn(*args)`` as a task; with ``stoppable``, ``fn`` also gets ``stop=`` (an Event that
        :meth:`cancel` sets) and must return soon after it is set, having written nothing more."""
        task_id = uuid.uuid4().hex
        kwargs: dict[str, object] = {}
        with self._lock:
            if stoppable:
                kwargs["stop"] = self._stops[task_id] = threading.Event()
            self._running[task_id] = self._pool.submit(fn, *args, **kwargs)
        return task_id

    def statuses(self, task_ids: Sequence[str]) -> dict[str, TaskStatus]:
        now = time.monotonic()
        found: dict[str, TaskStatus] = {}
        with self._lock:
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
                    found[tid] = TaskStatus(TaskState.active)
                    continue
                del self._running[tid]
                self._stops.pop(tid, None)
                if future.cancelled():  # cancelled before it started (exception() would raise)
                    status = TaskStatus(TaskState.failed, "cancelled", retryable=False)
                else:
                    exc = future.exception()
                    status = (TaskStatus(TaskState.failed, one_line(f"{type(exc).__name__}: {exc}"))
                              if exc is not None else future.result())
                self._finished[tid] = (now, status)
                found[tid] = status
        return found

    def cancel(self, task_id: str) -> None:
        """Cancel a task: one not started never runs; a started stoppable one is told to stop. A task
        unknown or already finished has nothing left to cancel. Raises a non-retryable TransferError
        for a started task that cannot be stopped."""
        with self._lock:
            future = self._running.get(task_id)
            stop = self._stops.get(task_id)
        if future is None or future.cancel() or future.done():
            return
        if stop is None:
            raise TransferError(f"task {task_id} has started; it cannot be stopped", retryable=False)
        stop.set()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class LocalTransfer(TransferBackend):
    """Copy on a shared file system (``local://`` or ``file://``)."""

    options_schema = LocalTransferOptions
    description = "copies on a shared file system (local:// and file:// locations), atomically"

    def __init__(self, options: object = None, *, site_path: Optional[str] = None) -> None:
        super().__init__(options, site_path=site_path)
        if self.options.threads < 1:
            raise TransferError("transfers.backend_options.local.threads: must be at least 1", retryable=False)
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

"""Pieces shared by the job modes: launch environment, status reports, a pool of local processes."""

from __future__ import annotations

import datetime as dt
import logging
import os
import select
import signal
import threading
import time
from collections import deque
from typing import Any, Optional, Sequence

from balsam.states import JobState

from .app_run import AppProcess, PreparedJob
from .node_manager import Placement

logger = logging.getLogger(__name__)


def _launch_hook() -> Any:
    from balsam.plugins.manager import get_plugin_manager

    return get_plugin_manager().hook.balsam_launch_environment


def launch_environment(prepared: PreparedJob, placement: Placement, platform: Any, hook: Any = None) -> dict[str, str]:
    """The job's environment with the platform's GPU visibility, then the plugins' adjustments."""
    env = dict(prepared.env)
    gpu_ids = placement.gpu_ids[0] if placement.gpu_ids else ()
    if gpu_ids:
        env.update({str(k): str(v) for k, v in platform.gpu_environment(list(gpu_ids)).items()})
    env.setdefault("OMP_NUM_THREADS", str(prepared.demand.threads_per_rank))
    (hook or _launch_hook())(job=prepared.job, env=env, node_hostnames=list(placement.hostnames))
    # Hooks may put in non-strings; the common case (none did) costs no second copy.
    if all(type(k) is str and type(v) is str for k, v in env.items()):
        return env
    return {str(k): str(v) for k, v in env.items()}


#: A file system with less than this left for users counts as full.
DISK_FULL_BYTES = 64 * 1024


def disk_full_note(path: Any) -> str:
    """"No space left on device: ..." when the file system holding ``path`` is full (blocks or
    inodes), else "". A job that dies on a full disk usually cannot write its own error anywhere."""
    try:
        st = os.statvfs(path)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    if free < DISK_FULL_BYTES:
        return f"No space left on device: the file system of {path} has {free} bytes free"
    if st.f_files and st.f_favail == 0:
        return f"No space left on device: the file system of {path} has no free inodes"
    return ""


def report_running(updater: Any, prepared: PreparedJob) -> None:
    updater.put(prepared.id, JobState.running, state_data={"num_nodes": prepared.footprint})


def send_first_running(updater: Any) -> None:
    """Have the updater send the launcher's first RUNNING updates now, not after its batching
    interval: how soon a new launcher shows running jobs is what users watch. (``flush`` with no
    time to wait only wakes the updater's thread: at most one interval instead of two.)"""
    updater.flush(timeout=0)


def report_exit(updater: Any, job_id: int, returncode: int, tail: str, when: Optional[float] = None) -> None:
    ts = dt.datetime.fromtimestamp(when, dt.timezone.utc) if when else None
    if returncode == 0:
        updater.put(job_id, JobState.run_done, state_timestamp=ts, return_code=0)
    else:
        updater.put(job_id, JobState.run_error, state_timestamp=ts, state_data={"returncode": returncode, "error": tail}, return_code=returncode)


def report_timeout(updater: Any, job_id: int, reason: str) -> None:
    updater.put(job_id, JobState.run_timeout, state_data={"reason": reason})


def report_failed(updater: Any, job_id: int, reason: str) -> None:
    updater.put(job_id, JobState.failed, state_data={"error": reason})


class ChildReaper:
    """Collects the exits of the processes it is given, and of no others, the moment they happen.

    Each watched child gets a pidfd (Linux >= 5.3): a descriptor that becomes readable when that
    process exits and stays readable until it is reaped, so an exit that happened before
    :meth:`watch` was even called is still seen (level-triggered: an exit cannot be missed). One
    thread sleeps in ``epoll_wait`` on the pidfds plus a wake-up descriptor, reaps exactly the pid
    that became readable (``waitpid(pid)``, never "any child", so another owner's children and
    zombies are left alone and cannot starve ours), records the status and sets ``wake`` so the job
    mode's loop reacts at once.

    Thread contract: :meth:`watch` and :meth:`stop` are called by the owner's thread; the reaper
    thread only appends to :attr:`exited` (a deque the owner pops from: both ends are atomic). The
    pid -> process map is shared under ``_lock``. Where pidfds are missing (not Linux), the thread
    polls ``waitpid(pid, WNOHANG)`` on each watched pid every :data:`FALLBACK_POLL_SEC`.
    """

    FALLBACK_POLL_SEC = 0.002

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake
        self.exited: deque[AppProcess] = deque()
        self._lock = threading.Lock()
        self._by_fd: dict[int, AppProcess] = {}  # pidfd -> process (pidfd mode)
        self._by_pid: dict[int, AppProcess] = {}  # pid -> process (fallback mode)
        self._stopped = False
        self._use_pidfd = hasattr(os, "pidfd_open") and hasattr(select, "epoll")
        if self._use_pidfd:
            self._epoll = select.epoll()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="child-reaper", daemon=True)
        self._thread.start()

    def _done(self, proc: AppProcess) -> None:
        self.exited.append(proc)
        self.wake.set()

    def watch(self, proc: AppProcess) -> None:
        proc.reaped_externally = True
        pid = proc.pid
        if pid is None or proc.returncode is not None:  # never started
            self._done(proc)
            return
        if not self._use_pidfd:
            with self._lock:
                self._by_pid[pid] = proc
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError as exc:  # ENOSYS (old kernel) or a pid already gone: reap it directly
            logger.debug("pidfd_open(%s): %s", pid, exc)
            self._reap(pid, proc)
            return
        with self._lock:
            self._by_fd[fd] = proc
            self._epoll.register(fd, select.EPOLLIN)

    def stop(self) -> None:
        self._stopped = True
        if self._use_pidfd:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def _reap(self, pid: int, proc: AppProcess) -> None:
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by someone else after all: the status is lost
            code = -1
        proc.mark_exited(code)
        self._done(proc)

    def _run(self) -> None:
        if not self._use_pidfd:
            return self._run_polling()
        try:
            while not self._stopped:
                try:
                    events = self._epoll.poll()
                except InterruptedError:
                    continue
                for fd, _mask in events:
                    if fd == self._wake_r:
                        continue
                    with self._lock:
                        proc = self._by_fd.pop(fd, None)
                        if proc is not None:
                            self._epoll.unregister(fd)
                    if proc is None:
                        continue
                    os.close(fd)
                    self._reap(proc.pid, proc)  # type: ignore[arg-type]
        finally:
            with self._lock:
                for fd in self._by_fd:
                    os.close(fd)
                self._by_fd.clear()
            self._epoll.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run_polling(self) -> None:
        while not self._stopped:
            with self._lock:
                watched = list(self._by_pid.items())
            for pid, proc in watched:
                try:
                    done_pid, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done_pid, status = pid, -1 << 8
                if done_pid:
                    with self._lock:
                        self._by_pid.pop(pid, None)
                    proc.mark_exited(os.waitstatus_to_exitcode(status) if status >= 0 else -1)
                    self._done(proc)
            time.sleep(self.FALLBACK_POLL_SEC)


#: The signals a batch system sends when it ends an allocation (scancel, qdel, the wall time).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP)
#: Exit statuses of a process ended by one of them: Popen's ``-N``, a shell's ``128+N``, and MPICH
#: hydra's mpiexec, which exits with its rank's signal number (15 for a SIGTERM'd rank).
STOP_SIGNAL_EXITS = frozenset(
    [-int(s) for s in _STOP_SIGNALS] + [128 + int(s) for s in _STOP_SIGNALS] + [int(signal.SIGTERM), int(signal.SIGKILL)]
)
#: How long such an exit is held back before it is reported as the job's own error (see ProcessPool).
STOP_SIGNAL_HOLD_SEC = 1.0


class ProcessPool:
    """The processes this launcher process started.

    With ``wake`` (an Event), a :class:`ChildReaper` collects exits the moment they happen and sets
    ``wake``; without it, :meth:`reap` polls every running process.

    When a batch system ends an allocation it signals every process in it at once: the launcher and
    the jobs it runs. A job can then die of the signal a moment before the launcher's own stop ends
    it, and reporting that exit as RUN_ERROR would fail a job the allocation merely cut short (it
    must be RUN_TIMEOUT and run again). So an exit by a termination signal (:data:`STOP_SIGNAL_EXITS`)
    is held back for :data:`STOP_SIGNAL_HOLD_SEC`: if :meth:`terminate_all` comes in that time, the
    job is one of its victims; otherwise it is reported as the job's exit. A held process stays in
    ``running`` (it still holds its resources until reported).
    """

    def __init__(self, error_tail_num_lines: int, wake: Optional[threading.Event] = None) -> None:
        self.error_tail_num_lines = error_tail_num_lines
        self.running: dict[int, AppProcess] = {}
        self.reaper = ChildReaper(wake) if wake is not None else None
        self.held: dict[int, float] = {}  # job id -> when its exit by a signal was noticed (monotonic)

    def __len__(self) -> int:
        return len(self.running)

    def start(self, job_id: int, shell_cmd: str, workdir: Any, env: dict[str, str], cpu_ids: Sequence[int] = ()) -> AppProcess:
        proc = AppProcess(job_id, shell_cmd, workdir, env, cpu_ids)
        self.running[job_id] = proc
        if self.reaper is not None:
            self.reaper.watch(proc)
        return proc

    def _finished(self, proc: AppProcess) -> tuple[int, int, str, float]:
        rc = proc.returncode if proc.returncode is not None else -1
        tail = ""
        if rc != 0:
            tail = proc.tail(self.error_tail_num_lines)
            full = disk_full_note(proc.workdir)
            if full:
                # The job could not even write its error to job.out: say why in the event and the log.
                logger.error("job %s exited %s: %s", proc.job_id, rc, full)
                tail = f"{tail}\n{full}" if tail.strip() else full
        return (proc.job_id, rc, tail, time.time())

    def reap(self) -> list[tuple[int, int, str, float]]:
        """Finished processes as ``(job_id, returncode, error_tail, end_time)`` (exits by a
        termination signal once they have been held :data:`STOP_SIGNAL_HOLD_SEC`)."""
        exited: list[AppProcess] = []
        if self.reaper is not None:
            queue = self.reaper.exited
            while queue:
                proc = queue.popleft()
                if proc.job_id in self.running:
                    exited.append(proc)
        else:
            exited = [proc for job_id, proc in self.running.items() if job_id not in self.held and proc.poll() is not None]
        now = time.monotonic()
        finished = []
        for proc in exited:
            if proc.returncode in STOP_SIGNAL_EXITS:
                self.held[proc.job_id] = now
            else:
                del self.running[proc.job_id]
                finished.append(self._finished(proc))
        for job_id, since in list(self.held.items()):
            if now - since >= STOP_SIGNAL_HOLD_SEC:
                del self.held[job_id]
                finished.append(self._finished(self.running.pop(job_id)))
        return finished

    def terminate_all(self, grace_sec: float) -> tuple[list[int], list[tuple[int, int, str, float]]]:
        """SIGTERM every process group, SIGKILL what is left after ``grace_sec``.

        Returns ``(ended_by_us, finished_on_their_own)``: a process that exits 0 before the signal
        lands still counts as done; one held after an exit by a termination signal is ended by us.
        """
        finished = self.reap()
        victims = list(self.running)
        for proc in self.running.values():
            proc.terminate()
        deadline = time.monotonic() + grace_sec
        while self.running and time.monotonic() < deadline:
            for job_id, proc in list(self.running.items()):
                if proc.poll() is not None:
                    del self.running[job_id]
            time.sleep(0.02)
        for proc in self.running.values():
            proc.kill()
        for proc in self.running.values():
            proc.wait(2.0)
        self.running.clear()
        self.held.clear()
        if self.reaper is not None:
            self.reaper.exited.clear()
            self.reaper.stop()
        return victims, finished

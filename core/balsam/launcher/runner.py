"""Pieces shared by the job modes: launch environment, status reports, a pool of local processes."""

from __future__ import annotations

import logging
import os
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


def report_exit(updater: Any, job_id: int, returncode: int, tail: str, when: Optional[float] = None) -> None:
    import datetime as dt

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
    """Reaps the pool's children the moment they exit, from a thread blocked in ``waitid()``.

    No polling: the thread sleeps in the kernel until a child exits, records its status and sets
    ``wake`` so the job mode's loop reacts at once. ``WNOWAIT`` first peeks at the exited child, so
    a child that is not ours (started by a plugin, say) is left for its owner to reap.
    """

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake
        self.ours: dict[int, AppProcess] = {}
        self.exited: deque[AppProcess] = deque()
        self._have_children = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="child-reaper", daemon=True)
        self._thread.start()

    def watch(self, proc: AppProcess) -> None:
        proc.reaped_externally = True
        if proc.pid is None or proc.returncode is not None:  # never started
            self.exited.append(proc)
            self.wake.set()
            return
        self.ours[proc.pid] = proc
        self._have_children.set()

    def stop(self) -> None:
        self._stopped = True
        self._have_children.set()

    def _run(self) -> None:
        while not self._stopped:
            if not self.ours:
                self._have_children.wait(0.2)
                self._have_children.clear()
                continue
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                time.sleep(0.005)
                continue
            except InterruptedError:
                continue
            if info is None:
                continue
            pid = info.si_pid
            proc = self.ours.pop(pid, None)
            if proc is None:
                time.sleep(0.0002)  # maybe ours, spawned an instant ago and not watched yet
                proc = self.ours.pop(pid, None)
                if proc is None:
                    time.sleep(0.005)  # someone else's child: its owner reaps it
                    continue
            try:
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            proc.mark_exited(code)
            self.exited.append(proc)
            self.wake.set()


class ProcessPool:
    """The processes this launcher process started.

    With ``wake`` (an Event), a :class:`ChildReaper` collects exits and sets ``wake``; without it,
    :meth:`reap` polls every running process (the mpi mode, whose platform may run subprocesses of
    its own, e.g. ``mpiexec --version``).
    """

    def __init__(self, error_tail_num_lines: int, wake: Optional[threading.Event] = None) -> None:
        self.error_tail_num_lines = error_tail_num_lines
        self.running: dict[int, AppProcess] = {}
        self.reaper = ChildReaper(wake) if wake is not None else None

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
        """Finished processes as ``(job_id, returncode, error_tail, end_time)``."""
        finished = []
        if self.reaper is not None:
            exited = self.reaper.exited
            while exited:
                proc = exited.popleft()
                if self.running.pop(proc.job_id, None) is not None:
                    finished.append(self._finished(proc))
            return finished
        for job_id, proc in list(self.running.items()):
            if proc.poll() is None:
                continue
            del self.running[job_id]
            finished.append(self._finished(proc))
        return finished

    def terminate_all(self, grace_sec: float) -> tuple[list[int], list[tuple[int, int, str, float]]]:
        """SIGTERM every process group, SIGKILL what is left after ``grace_sec``.

        Returns ``(ended_by_us, finished_on_their_own)``: a process that exits 0 before the signal
        lands still counts as done.
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
        if self.reaper is not None:
            self.reaper.exited.clear()
            self.reaper.stop()
        return victims, finished

"""Pieces shared by the job modes: launch environment, status reports, a pool of local processes."""

from __future__ import annotations

import logging
import time
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
    if prepared.demand.threads_per_rank > 1:
        env.setdefault("OMP_NUM_THREADS", str(prepared.demand.threads_per_rank))
    (hook or _launch_hook())(job=prepared.job, env=env, node_hostnames=list(placement.hostnames))
    return {str(k): str(v) for k, v in env.items()}


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


class ProcessPool:
    """The processes this launcher process started, reaped by polling."""

    def __init__(self, error_tail_num_lines: int) -> None:
        self.error_tail_num_lines = error_tail_num_lines
        self.running: dict[int, AppProcess] = {}

    def __len__(self) -> int:
        return len(self.running)

    def start(self, job_id: int, shell_cmd: str, workdir: Any, env: dict[str, str], cpu_ids: Sequence[int] = ()) -> AppProcess:
        proc = AppProcess(job_id, shell_cmd, workdir, env, cpu_ids)
        self.running[job_id] = proc
        return proc

    def reap(self) -> list[tuple[int, int, str, float]]:
        """Finished processes as ``(job_id, returncode, error_tail, end_time)``."""
        finished = []
        for job_id, proc in list(self.running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del self.running[job_id]
            tail = proc.tail(self.error_tail_num_lines) if rc != 0 else ""
            finished.append((job_id, rc, tail, time.time()))
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
        return victims, finished

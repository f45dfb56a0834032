"""Helpers shared by the launcher tests (imported by name: pytest's conftest modules are not)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional

#: Sessions of the launcher tests' server expire after this many seconds without a heartbeat.
SESSION_EXPIRE_SEC = 4


def make_runnable(jobs: Iterable[Any]) -> list[int]:
    """Create jobs and move them to PREPROCESSED, as the processing module's default preprocess does."""
    from balsam.api import Job

    created = Job.objects.bulk_create(list(jobs))
    ids = [j.id for j in created]
    Job.objects.filter(id=ids).update(state="PREPROCESSED")
    return ids


def wait_for_states(ids: list[int], states: set[str], timeout: float = 60.0) -> dict[int, Any]:
    """Poll until every job is in one of ``states``; return {id: Job}."""
    from balsam.api import Job

    deadline = time.monotonic() + timeout
    while True:
        jobs = {j.id: j for j in Job.objects.filter(id=ids)}
        if all(str(j.state) in states for j in jobs.values()) and len(jobs) == len(ids):
            return jobs
        if time.monotonic() > deadline:
            summary = {i: str(j.state) for i, j in jobs.items()}
            raise AssertionError(f"jobs not in {sorted(states)} after {timeout} s: {summary}")
        time.sleep(0.2)


def events_of(ids: list[int]) -> dict[int, list[Any]]:
    """Each job's EventLog rows, oldest first."""
    from balsam.api import EventLog

    by_job: dict[int, list[Any]] = {i: [] for i in ids}
    for event in EventLog.objects.filter(job_id=ids):
        by_job[event.job_id].append(event)
    for rows in by_job.values():
        rows.sort(key=lambda e: (e.timestamp, e.id))
    return by_job


def mpi_mode(tmp_path: Any, cpus: int = 2, **settings: Any) -> Any:
    """An MPIMode on one node of ``cpus`` CPUs (default platform), with ``settings`` over the launcher defaults."""
    import types

    from balsam.builtin.default_platform import DefaultPlatform
    from balsam.config.schema import LauncherSettings
    from balsam.launcher.job_mode import LauncherContext
    from balsam.launcher.modes.mpi import MPIMode
    from balsam.platform import NodeInfo

    launcher = LauncherSettings(**settings) if settings else LauncherSettings()
    context = LauncherContext(site_config=None, settings=types.SimpleNamespace(launcher=launcher), site_id=1,
                              data_path=tmp_path, log_path=tmp_path, platform=DefaultPlatform(),
                              nodes=[NodeInfo("0", "h0", list(range(cpus)))], wall_time_min=10)
    return MPIMode(context)


def worker_rank_pid(path: Path) -> Optional[int]:
    """The serial worker of rank 1: the serial_worker process that has the rank's log open."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"balsam.launcher.modes.serial_worker" not in (entry / "cmdline").read_bytes():
                continue
            targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(t.startswith(str(path / "log")) and t.endswith(".1.log") for t in targets):
            return int(entry.name)
    return None


def rerun_timeouts_until_done(ids: list[int], timeout: float) -> set[int]:
    """Act as the processing module's default handle_timeout until every job is RUN_DONE: re-queue
    what comes back RUN_TIMEOUT. Returns the ids re-queued."""
    from balsam.api import Job

    requeued: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j.id: j for j in Job.objects.filter(id=ids)}
        timed_out = [j for j in jobs.values() if str(j.state) == "RUN_TIMEOUT"]
        for job in timed_out:
            job.state = "RESTART_READY"
        if timed_out:
            Job.objects.bulk_update(timed_out)
            requeued.update(j.id for j in timed_out)
        if all(str(j.state) == "RUN_DONE" for j in jobs.values()):
            return requeued
        assert time.monotonic() < deadline, {i: str(j.state) for i, j in jobs.items()}
        time.sleep(0.2)

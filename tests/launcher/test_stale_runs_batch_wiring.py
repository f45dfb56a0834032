"""The stale runs of an acquired batch are ended together before its jobs are prepared (one grace
for all, not one per job that traps SIGTERM): serial mode's prefetcher calls the preparer's
``end_stale_runs`` with each batch it acquires, and build_master wires it to the master's
JobPreparer (mpi mode's acquire: tests/launcher/test_launcher_units.py)."""

from __future__ import annotations

import threading
import time
import types
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from balsam.launcher.app_run import JobPreparer, PreparedJob
from balsam.launcher.job_mode import StopConditions
from balsam.launcher.modes import serial_worker
from balsam.launcher.prefetch import Prefetcher


class Job:
    def __init__(self, job_id: int) -> None:
        self.id, self.wall_time_min = job_id, 0


class Lease:
    def __init__(self, count: int) -> None:
        self.jobs = deque(Job(i) for i in range(1, count + 1))

    def acquire(self, count: int, **kwargs: Any) -> list[Job]:
        return [self.jobs.popleft() for _ in range(min(count, len(self.jobs)))]

    def close(self, **kwargs: Any) -> None:
        pass


def test_the_prefetcher_hands_each_acquired_batch_over_before_preparing_its_jobs() -> None:
    seen: list[tuple[str, Any]] = []
    lease = Lease(5)

    def prepare(job: Job) -> PreparedJob:
        seen.append(("prepare", job.id))
        if job.id == 3:
            fetcher.stop()  # the end of the first batch
        return PreparedJob(job=job, id=job.id, workdir=Path("."), cmdline="true", env={})

    fetcher = Prefetcher(lambda: lease, prepare, lambda demand: None, None, depth=3, remaining_min=lambda: 60,
                         retry_sec=0.0, before_prepare=lambda jobs: seen.append(("batch", [j.id for j in jobs])))
    fetcher._run()
    assert seen == [("batch", [1, 2, 3]), ("prepare", 1), ("prepare", 2), ("prepare", 3)]


def test_build_master_gives_the_prefetcher_the_preparers_end_stale_runs(monkeypatch: Any) -> None:
    captured: dict[str, Any] = {}

    class Captured(Exception):
        pass

    def capture(*args: Any, **kwargs: Any) -> Any:
        captured.update(kwargs, prepare=args[1])
        raise Captured()

    monkeypatch.setattr(serial_worker, "Prefetcher", capture)
    monkeypatch.setattr(serial_worker, "open_updater", lambda *args, **kwargs: types.SimpleNamespace())  # the master sets its on_gone
    config = {"launcher": {"serial_mode_prefetch_per_rank": 64, "delay_sec": 1, "default_postprocess_in_launcher": True},
              "nodes": [{"node_id": "0", "hostname": "h0", "cpu_ids": [0, 1]}], "data_path": "."}
    wake = threading.Event()
    stop = StopConditions.for_launcher(60, time.time(), 60, wake)
    with pytest.raises(Captured):
        serial_worker.build_master(config, None, [0], stop, wake, lambda: None, lease=lambda: None)
    hook = captured["before_prepare"]
    assert isinstance(hook.__self__, JobPreparer) and hook.__func__ is JobPreparer.end_stale_runs
    assert captured["prepare"].__self__ is hook.__self__  # the same preparer skips what the batch checked

"""The serial master's lookahead: how much work each of its acquires carries for short tasks.

Every acquire costs the server a fixed ~3.5-4 ms of CPU besides its jobs (a request, a write
transaction, a heartbeat, an idempotency record); at 1,000 no-op jobs a second, acquires of a
hundred jobs spent ~0.07 ms of server CPU per job on that alone. The clock is the test's: no timing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from balsam.launcher import prefetch
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.modes import serial_worker
from balsam.launcher.prefetch import Prefetcher


class _Lease:
    def acquire(self, count: int, **kwargs: Any) -> list:
        return []


class _Updater:
    def put(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_the_serial_master_tops_up_a_quarter_second_of_short_jobs_at_a_time(monkeypatch: Any) -> None:
    clock = [100.0]
    monkeypatch.setattr(prefetch.time, "monotonic", lambda: clock[0])
    prepared = lambda job: PreparedJob(job=job, id=job.id, workdir=Path("."), cmdline="true", env={})  # noqa: E731
    # As build_master makes it, for a one-node partition of 2 CPUs (depth 128).
    fetcher = Prefetcher(lambda: _Lease(), prepared, lambda demand: None, _Updater(), depth=128,
                         remaining_min=lambda: 7, lookahead_sec=serial_worker.PREFETCH_LOOKAHEAD_SEC,
                         max_depth=serial_worker.MAX_PREFETCH, floor=serial_worker.PREFETCH_FLOOR, room=1)
    # A full partition (2 running, 2 held unstarted) whose jobs end 1,000 a second, window after window.
    fetcher._running = 2
    for _ in range(12):
        fetcher._taken += 200
        fetcher._held = 2
        clock[0] += 0.2
        fetcher._measure_rate()
    assert 990 <= fetcher.rate <= 1000
    target = fetcher._target()
    # The prefetch thread tops up once half of the target is used, to the target: at least a
    # quarter second of these jobs per acquire (250), where a quarter-second lookahead leased 125.
    assert target - target // 2 >= 250
    assert target <= serial_worker.MAX_PREFETCH

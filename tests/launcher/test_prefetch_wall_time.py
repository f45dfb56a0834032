"""The serial mode's prefetcher does not hand the loop jobs that can no longer finish before the wall time."""

from __future__ import annotations

import types
from pathlib import Path

from balsam.launcher.app_run import PreparedJob
from balsam.launcher.prefetch import Prefetcher


def _prepared(job_id: int, wall_time_min: int) -> PreparedJob:
    return PreparedJob(job=types.SimpleNamespace(id=job_id, wall_time_min=wall_time_min), id=job_id,
                       workdir=Path("."), cmdline="true", env={})


def test_jobs_leased_ahead_that_ask_for_more_than_the_minutes_left_are_held_back() -> None:
    left = [3]
    prefetcher = Prefetcher(lambda: None, lambda job: job, lambda demand: None, updater=None, depth=8,
                            remaining_min=lambda: left[0])
    # Leased with 3 minutes left: all fitted then.
    prefetcher._ready.extend([_prepared(1, 0), _prepared(2, 1), _prepared(3, 3), _prepared(4, 2), _prepared(5, 0)])
    left[0] = 2  # taken a minute later
    assert [p.id for p in prefetcher.take()] == [1, 2, 4, 5]
    assert [p.id for p in prefetcher.too_late] == [3]
    # Without wall times nothing is held back, and the time left is not even asked.
    prefetcher._remaining_min = lambda: 1 / 0
    prefetcher._ready.extend([_prepared(6, 0), _prepared(7, 0)])
    assert [p.id for p in prefetcher.take()] == [6, 7]

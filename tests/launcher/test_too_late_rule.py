"""The one rule by which every job mode holds back jobs leased ahead that can no longer finish
before the wall time (``balsam.launcher.placement.split_too_late``); serial mode's loop applying it
is tested in ``test_serial_too_late.py``, mpi mode's in ``test_mpi_held_and_late_starts.py``, the
prefetcher's in ``test_prefetch_wall_time.py``."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

from balsam.launcher.app_run import PreparedJob
from balsam.launcher.job_mode import Countdown
from balsam.launcher.node_manager import Demand
from balsam.launcher.placement import max_wall_time_min, split_too_late


def _prepared(job_id: int, wall_time_min: int = 0) -> PreparedJob:
    return PreparedJob(job=types.SimpleNamespace(id=job_id, wall_time_min=wall_time_min), id=job_id, workdir=Path("."),
                       cmdline="true", env={"PATH": os.environ["PATH"]}, demand=Demand(node_packing_count=2))


# -- the rule --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seconds_left", [0.0, 59.9, 60.0, 119.9, 120.0, 180.5])
def test_a_job_is_held_back_exactly_when_an_acquire_now_would_refuse_it(seconds_left: float) -> None:
    """The minutes left are the acquire's ``max_wall_time_min`` (Countdown.remaining_min) and the
    server leases ``wall_time_min <= max_wall_time_min``: held back is what it would refuse."""
    countdown = Countdown(10)
    countdown.remaining_sec = lambda: seconds_left  # type: ignore[method-assign]
    max_wall_time_min_of_acquire = countdown.remaining_min()
    jobs = [_prepared(i, wall) for i, wall in enumerate([0, 1, 2, 3, 0, 2])]
    split = split_too_late(jobs, countdown.remaining_min)
    assert [p.id for p in split.too_late] == [p.id for p in jobs if p.job.wall_time_min > max_wall_time_min_of_acquire]
    assert [p.id for p in split.may_start] == [p.id for p in jobs if p.job.wall_time_min <= max_wall_time_min_of_acquire]
    # Whole minutes of wall time: the same as comparing seconds.
    assert [p.id for p in split.may_start] == [p.id for p in jobs if p.job.wall_time_min * 60 <= seconds_left]
    assert split.minutes_left == max_wall_time_min_of_acquire


def test_without_a_wall_time_nothing_is_held_back_and_the_time_left_is_not_read() -> None:
    jobs = [_prepared(1), _prepared(2), types.SimpleNamespace(id=3, job=object())]  # a job without the field
    split = split_too_late(jobs, lambda: 1 / 0)  # type: ignore[arg-type]
    assert split.may_start == jobs and split.may_start is not jobs and split.too_late == [] and split.minutes_left is None
    assert max_wall_time_min(jobs) == 0 and max_wall_time_min([_prepared(4, 7)], [], jobs) == 7

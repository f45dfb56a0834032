"""Slurm's sinfo readers keep what they can read: an unreadable column of a partition's line is
skipped (logged) and the partition keeps its other limits; an unreadable line is skipped (logged);
output of which nothing is readable is an error, not an empty answer.

``SINFO_CONVERTED`` was recorded from the real Slurm 22.05 of the CI host (shared/ci/start-slurm.sh)
after ``scontrol create PartitionName=... Nodes=ALL State=DOWN`` with ``MaxTime=UNLIMITED
MaxNodes=5000 MinNodes=0``, ``MaxTime=1-00:00:00 MaxNodes=2048 MinNodes=3`` and ``MaxTime=90
MaxNodes=UNLIMITED MinNodes=1024``, with ``TZ=UTC SLURM_TIME_FORMAT=standard sinfo --noheader
--format '%R|%D|%l|%s'``: without ``--noconvert`` (which the driver asks for, and a wrapper or an
older sinfo may drop), sizes divisible by 1024 print as ``2K``. ``SINFO_NOCONVERT`` is the same with
``--noconvert``.
"""

from __future__ import annotations

import logging

import pytest

from balsam.models import AllowedQueue
from balsam.scheduler import SchedulerError
from balsam_scheduler_slurm import SlurmScheduler

from sched_helpers import result

SINFO_CONVERTED = ("debug|4|infinite|1-infinite\nh18230A|4|infinite|1-5000\nh18230B|4|1-00:00:00|3-2K\n"
                   "h18230C|4|1:30:00|1K-infinite\n")
SINFO_NOCONVERT = ("debug|4|infinite|1-infinite\nh18230A|4|infinite|1-5000\nh18230B|4|1-00:00:00|3-2048\n"
                   "h18230C|4|1:30:00|1024-infinite\n")
WEEK = 7 * 1440


def _discover(stdout: str):
    return SlurmScheduler(user="me").parse_discover_queues(result(stdout=stdout))


def test_real_sinfo_outputs_are_read_with_their_units():
    queues = _discover(SINFO_NOCONVERT)
    assert queues["h18230A"] == AllowedQueue(max_nodes=4, max_walltime=WEEK, max_queued_jobs=None)
    assert queues["h18230B"] == AllowedQueue(max_nodes=4, max_walltime=1440, max_queued_jobs=None, min_nodes=3)
    assert "h18230C" not in queues  # MinNodes 1024 on 4 nodes: no job fits


def test_an_unreadable_job_size_skips_that_column_not_the_partition(caplog):
    with caplog.at_level(logging.WARNING):
        queues = _discover(SINFO_CONVERTED)
    # "3-2K": the size is unreadable; the node count and the day-long time limit still are.
    assert queues["h18230B"] == AllowedQueue(max_nodes=4, max_walltime=1440, max_queued_jobs=None)
    assert queues["h18230C"] == AllowedQueue(max_nodes=4, max_walltime=90, max_queued_jobs=None)
    assert queues["debug"] == AllowedQueue(max_nodes=4, max_walltime=WEEK, max_queued_jobs=None)
    messages = [r.getMessage() for r in caplog.records]
    assert any("h18230B" in m and "3-2K" in m for m in messages)
    assert any("h18230C" in m and "1K-infinite" in m for m in messages)


def test_another_line_of_the_partition_still_gives_its_size():
    queues = _discover("big|10|2-00:00:00|garbage\nbig|6|2-00:00:00|2-12\n")
    assert queues["big"] == AllowedQueue(max_nodes=12, max_walltime=2880, max_queued_jobs=None, min_nodes=2)


@pytest.mark.parametrize("limit", ["n/a", "soon", "5000M", "1-xx:00"])
def test_an_unreadable_time_limit_skips_that_column_not_the_partition(caplog, limit):
    with caplog.at_level(logging.WARNING):
        queues = _discover(f"odd|8|{limit}|2-6\n")
    assert queues["odd"] == AllowedQueue(max_nodes=6, max_walltime=WEEK, max_queued_jobs=None, min_nodes=2)
    assert any("odd" in r.getMessage() and limit in r.getMessage() for r in caplog.records)


def test_a_time_limit_of_zero_leaves_the_partition_out_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        assert _discover("debug|4|30:00|1-infinite\nzero|4|0:00|1-infinite\n").keys() == {"debug"}
    assert any("zero" in r.getMessage() for r in caplog.records)


def test_a_node_count_that_is_no_number_skips_its_line_not_the_discovery():
    # "²" is a digit to str.isdigit() but not to int(): the whole discovery used to fail.
    queues = _discover("debug|4|30:00|1-infinite\nodd|²|30:00|1-2\n")
    assert set(queues) == {"debug"}


@pytest.mark.parametrize("stdout", ["garbage\n", "\ufffd\ufffd|x|y\n", "debug|4|30:00|1-2|extra\n"])
def test_nothing_readable_is_an_error_not_no_queues(stdout):
    with pytest.raises(SchedulerError, match="nothing readable"):
        _discover(stdout)


def test_empty_output_is_no_queues():
    assert _discover("") == {}


def test_site_defaults_survive_a_garbled_sinfo():
    from sched_helpers import ReplayRunner

    runner = ReplayRunner({"sinfo": result(stdout="\ufffd\n"), "sacctmgr": result(stdout="root\n")})
    section = SlurmScheduler(runner, user="me").site_defaults()["scheduler"]
    assert "allowed_queues" not in section and section["allowed_projects"] == ["root"]


# -- backfill (sinfo %R|%a|%T|%D|%l) ------------------------------------------------------------

def _windows(stdout: str):
    windows = SlurmScheduler(user="me").parse_backfill(result(stdout=stdout))
    return {q: [(w.num_nodes, w.wall_time_min) for w in ws] for q, ws in windows.items()}


def test_backfill_reads_day_long_limits_and_skips_a_bad_count():
    # recorded: "h18230B|down|idle|4|1-00:00:00" (down: no window); an up copy of it gives one.
    assert _windows("debug|up|idle|4|infinite\nh18230B|down|idle|4|1-00:00:00\nday|up|idle|3|1-00:00:00\n"
                    "odd|up|idle|²|30:00\n") == {"debug": [(4, 1440)], "day": [(3, 1440)]}


def test_backfill_with_an_unreadable_time_limit_gives_no_window_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        assert _windows("odd|up|idle|4|n/a\n") == {}
    assert any("odd" in r.getMessage() and "n/a" in r.getMessage() for r in caplog.records)


def test_backfill_of_which_nothing_is_readable_is_an_error():
    with pytest.raises(SchedulerError, match="nothing readable"):
        _windows("\ufffd\ufffd\n")
    assert _windows("") == {}

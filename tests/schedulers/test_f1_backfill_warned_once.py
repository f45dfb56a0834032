"""Bad backfill output is warned about once per distinct line (audit f1): the elastic module and the
scheduler module each read sinfo / pbsnodes every cycle, and each call warned again about the same
unreadable line (about 2 warnings a minute per bad line, for hours). Later calls log it at DEBUG;
a new bad line is warned about; output with nothing readable still fails every call."""

from __future__ import annotations

import logging
import uuid

import pytest

from balsam.scheduler import SchedulerError
from balsam.testing import ReplayRunner, result
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler


def _levels(caplog, logger: str, text: str) -> list[int]:
    return [r.levelno for r in caplog.records if r.name == logger and text in r.getMessage()]


def test_sinfo_bad_line_is_warned_once_per_process(caplog) -> None:
    # Lines of their own (the memory is the process's): other tests cannot have met them.
    bad = f"garbled {uuid.uuid4().hex}"
    bad_limit = f"p{uuid.uuid4().hex[:8]}"
    sinfo = {"out": f"debug|up|idle|4|2:00:00\n{bad}\n{bad_limit}|up|idle|2|soon\n"}
    runner = ReplayRunner({"sinfo": lambda command: result(stdout=sinfo["out"])})
    # One driver each, as the elastic module and the scheduler module have.
    drivers = [SlurmScheduler(runner, user="u"), SlurmScheduler(runner, user="u")]
    caplog.set_level(logging.DEBUG, logger="balsam.scheduler.slurm")
    for _ in range(3):
        for driver in drivers:
            windows = driver.get_backfill_windows()
            assert [(w.num_nodes, w.wall_time_min) for w in windows["debug"]] == [(4, 120)]
    logger = "balsam.scheduler.slurm"
    assert _levels(caplog, logger, bad) == [logging.WARNING] + [logging.DEBUG] * 5
    assert _levels(caplog, logger, f"partition {bad_limit}: unreadable time limit") == [logging.WARNING] + [logging.DEBUG] * 5

    other = f"garbled {uuid.uuid4().hex}"  # a new bad line is news
    sinfo["out"] = f"debug|up|idle|4|2:00:00\n{other}\n"
    drivers[0].get_backfill_windows()
    assert _levels(caplog, logger, other) == [logging.WARNING]

    sinfo["out"] = f"{bad}\n"  # nothing readable: a failure each time, not a quiet empty answer
    for driver in drivers:
        with pytest.raises(SchedulerError, match="sinfo printed nothing readable"):
            driver.get_backfill_windows()


def test_pbsnodes_bad_record_is_warned_once_per_process(caplog) -> None:
    name = f"x{uuid.uuid4().hex[:10]}"
    # A bare number where a node record belongs, and a slip repair_pbs_json knows (a bad escape).
    out = ('{"timestamp":%d, "nodes":{"%s": 7, "n1":{"state":"free", "queue":"debug", "comment":"C:\\q"}}}')
    runner_calls = {"n": 0}

    def pbsnodes(command):
        runner_calls["n"] += 1
        return result(stdout=out % (1700589700 + runner_calls["n"], name))

    runner = ReplayRunner({"pbsnodes": pbsnodes})
    drivers = [PBSScheduler(runner, user="alice"), PBSScheduler(runner, user="alice")]
    caplog.set_level(logging.DEBUG, logger="balsam.scheduler.pbs")
    for _ in range(3):
        for driver in drivers:
            windows = driver.get_backfill_windows()
            assert [(w.num_nodes, w.wall_time_min) for w in windows["debug"]] == [(1, 60)]
    logger = "balsam.scheduler.pbs"
    assert _levels(caplog, logger, f"unreadable node record '{name}'") == [logging.WARNING] + [logging.DEBUG] * 5
    repaired = _levels(caplog, logger, "pbsnodes -a -F json printed slightly malformed JSON")
    assert len(repaired) == 6 and repaired.count(logging.WARNING) <= 1, repaired

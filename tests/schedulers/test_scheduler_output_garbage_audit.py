"""PBS, Slurm and Cobalt readers fed garbled output and units they did not expect: a garbled field or
line is skipped (logged), never a crash of the whole poll or discovery, never a silently wrong
limit; output of which nothing is readable is an error, not an empty answer.

- Digits that ``str.isdigit()`` accepts but ``int()`` does not (``²``, ``①``: what a garbled byte
  can decode to) crashed qstat/sacct/squeue readers with ValueError: every driver now checks with
  ``isdecimal()``.
- PBS durations are ``[[HH:]MM:]SS[.fff]`` (``3600`` is an hour; PBS's own syntax): ``3600`` read as
  1 minute and ``01:00:00.5`` as 0.
- A PBS queue whose ``resources_max.walltime`` is unreadable silently became a week; one of a few
  seconds became a week too (0 minutes read as "no limit").
- One PBS queue whose ``resources_max`` is not an object failed the discovery of every queue.
- Cobalt's ``nodelist`` of which no line was readable read as "no idle node".
"""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest

from balsam.models import AllowedQueue
from balsam.scheduler import SchedulerError
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_pbs.scheduler import job_number, pbs_duration_min
from balsam_scheduler_slurm import SlurmScheduler

from sched_helpers import recorded, result

NOW = dt.datetime(2026, 11, 22, 6, 0, tzinfo=dt.timezone.utc)


def _qstat_q(**queues: dict) -> str:
    doc = {"timestamp": 1700000000, "pbs_version": "2022.1.3", "pbs_server": "polaris-pbs-01", "Queue": {}}
    for name, extra in queues.items():
        doc["Queue"][name] = {"queue_type": "Execution", "enabled": "True", "started": "True",
                              "resources_max": {"nodect": 4, "walltime": "01:00:00"}, **extra}
    return json.dumps(doc, indent=4)


# -- PBS ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, minutes", [("3600", 60), ("01:00:00.5", 60), ("90:00", 90), ("72:00:00", 4320),
                                           ("00:00:30", 1), ("00:00:29", 0), (5400, 90), ("1-00:00:00", 0),
                                           ("5000M", 0), ("", 0), ("²:00", 0), (float("inf"), 0),
                                           ("9" * 400, 0), (True, 0)])
def test_pbs_durations_follow_pbs_syntax(text, minutes):
    assert pbs_duration_min(text) == minutes


def test_an_unreadable_pbs_walltime_limit_is_said_not_silently_a_week(caplog):
    with caplog.at_level(logging.WARNING):
        queues = PBSScheduler(user="alice").parse_discover_queues(result(stdout=_qstat_q(
            odd={"resources_max": {"nodect": 4, "walltime": "1-00:00:00"}},
            hourly={"resources_max": {"nodect": 4, "walltime": "3600"}})))
    assert queues["hourly"].max_walltime == 60  # was 1 minute
    assert queues["odd"].max_walltime == 7 * 1440
    assert any("odd" in r.getMessage() and "1-00:00:00" in r.getMessage() for r in caplog.records)


def test_a_pbs_walltime_limit_of_seconds_is_not_a_week(caplog):
    with caplog.at_level(logging.WARNING):
        queues = PBSScheduler(user="alice").parse_discover_queues(result(stdout=_qstat_q(
            tiny={"resources_max": {"nodect": 4, "walltime": "00:00:20"}}, debug={})))
    assert set(queues) == {"debug"}
    assert any("tiny" in r.getMessage() for r in caplog.records)


def test_one_garbled_pbs_queue_does_not_lose_the_others():
    queues = PBSScheduler(user="alice").parse_discover_queues(result(stdout=_qstat_q(
        debug={}, garbled={"resources_max": "\ufffd\ufffd"}, odd={"resources_max": {"nodect": "²"}},
        weird_min={"resources_min": ["x"]})))
    assert set(queues) == {"debug", "weird_min"}
    assert queues["weird_min"] == AllowedQueue(max_nodes=4, max_walltime=60, max_queued_jobs=None)


def test_pbs_job_ids_with_odd_digits_are_no_job_number():
    assert job_number("²³.polaris-pbs-01") is None
    assert job_number("123.polaris-pbs-01") == 123


# -- Slurm ----------------------------------------------------------------------------------------

def test_a_garbled_sacct_line_is_skipped_not_the_lookup():
    stdout = recorded("slurm", "sacct_history.txt").splitlines()[0] + "\n²|COMPLETED|x|x|x|0:0|None\n"
    histories = SlurmScheduler(user="root").parse_histories(result(stdout=stdout), {1: None, 2: None}, None)
    assert histories[1] is not None and histories[1].native_state == "COMPLETED" and histories[2] is None


def test_a_garbled_squeue_find_line_is_skipped():
    from balsam.scheduler import SubmitRequest

    request = SubmitRequest(job_name="qlaunch1", script_path="/s/qlaunch1.sh", project="p", queue="q",
                            num_nodes=1, wall_time_min=5)
    found = SlurmScheduler(user="root").parse_find(result(stdout="²|/s/qlaunch1.sh\n7|/s/qlaunch1.sh\n"), request)
    assert found == [7]


# -- Cobalt ---------------------------------------------------------------------------------------

def test_a_garbled_cobalt_qstat_line_is_skipped_not_the_poll():
    header = recorded("cobalt", "qstat_header.txt").splitlines()
    stdout = "\n".join(header[:3] + ["①  queued  00:30:00  debug  ²  datascience  N/A  00:02:10"]) + "\n"
    statuses = CobaltScheduler(user="alice").parse_status(result(stdout=stdout), NOW)
    assert set(statuses) == {int(header[2].split()[0])}


def test_cobalt_qsub_printing_an_odd_digit_is_no_job_id():
    with pytest.raises(SchedulerError, match="no job id"):
        CobaltScheduler(user="alice").parse_submit(result(stdout="²\n"))


def test_cobalt_nodelist_of_which_nothing_is_readable_is_an_error():
    header = recorded("cobalt", "nodelist.txt").splitlines()[0]
    with pytest.raises(SchedulerError, match="nothing readable"):
        CobaltScheduler(user="alice").parse_backfill(result(stdout=f"{header}\n\ufffd\ufffd cut\n"))
    assert CobaltScheduler(user="alice").parse_backfill(result(stdout=f"{header}\n")) == {}

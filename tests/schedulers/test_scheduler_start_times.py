"""The scheduler's own start time of a running job (``StatusPoll.start_times``).

Every scheduler but Cobalt says in its status output when a running job started (squeue's %S,
qstat's stime, the local queue's record), and the parsers dropped it: the agent's BatchJob
``start_time`` was its first sighting of the job running, up to ``sync_period`` late. The drivers
now pass it on, for running jobs only (a pending job's %S is Slurm's estimate; a requeued PBS job
back in Q keeps its earlier run's stime), and a start time that does not read leaves the job
listed, with no start, instead of making its row unreadable (a PBS stime of 1e999 failed the
whole poll, one past year 9999 dropped the job's record).
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import math

import pytest

from balsam.builtin.local_queue import LocalQueue
from balsam.builtin.local_scheduler import LocalScheduler
from balsam.models import SchedulerJobStatus
from balsam.scheduler import PolledStatuses, StatusPoll, SubmitRequest
from balsam.states import BatchJobState
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler

from sched_helpers import DATA, ReplayRunner, load_recorded, recorded, result, utc

R = BatchJobState.running


# -- Slurm: %S of running jobs only ----------------------------------------------------------------

def test_slurm_running_jobs_carry_their_start():
    now = utc(2026, 11, 22, 5, 43)
    slurm = SlurmScheduler(ReplayRunner({"squeue": load_recorded(DATA / "slurm", "squeue_all")}), user="root")
    statuses = slurm.get_statuses(now)
    assert slurm.last_poll.start_times == {2: utc(2026, 11, 22, 5, 42, 18), 4: utc(2026, 11, 22, 5, 42, 18),
                                           6: utc(2026, 11, 22, 5, 42, 37), 9: utc(2026, 11, 22, 5, 42, 37)}
    assert all(statuses[i].state is R for i in slurm.last_poll.start_times)


def test_slurm_pending_jobs_estimated_start_is_not_a_start():
    slurm = SlurmScheduler(user="root")
    poll = slurm.parse_status(result(stdout=recorded("slurm", "squeue_reasons.txt")), utc(2026, 11, 22, 6, 52))
    # 62 and 63 wait with Slurm's estimated start (BeginTime, Resources): not when they started
    assert poll.statuses[62].state is BatchJobState.queued and poll.statuses[63].state is BatchJobState.queued
    assert poll.start_times == {58: utc(2026, 11, 22, 6, 51, 47)}


@pytest.mark.parametrize("start", ["garbage", "2026-13-45T99:00:00", "Unknown", ""])
def test_slurm_unreadable_start_keeps_the_row(start):
    line = f"77|RUNNING|debug|1|5:00|root|4:58|2026-11-22T05:42:37|{start}|2026-11-22T05:47:37|normal|None\n"
    other = "78|RUNNING|debug|1|5:00|root|4:58|2026-11-22T05:42:37|2026-11-22T05:42:40|2026-11-22T05:47:37|normal|None\n"
    poll = SlurmScheduler(user="root").parse_status(result(stdout=line + other), utc(2026, 11, 22, 5, 43))
    assert poll.statuses[77].state is R  # still counted, with no start
    assert poll.start_times == {78: utc(2026, 11, 22, 5, 42, 40)}


# -- PBS: stime of running jobs only ---------------------------------------------------------------

def _qstat_with_stime(stime_text: str) -> str:
    """The recorded Polaris listing with job 1196243's stime (running) printed as ``stime_text``."""
    doc = json.loads(recorded("pbs", "qstat_f_json.txt"))
    key = next(k for k in doc["Jobs"] if k.startswith("1196243."))
    doc["Jobs"][key]["stime"] = "@STIME@"
    return json.dumps(doc, indent=4).replace('"@STIME@"', stime_text)


def test_pbs_running_jobs_carry_their_stime():
    pbs = PBSScheduler(ReplayRunner({"qstat": load_recorded(DATA / "pbs", "qstat_f_json")}), user="alice")
    statuses = pbs.get_statuses(utc(2023, 11, 21, 18, 16, 13))
    # 1196243 runs, 1196252 is exiting (E: it ran); 1196250 and 1196251 wait; bob's 1196190 is not ours
    assert pbs.last_poll.start_times == {1196243: utc(2023, 11, 21, 17, 58, 13), 1196252: utc(2023, 11, 21, 17, 41)}
    assert set(statuses) == {1196243, 1196250, 1196251, 1196252}
    # the dict callers read is unchanged
    parsed = pbs.parse_status(result(stdout=recorded("pbs", "qstat_f_json.txt")), utc(2023, 11, 21, 18, 16, 13))
    assert isinstance(parsed, PolledStatuses) and parsed == statuses


def test_pbs_requeued_job_back_in_q_has_no_start():
    doc = json.loads(recorded("pbs", "qstat_f_json.txt"))
    key = next(k for k in doc["Jobs"] if k.startswith("1196243."))
    doc["Jobs"][key]["job_state"] = "Q"  # qrerun: its earlier run's stime stays in the record
    parsed = PBSScheduler(user="alice").parse_status(result(stdout=json.dumps(doc)), utc(2023, 11, 21, 18, 16, 13))
    assert parsed[1196243].state is BatchJobState.queued and 1196243 not in parsed.start_times


@pytest.mark.parametrize("stime", ["1e999", "100000000000000000000", "1e15", "-1e15", "NaN", "true", '"yesterday"',
                                   '"Tue Nov 99 17:58:13 2023"', "[1]"])
def test_pbs_unreadable_stime_keeps_the_job(stime):
    """Before: 1e999 and 1e20 raised OverflowError out of the parser (the whole poll failed),
    1e15/-1e15/NaN a ValueError that dropped the record (ours: with no other record of ours
    readable, the poll failed), true read as 1970-01-01T00:00:01."""
    pbs = PBSScheduler(ReplayRunner({"qstat": result(stdout=_qstat_with_stime(stime))}), user="alice")
    statuses = pbs.get_statuses(utc(2023, 11, 21, 18, 16, 13))
    assert statuses[1196243].state is R and 1196243 not in pbs.last_poll.start_times
    assert pbs.last_poll.start_times == {1196252: utc(2023, 11, 21, 17, 41)}


def test_pbs_only_record_of_ours_with_a_huge_stime_still_reads():
    doc = json.loads(_qstat_with_stime("1e15"))
    doc["Jobs"] = {k: v for k, v in doc["Jobs"].items() if k.startswith(("1196243.", "1196190."))}
    statuses = PBSScheduler(user="alice").parse_status(result(stdout=json.dumps(doc)), utc(2023, 11, 21, 18, 16, 13))
    assert set(statuses) == {1196243} and statuses[1196243].time_remaining_min >= 0


# -- the local scheduler: its queue's record ---------------------------------------------------------

def _listing(**entries: object) -> str:
    base = {"state": "running", "queue": "local", "project": "local", "num_nodes": 1, "wall_time_min": 10,
            "elapsed_sec": 5.5, "queued_sec": 0.0}
    return json.dumps({key.lstrip("j"): {**base, **({"start_time": value} if value is not ... else {})}
                       for key, value in entries.items()})


def test_local_listing_carries_the_start():
    started = 1796000000.25
    parsed = LocalScheduler(user="me", state_dir="/nonexistent").parse_status(
        result(stdout=_listing(j7=started, j8=...)), utc(2026, 12, 1))
    assert set(parsed) == {7, 8}  # 8: a listing from before it had start_time
    assert parsed.start_times == {7: dt.datetime.fromtimestamp(started, dt.timezone.utc)}


@pytest.mark.parametrize("value", ["soon", None, True, 1e300, math.inf, [1]])
def test_local_unreadable_start_keeps_the_job(value):
    text = _listing(j7=value).replace("Infinity", "1e999")
    parsed = LocalScheduler(user="me", state_dir="/nonexistent").parse_status(result(stdout=text), utc(2026, 12, 1))
    assert parsed[7].state is R and parsed.start_times == {}


def test_local_queue_status_lists_the_start_of_its_record(tmp_path):
    """The real queue command (python -m balsam.builtin.local_queue status) and driver: the start is
    the queue's own record (what its history reports when the job ends), not the poll's time."""
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsleep 30\n")
    script.chmod(0o755)
    local = LocalScheduler(user=getpass.getuser(), state_dir=tmp_path / "ls")
    job_id = local.submit(SubmitRequest(script_path=script, project="local", queue="local", num_nodes=1,
                                        wall_time_min=5, job_name="job"))
    try:
        assert local.get_statuses()[job_id].state is R
        record = json.loads((tmp_path / "ls" / "jobs.json").read_text())["jobs"][str(job_id)]
        assert local.last_poll.start_times == {job_id: dt.datetime.fromtimestamp(record["start_time"], dt.timezone.utc)}
    finally:
        local.delete_job(job_id)
    assert LocalQueue(tmp_path / "ls").history(job_id)["native_state"] == "CANCELLED"


# -- the contract: optional, empty where a driver gives none ----------------------------------------

def test_cobalt_and_plain_dict_drivers_give_no_start_times():
    cobalt = CobaltScheduler(ReplayRunner({"qstat": load_recorded(DATA / "cobalt", "qstat_header")}), user="alice")
    cobalt.get_statuses(utc(2023, 11, 21, 18, 0))
    assert cobalt.last_poll.start_times == {}
    assert StatusPoll(time=utc(2026, 1, 1)).start_times == {}


def test_start_times_are_frozen_and_a_polled_statuses_is_a_dict():
    poll = StatusPoll(time=utc(2026, 1, 1), start_times={1: utc(2026, 1, 1)})
    with pytest.raises(TypeError):
        poll.start_times[2] = utc(2026, 1, 1)  # type: ignore[index]
    assert PolledStatuses() == {} and PolledStatuses().start_times == {}


def test_a_polled_statuses_copy_keeps_its_start_times_and_equality_sees_them():
    """dict's copy() gave a plain dict (the start times lost) and dict's == ignored them."""
    status = SchedulerJobStatus(scheduler_id=1, state=R, queue="debug", num_nodes=1, wall_time_min=10,
                                project="p", time_remaining_min=5, queued_time_min=0)
    polled = PolledStatuses({1: status}, start_times={1: utc(2026, 1, 1)})
    copied = polled.copy()
    assert type(copied) is PolledStatuses and copied == polled and copied.start_times == {1: utc(2026, 1, 1)}
    copied.start_times = {}
    assert polled.start_times == {1: utc(2026, 1, 1)}  # a copy, not the same mapping
    assert polled != PolledStatuses({1: status}) and not polled == PolledStatuses({1: status})
    assert polled != PolledStatuses({1: status}, start_times={1: utc(2026, 1, 2)})
    # against a plain dict, the statuses alone (as callers and tests compare parse_status results)
    assert polled == {1: status} and not polled != {1: status} and {1: status} == polled
    assert polled != {} and PolledStatuses() == {}

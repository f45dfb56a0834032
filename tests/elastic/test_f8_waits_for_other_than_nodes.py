"""``Scheduler.waits_for_other_than_nodes``: the drivers tell a queued job that waits for a hold, a
dependency or a begin time (or whose wait is unknown) from one that waits for nodes and its turn,
in their own words, on recorded scheduler output. The elastic queue counts only the latter as
claiming a backfill window (test_f8_window_claims.py)."""

from __future__ import annotations

from balsam.models import SchedulerJobStatus
from balsam.scheduler import Scheduler
from balsam.states import BatchJobState
from balsam.testing import result
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler

from sched_helpers import recorded, utc


def test_slurm_reasons_and_an_unknown_submit_time():
    slurm = SlurmScheduler(user="root")
    squeue = recorded("slurm", "squeue_reasons.txt") + "64|PENDING|debug|1|5:00|root|5:00|N/A|N/A|N/A|Priority\n"
    poll = slurm.parse_status(result(stdout=squeue), utc(2026, 11, 22, 6, 52, 0))
    slurm.last_poll = poll  # as get_statuses keeps it (parse_status is pure)
    assert {i: slurm.waits_for_other_than_nodes(s) for i, s in poll.statuses.items()} == {
        58: False,  # running
        59: False,  # PartitionNodeLimit: never starts (never_starts says so)
        60: True,   # JobHeldUser
        61: True,   # Dependency
        62: True,   # BeginTime
        63: False,  # Resources: waits for nodes
        64: False,  # Priority: waits its turn ...
    }
    # ... but squeue gave no submit time: its queued_time_min 0 is unknown, not "just submitted"
    # (a hook of its own since r11: the elastic queue knows the age of its own requests).
    assert {i for i, s in poll.statuses.items() if slurm.submit_time_unknown(s)} == {64}
    assert poll.statuses[64].queued_time_min == 0


def test_pbs_held_job():
    pbs = PBSScheduler(user="alice")
    qstat = result(stdout=recorded("pbs", "qstat_f_json_reasons.txt"))
    statuses = pbs.parse_status(qstat, utc(2023, 11, 21, 18, 16, 13))
    assert {i: pbs.waits_for_other_than_nodes(s) for i, s in statuses.items()} == {
        1196270: False,  # Can Never Run (never_starts)
        1196271: False,  # Not Running: Insufficient amount of resource: waits for nodes
        1196272: True,   # job_state H, Hold_Types u
        1196273: False}  # running


def test_cobalt_hold_states():
    cobalt = CobaltScheduler(user="alice")
    statuses = cobalt.parse_status(result(stdout=recorded("cobalt", "qstat_header.txt")), utc(2023, 11, 21, 18, 0, 0))
    assert cobalt.waits_for_other_than_nodes(statuses[498132])  # user_hold
    assert not cobalt.waits_for_other_than_nodes(statuses[498131])  # queued


def test_a_driver_that_does_not_say_waits_for_nodes():
    status = SchedulerJobStatus(scheduler_id=1, state=BatchJobState.queued, queue="q", num_nodes=8, wall_time_min=30,
                                project="p", time_remaining_min=30, queued_time_min=1, message="JobHeldUser")
    assert Scheduler.waits_for_other_than_nodes(CobaltScheduler(user="u"), status) is False

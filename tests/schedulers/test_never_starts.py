"""``Scheduler.never_starts``: the drivers tell a queued job that waits for ever (it asks for more
than its partition, queue, account or QOS allows) from one that waits its turn, in their own words.
The elastic queue counts the former as no capacity (tests/elastic)."""

from __future__ import annotations

import pytest

from balsam.models import SchedulerJobStatus
from balsam.states import BatchJobState
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler

from sched_helpers import recorded, result, utc


def test_slurm_partition_limits_never_start_other_reasons_wait():
    slurm = SlurmScheduler(user="root")
    statuses = slurm.parse_status(result(stdout=recorded("slurm", "squeue_reasons.txt")), utc(2026, 11, 22, 6, 52, 0)).statuses
    # 59: 8 nodes on a 4-node partition; the others wait for their turn, a user, a date, a job
    assert {i: slurm.never_starts(s) for i, s in statuses.items()} == {
        58: False, 59: True, 60: False, 61: False, 62: False, 63: False}
    everything = slurm.parse_status(result(stdout=recorded("slurm", "squeue_all.txt")), utc(2026, 11, 22, 5, 43, 0)).statuses
    assert everything[5].message == "PartitionConfig" and slurm.never_starts(everything[5])
    assert not slurm.never_starts(everything[11])  # JobHeldUser: a release starts it


@pytest.mark.parametrize("reason,never", [
    ("PartitionTimeLimit", True), ("AccountNotAllowed", True), ("QOSMaxNodePerJobLimit", True),
    ("AssocMaxWallDurationPerJobLimit", True), ("InvalidAccount", True),
    ("Priority", False), ("Resources", False), ("ReqNodeNotAvail, UnavailableNodes:node[1-2]", False),
    ("QOSMaxJobsPerUserLimit", False),  # waits until the user's other jobs end
    ("", False),
])
def test_slurm_reason_words(reason, never):
    status = SchedulerJobStatus(scheduler_id=1, state=BatchJobState.queued, queue="debug", num_nodes=8, wall_time_min=30,
                                project="root", time_remaining_min=30, queued_time_min=1, message=reason)
    assert SlurmScheduler(user="root").never_starts(status) is never


def test_pbs_can_never_run_comment():
    pbs = PBSScheduler(user="alice")
    statuses = pbs.parse_status(result(stdout=recorded("pbs", "qstat_f_json_reasons.txt")), utc(2023, 11, 21, 18, 16, 13))
    assert {i: pbs.never_starts(s) for i, s in statuses.items()} == {
        1196270: True,  # "Can Never Run: Insufficient amount of queue resource: nodect (R: 8 A: 2 T: 2)"
        1196271: False, 1196272: False, 1196273: False}


def test_a_driver_that_does_not_say_may_start():
    status = SchedulerJobStatus(scheduler_id=1, state=BatchJobState.queued, queue="q", num_nodes=8, wall_time_min=30,
                                project="p", time_remaining_min=30, queued_time_min=1, message="PartitionConfig")
    assert CobaltScheduler(user="u").never_starts(status) is False


# The real Slurm's word on an 8-node job in a 4-node partition: tests/schedulers/test_slurm_real.py.

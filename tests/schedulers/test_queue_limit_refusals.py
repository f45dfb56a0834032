"""Submissions refused because a queue limit is reached (the user already has as many jobs queued as
allowed) are ``SchedulerError(at_queue_limit=True)``: not permanent, the agent waits instead of
failing the BatchJob. Refusals that no wait clears (a request larger than the queue or QOS allows)
stay permanent. Slurm's outputs were recorded on the real Slurm with limits enforced; PBS's are the
messages OpenPBS's own entity-limit tests expect; Cobalt's is cqm's wording (see data/*/README.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.scheduler import CommandResult, SchedulerError
from balsam.testing.replay import load_recorded
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler

DATA = Path(__file__).resolve().parent / "data"


def refusal(scheduler, kind: str, name: str) -> SchedulerError:
    with pytest.raises(SchedulerError) as info:
        scheduler.parse_submit(load_recorded(DATA / kind, name))
    return info.value


@pytest.mark.parametrize("name, reason, per_user", [
    ("sbatch_qos_submit_limit", "QOSMaxSubmitJobPerUserLimit", True),
    # An association's limit may count jobs of other partitions, or of the account's other users.
    ("sbatch_assoc_submit_limit", "AssocMaxSubmitJobLimit", False),
])
def test_slurm_submit_count_limits_are_a_wait(name, reason, per_user):
    error = refusal(SlurmScheduler(user="root"), "slurm", name)
    assert error.at_queue_limit and not error.permanent
    assert error.per_user_limit is per_user
    # The reason code is the telling part: the policy line below it is the same for size limits.
    assert str(error).startswith(f"sbatch refused the job: {reason}: Batch job submission failed: Job violates")


def test_a_slurm_size_limit_with_the_same_policy_line_stays_permanent():
    error = refusal(SlurmScheduler(user="root"), "slurm", "sbatch_qos_node_limit")
    assert error.permanent and not error.at_queue_limit
    assert str(error).startswith("sbatch refused the job: QOSMaxNodePerJobLimit: Batch job submission failed")


def test_other_slurm_refusals_are_unchanged():
    error = refusal(SlurmScheduler(user="root"), "slurm", "sbatch_bad_partition")
    assert error.permanent and not error.at_queue_limit
    assert str(error) == "sbatch refused the job: Batch job submission failed: Invalid partition name specified"


@pytest.mark.parametrize("name, per_user", [
    ("qsub_queued_threshold_user", False),  # queued_jobs_threshold: never read as "the request alone"
    ("qsub_max_queued_named_user", True),
    ("qsub_max_queued_res_user", True),
])
def test_pbs_queued_limits_are_a_wait(name, per_user):
    error = refusal(PBSScheduler(user="alice"), "pbs", name)
    assert error.at_queue_limit and not error.permanent
    assert error.per_user_limit is per_user


@pytest.mark.parametrize("line", [
    "qsub: Maximum number of jobs for group grp0 already in queue debug",
    "qsub: would exceed queue debug's per-project limit",
    "qsub: would exceed project proj's limit on resource ncpus in complex",
    "qsub: Maximum number of jobs already in queue debug",
])
def test_pbs_group_project_and_overall_limits_are_not_per_user(line):
    with pytest.raises(SchedulerError) as info:
        PBSScheduler(user="alice").parse_submit(CommandResult(("qsub",), 38, "", line + "\n"))
    assert info.value.at_queue_limit and not info.value.per_user_limit


@pytest.mark.parametrize("name", ["qsub_exceeds_queue_resources", "qsub_unknown_queue"])
def test_pbs_refusals_no_wait_clears_stay_permanent(name):
    error = refusal(PBSScheduler(user="alice"), "pbs", name)
    assert error.permanent and not error.at_queue_limit


def test_cobalt_maxqueued_is_a_wait_and_a_bad_queue_is_not():
    cobalt = CobaltScheduler(user="alice")
    error = refusal(cobalt, "cobalt", "qsub_maxqueued")
    assert error.at_queue_limit and not error.permanent and error.per_user_limit
    assert "The limit of 20 jobs per user in the 'default' queue has been reached" in str(error)
    error = refusal(cobalt, "cobalt", "qsub_bad_queue")
    assert error.permanent and not error.at_queue_limit


def test_at_queue_limit_is_never_permanent():
    assert not SchedulerError("full", permanent=True, at_queue_limit=True).permanent


def test_per_user_limit_only_with_at_queue_limit():
    assert not SchedulerError("no", per_user_limit=True).per_user_limit

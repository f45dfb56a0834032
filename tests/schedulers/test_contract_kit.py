"""The in-tree scheduler plugins run balsam.testing's SchedulerContract, as third-party ones do."""

from __future__ import annotations

import datetime as dt

import pytest

from balsam.scheduler import PolledStatuses
from balsam.states import BatchJobState
from balsam.testing import HistoryCase, Refusal, SchedulerContract, utc
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler

from sched_helpers import DATA, FIXTURES

Q, R, F, SF = BatchJobState.queued, BatchJobState.running, BatchJobState.finished, BatchJobState.submit_failed


class TestSlurmContract(SchedulerContract):
    scheduler_class = SlurmScheduler
    user = "root"
    recorded_dir = DATA / "slurm"
    now = utc(2026, 11, 22, 5, 43, 0)
    submit_outputs = {"sbatch_parsable": 6, "sbatch_plain": 7, "sbatch_clusters_parsable": 19}
    submit_refusals = {
        "sbatch_bad_partition": Refusal("Invalid partition name specified", permanent=True),
        "sbatch_missing_script": Refusal("Unable to open file /nonexistent/script.sh"),
        "synthetic_sbatch_timeout": Refusal("Socket timed out", permanent=False),
        "sbatch_qos_submit_limit": Refusal("QOSMaxSubmitJobPerUserLimit", permanent=False, at_queue_limit=True,
                                           per_user_limit=True),
        "sbatch_qos_node_limit": Refusal("QOSMaxNodePerJobLimit", permanent=True, at_queue_limit=False),
    }
    status_outputs = {
        "squeue_all": {2: R, 4: R, 5: Q, 6: R, 9: R, 10: Q, 11: Q},
        "squeue_after": {5: Q, 11: Q},
        "squeue_empty": {},
        # --clusters output: the `CLUSTER: ci` line and the column header are not jobs
        "squeue_clusters": {19: R, 20: Q},
        "squeue_clusters_empty": {},
    }
    status_failures = {
        "synthetic_squeue_default_format": "nothing readable",
        "synthetic_squeue_controller_down": "Unable to contact slurm controller",
    }
    delete_outputs = {"scancel_unknown": None, "synthetic_scancel_invalid": None,
                      "synthetic_scancel_denied": "Access/permission denied"}
    history_cases = [
        # 5 and 11 still pending, 206 running again: the history says "still active"
        HistoryCase({1: F, 2: F, 5: Q, 8: F, 9: F, 10: F, 11: Q, 99999: None}, output="sacct_history"),
        HistoryCase({201: F, 202: SF, 203: F, 205: SF, 206: R, 207: SF}, output="synthetic_sacct_more_states"),
        HistoryCase({11: F, 19: F, 20: F}, output="sacct_clusters"),
        # no accounting at all: no record, ever (not a failed lookup, which would raise)
        HistoryCase({11: None, 19: None}, output="synthetic_sacct_disabled"),
    ]
    backfill_outputs = {"sinfo_backfill": {"debug": [(4, 1440)]},
                        "synthetic_sinfo_mixed": {"big": [(10, 2880)], "debug": [(4, 30)], "long": [(2, 1440)]}}
    queue_outputs = {"sinfo_queues": {"debug": (4, 10080)},
                     "synthetic_sinfo_queues": {"debug": (4, 30), "regular": (1500, 2880), "long": (10, 10080)}}
    project_outputs = {"sacctmgr_accounts": ["root"]}


class TestPBSContract(SchedulerContract):
    scheduler_class = PBSScheduler
    user = "alice"
    recorded_dir = DATA / "pbs"
    now = utc(2023, 11, 21, 18, 16, 13)
    submit_outputs = {"qsub_ok": 1196243}
    submit_refusals = {
        "qsub_unknown_queue": Refusal("Unknown queue", permanent=True),
        "qsub_hook_reject": Refusal("Invalid filesystem specified: grnd"),
        "qsub_no_server": Refusal("", permanent=False),
        "qsub_queued_threshold_user": Refusal("per-user limit of jobs in 'Q' state", permanent=False, at_queue_limit=True,
                                              per_user_limit=False),
    }
    status_outputs = {
        "qstat_f_json": {1196243: R, 1196250: Q, 1196251: Q, 1196252: R},
        "qstat_f_json_bad_escapes": {1196243: R, 1196250: Q, 1196251: Q, 1196252: R},
        "qstat_f_json_no_jobs": {},
        "qstat_f_json_routed": {1196400: Q, 1196401: Q},
        # another user's job with environment values PBS 2022 prints as invalid JSON numbers
        "qstat_f_json_numeric_env": {1196243: R, 1196250: Q, 1196251: Q, 1196252: R},
    }
    status_failures = {"qstat_f_json_truncated": "invalid JSON"}
    overrides_orchestration = {
        "find_submitted": "qselect matches the name only: the jobs it lists are read with qstat -x to drop older "
                          "jobs of the same name (an earlier site database's)",
    }
    delete_outputs = {"qdel_unknown": None, "qdel_unauthorized": "Unauthorized Request"}
    history_cases = [
        HistoryCase({1196243: F, 1196250: F, 1196251: F, 1196253: SF, 1196260: R}, output="qstat_x_f_json"),
        # PBS forgot 1196180: its output file says it ran; PBS says nothing of 1196181 (yet)
        HistoryCase({1196180: F, 1196181: None}, output="qstat_x_unknown", files={1196180: {".output": "qsub_ok.txt"}}),
        HistoryCase({1196180: SF}, output="qstat_x_unknown", files={1196180: {}}),
    ]
    backfill_outputs = {"pbsnodes_a_json": {"*": [(2, 60)], "debug": [(1, 60)]}}
    queue_outputs = {"qstat_Qf_json": {"debug": (2, 60), "debug-scaling": (10, 60), "prod": (496, 1440)}}
    fake_commands = FIXTURES / "fake_pbs"


class TestCobaltContract(SchedulerContract):
    scheduler_class = CobaltScheduler
    user = "alice"
    recorded_dir = DATA / "cobalt"
    now = utc(2023, 11, 21, 18, 16, 13)
    submit_outputs = {"qsub_ok": 498131}
    submit_refusals = {
        "qsub_bad_queue": Refusal("", permanent=True),
        "qsub_maxqueued": Refusal("The limit of 20 jobs per user", permanent=False, at_queue_limit=True,
                                  per_user_limit=True),
        # qsub exited 0: the job may be queued, so not a refusal
        "qsub_no_jobid": Refusal("printed no job id", permanent=False),
    }
    status_outputs = {"qstat_header": {498110: R, 498131: Q, 498132: Q, 498140: SF, 498141: R, 498142: R}}
    status_failures = {"qstat_default_header": "requested columns", "qstat_nothing_readable": "nothing readable"}
    overrides_orchestration = {
        "find_submitted": "qstat cannot look jobs up by name: the job id is read from the .cobaltlog qsub writes",
    }
    delete_outputs = {"qdel_ok": None}
    history_cases = [
        HistoryCase({498110: F, 498111: R, 498131: F, 498140: SF, 498150: None, 1: None},
                    files={498110: {".cobaltlog": "qlaunch00012.cobaltlog"},
                           498111: {".cobaltlog": "qlaunch00013_running.cobaltlog"},
                           498131: {".cobaltlog": "qlaunch00014_deleted.cobaltlog"},
                           498140: {".cobaltlog": "qlaunch00015_depfail.cobaltlog"},
                           498150: {".cobaltlog": "qlaunch00016_garbage.cobaltlog"}}),
    ]
    backfill_outputs = {"nodelist": {"backfill": [(1, 75), (3, 31)], "default": [(1, 75), (3, 31)],
                                     "debug-cache-quad": [(1, 58)]}}
    project_outputs = {"qsub_bad_project": ["datascience", "catalyst", "CSC249ADCD08"]}
    fake_commands = FIXTURES / "fake_cobalt"


class NaiveStartSlurm(SlurmScheduler):
    """Gives its running jobs' starts as the agent's local time (fromtimestamp without a zone)."""

    def parse_status(self, result, now):
        poll = super().parse_status(result, now)
        starts = {i: dt.datetime.fromtimestamp(t.timestamp()) for i, t in poll.start_times.items()}
        return PolledStatuses(poll.statuses, start_times=starts)


class EstimatedStartSlurm(SlurmScheduler):
    """Gives a pending job's estimated start too."""

    def parse_status(self, result, now):
        poll = super().parse_status(result, now)
        return PolledStatuses(poll.statuses, start_times={**poll.start_times, 5: now})


class FutureStartSlurm(SlurmScheduler):
    """Misreads the year of its running jobs' starts."""

    def parse_status(self, result, now):
        poll = super().parse_status(result, now)
        return PolledStatuses(poll.statuses, start_times={i: t.replace(year=9999) for i, t in poll.start_times.items()})


@pytest.mark.parametrize("driver,match", [(NaiveStartSlurm, "is not an aware datetime"),
                                          (EstimatedStartSlurm, "as queued, not as running"),
                                          (FutureStartSlurm, "is in the future")])
def test_the_kit_fails_wrong_start_times(driver, match):
    class Contract(TestSlurmContract):
        scheduler_class = driver

    with pytest.raises(AssertionError, match=match):
        Contract().test_status_start_times()

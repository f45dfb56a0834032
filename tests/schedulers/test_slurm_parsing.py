"""The Slurm driver's render/parse pairs on outputs recorded from the real Slurm 22.05 here."""

from __future__ import annotations

import pytest

from balsam.scheduler import Command, SchedulerError, StatusPoll, SubmitRequest, subprocess_runner
from balsam.site.job_template import build_context, render_job_script
from balsam.states import BatchJobState
from balsam_scheduler_slurm import SLURM_STATES, SlurmScheduler
from balsam_scheduler_slurm.scheduler import parse_squeue_line, slurm_duration_min

from sched_helpers import ReplayRunner, recorded, result, utc

NOW = utc(2026, 11, 22, 5, 43, 0)
NO_POLL = StatusPoll(time=NOW)


@pytest.fixture
def slurm() -> SlurmScheduler:
    return SlurmScheduler(user="root")


def test_every_slurm_state_is_mapped():
    documented = """BOOT_FAIL CANCELLED COMPLETED CONFIGURING COMPLETING DEADLINE FAILED NODE_FAIL OUT_OF_MEMORY
    PENDING PREEMPTED RUNNING RESV_DEL_HOLD REQUEUE_FED REQUEUE_HOLD REQUEUED RESIZING REVOKED SIGNALING
    SPECIAL_EXIT STAGE_OUT STOPPED SUSPENDED TIMEOUT""".split()
    assert set(documented) <= set(SLURM_STATES)
    assert SLURM_STATES["PENDING"] is BatchJobState.queued
    assert SLURM_STATES["COMPLETING"] is BatchJobState.running
    assert SLURM_STATES["TIMEOUT"] is BatchJobState.finished


@pytest.mark.parametrize(
    "text, minutes",
    [("5:00", 5), ("0:58", 1), ("0:29", 0), ("1:00:00", 60), ("1-00:00:00", 1440), ("2-3", 3060), ("1-2:30", 1590),
     ("30", 30), ("UNLIMITED", 0), ("INVALID", 0)],
)
def test_slurm_durations_are_not_hours_minutes(text, minutes):
    assert slurm_duration_min(text) == minutes


def test_render_submit_uses_explicit_flags_and_pass_through(slurm, tmp_path):
    script = tmp_path / "qsubmit" / "qlaunch00007.sh"
    request = SubmitRequest(script_path=script, project="m1234", queue="debug", num_nodes=2, wall_time_min=30,
                            job_name="qlaunch00007",
                            optional_params={"reservation": "hackathon", "constraint": "gpu", "mig_count": "2",
                                             "qos": "", "exclusive": "yes", "sbatch_flags": "--gpus-per-task=1 --mail-type=END"})
    command = slurm.render_submit(request)
    args = list(command.args)
    assert args[:2] == ["sbatch", "--parsable"]
    assert args[args.index("--nodes") + 1] == "2" and args[args.index("--time") + 1] == "30"
    assert args[args.index("--account") + 1] == "m1234" and args[args.index("--partition") + 1] == "debug"
    assert args[args.index("--output") + 1] == str(script.with_suffix(".output"))
    assert "--reservation=hackathon" in args and "--constraint=gpu" in args and "--exclusive" in args
    assert "--gpus-per-task=1" in args and "--mail-type=END" in args
    assert not any("mig_count" in a or a.startswith("--qos") for a in args)  # template-only / empty params
    assert args[-1] == str(script) and command.cwd == script.parent


def test_queue_flag_qos_is_a_setting_for_sites_whose_queues_are_qos(tmp_path):
    request = SubmitRequest(script_path=tmp_path / "s.sh", project="m1", queue="regular", num_nodes=1, wall_time_min=5)
    args = SlurmScheduler(user="u", options={"queue_flag": "--qos"}).render_submit(request).args
    assert args[args.index("--qos") + 1] == "regular" and "--partition" not in args
    script = render_job_script(SlurmScheduler.default_job_template,
                               build_context({"id": 1, "project": "m1", "queue": "regular", "num_nodes": 1,
                                              "wall_time_min": 5, "job_mode": "mpi"}, tmp_path, call_hook=False))
    assert "#SBATCH --partition" not in script and "#SBATCH --qos" not in script  # the queue is on the sbatch line only
    with pytest.raises(ValueError, match="queue_flag"):
        SlurmScheduler(user="u", options={"queue_flag": "-p"})


def test_parse_submit_real_outputs(slurm):
    assert slurm.parse_submit(result(stdout=recorded("slurm", "sbatch_parsable.txt"))) == 6
    assert slurm.parse_submit(result(stdout=recorded("slurm", "sbatch_plain.txt"))) == 7
    assert slurm.parse_submit(result(stdout="sbatch: warning: bla\n1234;perlmutter\n")) == 1234


def test_submit_refused_by_slurm_keeps_the_reason(slurm):
    with pytest.raises(SchedulerError) as info:
        slurm.parse_submit(result(stderr=recorded("slurm", "sbatch_bad_partition.stderr.txt"), returncode=1))
    assert "Invalid partition name specified" in str(info.value) and info.value.permanent
    with pytest.raises(SchedulerError) as info:
        slurm.parse_submit(result(stderr=recorded("slurm", "sbatch_missing_script.stderr.txt"), returncode=1))
    assert "Unable to open file /nonexistent/script.sh" in str(info.value)
    with pytest.raises(SchedulerError) as info:
        slurm.parse_submit(result(stderr=recorded("slurm", "synthetic_sbatch_timeout.stderr.txt"), returncode=1))
    assert "Socket timed out" in str(info.value) and not info.value.permanent


@pytest.mark.parametrize("stdout", ["", "\n", "garbage\n", "Submitted batch job\n"])
def test_submit_without_a_job_id_is_an_error(slurm, stdout):
    with pytest.raises(SchedulerError, match="no job id"):
        slurm.parse_submit(result(stdout=stdout))


def test_render_status_is_immune_to_user_formats(slurm):
    command = slurm.render_status("root")
    assert "--format" in command.args and "--noheader" in command.args and "--states=all" in command.args
    assert command.args[command.args.index("--user") + 1] == "root"
    assert {"SQUEUE_FORMAT", "SQUEUE_FORMAT2", "SQUEUE_STATES", "SQUEUE_PARTITION", "SLURM_TIME_FORMAT"} <= set(command.unset_env)
    assert command.env["TZ"] == "UTC" and command.env["SLURM_TIME_FORMAT"] == "standard"


def test_parse_status_real_squeue(slurm):
    statuses = slurm.parse_status(result(stdout=recorded("slurm", "squeue_all.txt")), NOW).statuses
    # COMPLETED and FAILED jobs are still listed by squeue (MinJobAge) but have left the queue
    assert set(statuses) == {2, 4, 5, 6, 9, 10, 11}
    assert statuses[2].state is BatchJobState.running and statuses[2].wall_time_min == 1
    assert statuses[2].time_remaining_min == 1 and statuses[2].project == "root" and statuses[2].queue == "debug"
    assert statuses[5].state is BatchJobState.queued and statuses[5].num_nodes == 9 and statuses[5].wall_time_min == 5
    assert statuses[5].queued_time_min == 0  # 05:42:18 -> 05:43:00
    assert statuses[11].state is BatchJobState.queued  # held by the user
    assert statuses[5].message == "PartitionConfig" and statuses[11].message == "JobHeldUser"
    assert statuses[2].message == ""  # a running job's reason is "None"
    later = slurm.parse_status(result(stdout=recorded("slurm", "squeue_after.txt")), NOW).statuses
    assert set(later) == {5, 11}


def test_pending_reasons_become_the_status_message(slurm):
    statuses = slurm.parse_status(result(stdout=recorded("slurm", "squeue_reasons.txt")), utc(2026, 11, 22, 6, 52, 0)).statuses
    assert {i: s.message for i, s in statuses.items()} == {
        58: "", 59: "PartitionNodeLimit", 60: "JobHeldUser", 61: "Dependency", 62: "BeginTime", 63: "Resources",
    }
    assert statuses[59].state is BatchJobState.queued and statuses[59].num_nodes == 8
    assert statuses[58].state is BatchJobState.running


def test_long_pending_reason_is_kept_whole_up_to_a_limit(slurm):
    nodes = ",".join(f"node{i}" for i in range(200))
    line = f"7|PENDING|debug|2|5:00|p|5:00|2026-11-22T05:00:00|N/A|N/A|ReqNodeNotAvail, UnavailableNodes:{nodes}"
    message = slurm.parse_status(result(stdout=line + "\n"), NOW).statuses[7].message
    assert message.startswith("ReqNodeNotAvail, UnavailableNodes:node0,node1") and len(message) == 300


def test_parse_status_empty_output_means_no_jobs(slurm):
    assert slurm.parse_status(result(stdout=recorded("slurm", "squeue_empty.txt")), NOW).statuses == {}


def test_garbled_squeue_lines_are_skipped_not_fatal(slurm, caplog):
    statuses = slurm.parse_status(result(stdout=recorded("slurm", "synthetic_squeue_garbled.txt")), NOW).statuses
    assert set(statuses) == {101, 103}
    assert statuses[103].wall_time_min == 2880
    assert "skipped unreadable line" in caplog.text


def test_squeue_in_a_user_format_is_an_error_not_an_empty_queue(slurm):
    with pytest.raises(SchedulerError, match="nothing readable"):
        slurm.parse_status(result(stdout=recorded("slurm", "synthetic_squeue_default_format.txt")), NOW).statuses


def test_controller_down_is_a_failed_poll(slurm):
    with pytest.raises(SchedulerError, match="Unable to contact slurm controller"):
        slurm.parse_status(result(stderr=recorded("slurm", "synthetic_squeue_controller_down.stderr.txt"), returncode=1), NOW).statuses


@pytest.mark.parametrize("line", ["1|RUNNING", "x|RUNNING|debug|1|1:00|a|1:00|N/A|N/A|N/A|None",
                                  "7|running state|debug|1|1:00|a|1:00|N/A|N/A|N/A|None", ""])
def test_bad_squeue_lines_raise_value_error(line):
    with pytest.raises(ValueError):
        parse_squeue_line(line)


def test_parse_delete(slurm):
    slurm.parse_delete(result(stdout=recorded("slurm", "scancel_unknown.stdout.txt")), 99999)
    slurm.parse_delete(result(stderr=recorded("slurm", "synthetic_scancel_invalid.stderr.txt"), returncode=1), 4242)
    with pytest.raises(SchedulerError, match="Access/permission denied"):
        slurm.parse_delete(result(stderr=recorded("slurm", "synthetic_scancel_denied.stderr.txt"), returncode=1), 4243)


def test_history_real_sacct(slurm):
    ids = [1, 2, 5, 8, 9, 10, 11, 99999]
    histories = slurm.parse_histories(result(stdout=recorded("slurm", "sacct_history.txt")), dict.fromkeys(ids), NO_POLL)
    assert histories[1].state is BatchJobState.finished and histories[1].native_state == "COMPLETED"
    assert histories[1].start_time == utc(2026, 11, 22, 5, 42, 15) and histories[1].end_time == utc(2026, 11, 22, 5, 42, 16)
    assert histories[2].native_state == "TIMEOUT" and histories[2].end_time == utc(2026, 11, 22, 5, 43, 18)
    assert histories[8].native_state == "FAILED" and "exit code 3:0" in histories[8].message
    assert histories[9].native_state == "CANCELLED by 0" and histories[9].state is BatchJobState.finished
    # cancelled while pending: never started, still "finished" (a deletion, not a failure)
    assert histories[10].start_time is None and histories[10].state is BatchJobState.finished
    # still pending: the history says "still active" (the agent keeps such a BatchJob)
    assert histories[5].state is BatchJobState.queued and histories[11].state is BatchJobState.queued
    assert histories[99999] is None  # unknown to sacct (yet)


def test_history_more_states(slurm):
    ids = [201, 202, 203, 204, 205, 206, 207]
    histories = slurm.parse_histories(result(stdout=recorded("slurm", "synthetic_sacct_more_states.txt")), dict.fromkeys(ids), NO_POLL)
    assert histories[201].state is BatchJobState.finished and histories[201].native_state == "NODE_FAIL"
    assert histories[202].state is BatchJobState.submit_failed and "never started" in histories[202].message
    assert histories[203].native_state == "OUT_OF_MEMORY"
    assert histories[205].state is BatchJobState.submit_failed
    assert histories[206].state is BatchJobState.running  # requeued and running again: the last record wins
    assert histories[207].state is BatchJobState.submit_failed


def test_sacct_failure_falls_back_to_what_squeue_last_said(tmp_path):
    runner = ReplayRunner({
        "squeue": result(stdout=recorded("slurm", "squeue_after.txt")),
        "sacct": result(stderr="sacct: error: Problem talking to the database: Connection refused", returncode=1),
    })
    slurm = SlurmScheduler(runner, user="root")
    assert set(slurm.get_statuses(NOW)) == {5, 11}
    histories = slurm.get_histories({2: None, 8: None})
    assert runner.programs() == ["squeue", "sacct"]  # one bulk sacct call for both jobs
    assert histories[2].native_state == "TIMEOUT" and histories[2].end_time == utc(2026, 11, 22, 5, 43, 18)
    assert histories[8].native_state == "FAILED"
    with pytest.raises(SchedulerError, match="Problem talking to the database"):
        slurm.get_histories({777: None})  # no fall-back for this one: the error is reported


def test_backfill_from_sinfo(slurm):
    windows = slurm.parse_backfill(result(stdout=recorded("slurm", "sinfo_backfill.txt")))
    assert {q: [(w.num_nodes, w.wall_time_min) for w in ws] for q, ws in windows.items()} == {"debug": [(4, 1440)]}
    windows = slurm.parse_backfill(result(stdout=recorded("slurm", "synthetic_sinfo_mixed.txt")))
    assert {q: [(w.num_nodes, w.wall_time_min) for w in ws] for q, ws in windows.items()} == {
        "big": [(10, 2880)], "debug": [(4, 30)], "long": [(2, 1440)]}


def test_backfill_under_qos_queues_is_usable_from_any_queue():
    """With queue_flag --qos a BatchJob's queue is a QOS (NERSC: regular), which sinfo never names:
    windows keyed by partition matched no queue, and the elastic queue never submitted."""
    qos = SlurmScheduler(user="root", options={"queue_flag": "--qos"})
    windows = qos.parse_backfill(result(stdout=recorded("slurm", "synthetic_sinfo_mixed.txt")))
    assert {q: sorted((w.num_nodes, w.wall_time_min) for w in ws) for q, ws in windows.items()} == {
        "*": [(2, 1440), (4, 30), (10, 2880)]}
    assert qos.parse_backfill(result(stdout="debug|up|allocated|4|30:00\n")) == {}


def test_discover_projects(slurm):
    assert slurm.parse_discover_projects(result(stdout=recorded("slurm", "sacctmgr_accounts.txt"))) == ["root"]
    assert slurm.parse_discover_projects(result(stdout="m1234\nm1234\nm9999\n\n")) == ["m1234", "m9999"]


def test_unset_env_really_removes_user_formats(monkeypatch):
    monkeypatch.setenv("SQUEUE_FORMAT", "%i %u")
    out = subprocess_runner(Command(["sh", "-c", "echo ${SQUEUE_FORMAT-unset} $TZ"], env={"TZ": "UTC"},
                                    unset_env=("SQUEUE_FORMAT",)))
    assert out.stdout.split() == ["unset", "UTC"]


# -- multi-cluster sites (sbatch --clusters) ----------------------------------------------------


def _cluster_request(tmp_path, **params):
    return SubmitRequest(script_path=tmp_path / "qlaunch00021.sh", project="m1234", queue="regular", num_nodes=1,
                         wall_time_min=30, job_name="qlaunch00021", optional_params=params)


def test_a_cluster_the_site_does_not_list_is_refused_not_lost(slurm, tmp_path):
    """`-x cluster=NAME` used to reach sbatch only: squeue, scancel and sacct asked the login node's
    cluster, never saw the job, and the agent declared it submit_failed while it waited there."""
    for params, where in (({"cluster": "escori"}, "optional param cluster"),
                          ({"sbatch_flags": "--mail-type=END -M escori"}, "optional param sbatch_flags"),
                          ({"sbatch_flags": "--clusters=escori"}, "optional param sbatch_flags")):
        with pytest.raises(SchedulerError, match=rf"^cluster 'escori' \({where}\) is not in scheduler.options.clusters "
                                                 r"of settings.yml \(listed: none\)") as info:
            slurm.render_submit(_cluster_request(tmp_path, **params))
        assert info.value.permanent
    listed = SlurmScheduler(user="root", options={"clusters": ["perlmutter"]})
    with pytest.raises(SchedulerError, match=r"listed: perlmutter"):
        listed.render_submit(_cluster_request(tmp_path, cluster="escori"))
    assert "--clusters" not in " ".join(slurm.render_submit(_cluster_request(tmp_path, cluster="")).args)


def test_named_clusters_reach_every_command_that_looks_jobs_up(tmp_path):
    slurm = SlurmScheduler(user="root", options={"clusters": ["perlmutter", "escori"]})
    submit = slurm.render_submit(_cluster_request(tmp_path, cluster="escori")).args
    assert "--clusters=escori" in submit and submit.count("--clusters=escori") == 1
    assert "--clusters=perlmutter" in slurm.render_submit(_cluster_request(tmp_path)).args  # the first by default
    status = slurm.render_status("root").args
    assert "--clusters=perlmutter,escori" in status and "--noheader" not in status  # keeps the CLUSTER: lines
    assert "--clusters=perlmutter,escori" in slurm.render_histories({4242: None}).args
    assert "--clusters=perlmutter,escori" in slurm.render_find(_cluster_request(tmp_path), "root").args
    assert slurm.render_delete(4242).args == ("scancel", "--clusters=perlmutter,escori", "4242")  # not polled yet
    # Once polled, a job is cancelled on its own cluster only (the same number may exist on the other).
    slurm.runner = ReplayRunner({"squeue": result(stdout=recorded("slurm", "synthetic_squeue_two_clusters.txt"))})
    statuses = slurm.get_statuses(NOW)
    assert {i: (s.state, s.queue) for i, s in statuses.items()} == {
        31337: (BatchJobState.running, "regular_milan_ss11"), 4242: (BatchJobState.queued, "workflow")}
    assert slurm.render_delete(4242).args == ("scancel", "--clusters=escori", "4242")
    assert slurm.render_delete(31337).args == ("scancel", "--clusters=perlmutter", "31337")
    with pytest.raises(ValueError, match="clusters"):
        SlurmScheduler(user="root", options={"clusters": ["bad name"]})


def test_real_cluster_outputs_are_read(tmp_path):
    """Recorded from the real Slurm 22.05 here with --clusters=ci: `ID;CLUSTER` from sbatch; squeue
    prints `CLUSTER: ci` and its column header (--noheader would drop both)."""
    slurm = SlurmScheduler(user="root", options={"clusters": ["ci"]})
    assert slurm.parse_submit(result(stdout=recorded("slurm", "sbatch_clusters_parsable.txt"))) == 19
    poll = slurm.parse_status(result(stdout=recorded("slurm", "squeue_clusters.txt")), NOW)
    assert {i: s.state for i, s in poll.statuses.items()} == {19: BatchJobState.running, 20: BatchJobState.queued}
    assert poll.statuses[20].message == "PartitionNodeLimit" and poll.ended[11].native_state == "TIMEOUT"
    assert set(poll.clusters.values()) == {"ci"}
    assert slurm.parse_status(result(stdout=recorded("slurm", "squeue_clusters_empty.txt")), NOW).statuses == {}
    request = SubmitRequest(script_path="/tmp/fix-sched/job.sh", project="root", queue="debug", num_nodes=1,
                            wall_time_min=5, job_name="qlaunch00021")
    assert slurm.parse_find(result(stdout=recorded("slurm", "squeue_find_clusters.txt")), request) == [19]
    histories = slurm.parse_histories(result(stdout=recorded("slurm", "sacct_clusters.txt")), dict.fromkeys([19, 20]), NO_POLL)
    assert histories[19].native_state == "CANCELLED by 0" and histories[19].start_time == utc(2026, 12, 4, 3, 54, 56)
    assert histories[20].start_time is None and histories[20].state is BatchJobState.finished


def test_sacct_without_accounting_is_no_record_not_a_failed_lookup(slurm):
    """A site without accounting storage never has a record: the agent may count such jobs as
    missing. A database outage is a failed lookup (raised), which the agent waits out."""
    disabled = result(stderr=recorded("slurm", "synthetic_sacct_disabled.stderr.txt"), returncode=1)
    assert slurm.parse_histories(disabled, dict.fromkeys([777, 778]), NO_POLL) == {777: None, 778: None}
    down = result(stderr=recorded("slurm", "synthetic_sacct_db_down.stderr.txt"), returncode=1)
    with pytest.raises(SchedulerError, match="Problem talking to the database: Connection refused"):
        slurm.parse_histories(down, dict.fromkeys([777]), NO_POLL)


def test_a_job_that_ran_is_not_given_the_reason_it_once_waited_for(slurm):
    """sacct keeps a job's last pending reason: a requeued job that then completed read "Slurm state
    COMPLETED, reason BeginTime" (real Slurm 22.05, scontrol requeue). A job that never started keeps
    its reason: it says why."""
    lines = ("12|COMPLETED|2026-12-05T05:16:10|2026-12-05T05:19:18|2026-12-05T05:21:19|0:0|BeginTime\n"
             "13|CANCELLED by 0|2026-12-05T05:16:10|Unknown|2026-12-05T05:17:00|0:0|Resources\n")
    histories = slurm.parse_histories(result(stdout=lines), dict.fromkeys([12, 13]), NO_POLL)
    assert histories[12].message == "Slurm state COMPLETED"
    assert histories[13].message == "Slurm state CANCELLED by 0, reason Resources"

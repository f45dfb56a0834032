"""The scheduler agent module with the real PBS, Slurm and Cobalt drivers, against the real API.

Their commands are answered from outputs recorded on the real systems (tests/schedulers/data, see
the READMEs there) or run for real on the fake Cobalt of tests/fixtures. Each test is a case where
the module misread what the scheduler said: a job counted under another queue, a job on another
cluster, a history lookup that failed, a submission whose answer was lost, garbage from qstat.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from balsam.scheduler import Command, CommandResult, SchedulerError, subprocess_runner
from balsam.site.modules.scheduler import SchedulerModule
from balsam.testing.fakebatch import fake_batch_env
from balsam.testing.replay import ReplayRunner, load_recorded
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler
from balsam_scheduler_slurm.scheduler import SQUEUE_FORMAT
from site_test_utils import batch_job, create_batch_job, wait_for

TESTS = Path(__file__).resolve().parents[1]
DATA = TESTS / "schedulers" / "data"
#: The drivers' own tolerance of failed polls and missing records (Scheduler.status_error_threshold).
THRESHOLD = 3


def recorded(kind: str, name: str) -> CommandResult:
    return load_recorded(DATA / kind, name)


def answer(command: Command, recorded_result: CommandResult) -> CommandResult:
    return CommandResult(tuple(command.args), recorded_result.returncode, recorded_result.stdout, recorded_result.stderr)


def make_module(make_site, client, scheduler, queues: dict, projects: list, params: dict | None = None):
    site = make_site(overrides={"scheduler": {"allowed_queues": queues, "allowed_projects": projects,
                                              "optional_batch_job_params": params or {}}})
    Path(site.job_template_path).write_text("#!/bin/bash\nsleep 30\n")
    return site, SchedulerModule(site, site.settings.scheduler, client, scheduler=scheduler)


def set_active(client, batch_job_id: int, state: str, scheduler_id: int) -> None:
    """A BatchJob the module recorded as submitted earlier (before the agent's restart)."""
    client.patch("/batch-jobs/", json=[{"id": batch_job_id, "state": "queued", "scheduler_id": scheduler_id}])
    if state == "running":
        client.patch("/batch-jobs/", json=[{"id": batch_job_id, "state": "running"}])


# -- 1. max_queued_jobs under the scheduler's other queue name ------------------------------------


def test_max_queued_jobs_counts_a_routed_pbs_job_under_its_batch_jobs_queue(make_site, client) -> None:
    """Polaris: `-q prod` is a routing queue and qstat lists the job in the execution queue it was
    routed to (`small`): counted there, prod never reached its max_queued_jobs."""
    doc = json.loads(recorded("pbs", "qstat_f_json_routed.txt").stdout)
    ids = iter(doc["Jobs"])
    in_queue: dict = {}

    def qsub(command: Command) -> CommandResult:
        pbs_id = next(ids)
        in_queue[pbs_id] = doc["Jobs"][pbs_id]
        return CommandResult(tuple(command.args), 0, pbs_id + "\n", "")

    def qstat(command: Command) -> CommandResult:
        return CommandResult(tuple(command.args), 0, json.dumps({**doc, "Jobs": in_queue}), "")

    pbs = PBSScheduler(ReplayRunner({"qsub": qsub, "qstat": qstat, "pbsnodes": recorded("pbs", "pbsnodes_a_json")}),
                       user="alice")
    site, module = make_module(make_site, client, pbs, {"prod": {"max_nodes": 10, "max_walltime": 60, "max_queued_jobs": 1}},
                               ["datascience"])
    first, second = (create_batch_job(client, site.site_id, project="datascience", queue="prod")["id"] for _ in range(2))
    for _ in range(3):
        module.run_cycle()
    assert batch_job(client, first)["state"] == "queued" and len(in_queue) == 1
    waiting = batch_job(client, second)
    assert waiting["state"] == "pending_submission"
    assert waiting["status_info"]["waiting"] == "waiting: 1 jobs already in queue 'prod' (max_queued_jobs 1)"
    listed = client.get(f"/sites/{site.site_id}")["queued_jobs"]
    assert {v["queue"] for v in listed.values()} == {"small"}  # the Site still shows the scheduler's view


def test_max_queued_jobs_counts_a_slurm_qos_job_under_its_batch_jobs_queue(make_site, client) -> None:
    """NERSC (queue_flag --qos): `--qos debug` lands in partition gpu_ss11, which squeue shows."""
    submitted: list[int] = []

    def sbatch(command: Command) -> CommandResult:
        assert command.args[command.args.index("--qos") + 1] == "debug"
        submitted.append(5000 + len(submitted))
        return CommandResult(tuple(command.args), 0, f"{submitted[-1]}\n", "")

    def squeue(command: Command) -> CommandResult:
        rows = "".join(f"{i}|PENDING|gpu_ss11|1|30:00|m1234|30:00|2026-12-04T03:54:55|N/A|N/A|Priority\n" for i in submitted)
        return CommandResult(tuple(command.args), 0, rows, "")

    slurm = SlurmScheduler(ReplayRunner({"sbatch": sbatch, "squeue": squeue, "sinfo": recorded("slurm", "sinfo_backfill")}),
                           user="alice", options={"queue_flag": "--qos"})
    site, module = make_module(make_site, client, slurm, {"debug": {"max_nodes": 8, "max_walltime": 30, "max_queued_jobs": 1}},
                               ["m1234"])
    ids = [create_batch_job(client, site.site_id, project="m1234", queue="debug")["id"] for _ in range(3)]
    for _ in range(3):
        module.run_cycle()
    assert [batch_job(client, i)["state"] for i in ids] == ["queued", "pending_submission", "pending_submission"]
    assert submitted == [5000]


# -- 2. a job on another Slurm cluster --------------------------------------------------------------


def test_a_job_on_a_named_slurm_cluster_is_tracked_deleted_and_finished(make_site, client) -> None:
    """`-x cluster=ci` put the job on that cluster, but squeue/scancel/sacct asked the login node's
    own: the agent declared it submit_failed after three polls while it waited there. With the
    site's `clusters` option every command asks the named clusters; a cluster the site does not
    list is refused before sbatch runs. (Outputs recorded from the real Slurm with --clusters=ci.)"""
    state = {"cancelled": False}

    def squeue(command: Command) -> CommandResult:
        if "--clusters=ci" not in command.args:
            return answer(command, recorded("slurm", "squeue_empty"))  # the login node's cluster: not there
        text = recorded("slurm", "squeue_clusters").stdout
        if state["cancelled"]:
            text = text.replace("19|RUNNING|debug|1|5:00|root|4:58|2026-12-04T03:54:55|2026-12-04T03:54:56|2026-12-04T03:59:56|None",
                                "19|CANCELLED|debug|1|5:00|root|4:52|2026-12-04T03:54:55|2026-12-04T03:54:56|2026-12-04T03:55:02|None")
        return CommandResult(tuple(command.args), 0, text, "")

    def scancel(command: Command) -> CommandResult:
        assert command.args == ("scancel", "--clusters=ci", "19")
        state["cancelled"] = True
        return CommandResult(tuple(command.args), 0, "", "")

    def sacct(command: Command) -> CommandResult:
        assert "--clusters=ci" in command.args
        return answer(command, recorded("slurm", "sacct_clusters"))

    runner = ReplayRunner({"sbatch": recorded("slurm", "sbatch_clusters_parsable"), "squeue": squeue, "scancel": scancel,
                           "sacct": sacct, "sinfo": recorded("slurm", "sinfo_backfill")})
    slurm = SlurmScheduler(runner, user="root", options={"clusters": ["ci"]})
    site, module = make_module(make_site, client, slurm, {"debug": {"max_nodes": 8, "max_walltime": 30, "max_queued_jobs": 5}},
                               ["root"], {"cluster": ""})
    bj = create_batch_job(client, site.site_id, project="root", queue="debug", optional_params={"cluster": "ci"})["id"]
    elsewhere = create_batch_job(client, site.site_id, project="root", queue="debug", optional_params={"cluster": "escori"})["id"]
    for _ in range(THRESHOLD + 1):
        module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "running" and record["scheduler_id"] == 19 and "error" not in record["status_info"]
    sbatch_calls = [c.args for c in runner.calls if c.args[0] == "sbatch"]
    assert len(sbatch_calls) == 1 and "--clusters=ci" in sbatch_calls[0]
    refused = batch_job(client, elsewhere)
    assert refused["state"] == "submit_failed"
    assert refused["status_info"]["error"].startswith(
        "submit failed: cluster 'escori' (optional param cluster) is not in scheduler.options.clusters of settings.yml")

    client.patch("/batch-jobs/", json=[{"id": bj, "state": "pending_deletion"}])
    module.run_cycle()  # scancel on cluster ci
    module.run_cycle()  # gone: sacct (on ci) has its end
    record = batch_job(client, bj)
    assert record["state"] == "finished" and record["status_info"]["scheduler_state"] == "CANCELLED by 0"
    assert record["start_time"].startswith("2026-12-04T03:54:56") and record["end_time"].startswith("2026-12-04T03:55:02")


def test_the_clusters_option_is_a_checked_setting_that_reaches_the_driver(tmp_path) -> None:
    from balsam.config import SettingsError, loads_settings

    settings = loads_settings("scheduler:\n  name: slurm\n  options:\n    clusters: [perlmutter, escori]\n")

    class Site:
        site_id, site_path = 1, tmp_path

    Site.settings = settings
    module = SchedulerModule(Site, settings.scheduler, client=None)
    assert module.scheduler.options.clusters == ["perlmutter", "escori"]
    assert "--clusters=perlmutter,escori" in module.scheduler.render_status("me").args
    with pytest.raises(SettingsError, match=r"^settings.yml:4 scheduler.options.clusters"):
        loads_settings("scheduler:\n  name: slurm\n  options:\n    clusters: [perl mutter]\n")


# -- 3. a history lookup that fails -----------------------------------------------------------------


def test_a_failed_sacct_is_not_a_missing_record(make_site, client) -> None:
    """slurmdbd unreachable: the jobs that left squeue used to be declared submit_failed (queued) or
    finished without times (running) after three cycles. Now they wait for sacct; a job squeue still
    lists as ended takes that record meanwhile; once sacct answers, a job it has no record of is
    counted missing as before."""
    state = {"sacct_down": True}
    # squeue_after.txt without job 2's line: it ended more than MinJobAge ago (only sacct knows it).
    squeue_text = "".join(line for line in recorded("slurm", "squeue_after").stdout.splitlines(True)
                          if not line.startswith("2|"))

    def sacct(command: Command) -> CommandResult:
        if state["sacct_down"]:
            return answer(command, recorded("slurm", "synthetic_sacct_db_down"))
        return answer(command, recorded("slurm", "sacct_history"))

    slurm = SlurmScheduler(ReplayRunner({"squeue": CommandResult(("squeue",), 0, squeue_text, ""), "sacct": sacct,
                                         "sinfo": recorded("slurm", "sinfo_backfill")}), user="root")
    site, module = make_module(make_site, client, slurm, {"debug": {"max_nodes": 8, "max_walltime": 30, "max_queued_jobs": 5}},
                               ["root"])
    ran, failed, unknown = (create_batch_job(client, site.site_id, project="root", queue="debug")["id"] for _ in range(3))
    set_active(client, ran, "running", 2)  # TIMEOUT, in sacct only
    set_active(client, failed, "queued", 8)  # FAILED, squeue still lists it
    set_active(client, unknown, "queued", 777)  # known to neither
    for _ in range(THRESHOLD + 1):
        module.run_cycle()
    assert batch_job(client, failed)["state"] == "finished"  # squeue's record of its end
    for bj, was in ((ran, "running"), (unknown, "queued")):
        record = batch_job(client, bj)
        assert record["state"] == was and record["end_time"] is None
        assert "its history lookup keeps failing" in record["status_info"]["error"]
        assert "Problem talking to the database: Connection refused" in record["status_info"]["error"]

    state["sacct_down"] = False
    module.run_cycle()
    record = batch_job(client, ran)
    assert record["state"] == "finished" and record["status_info"]["scheduler_state"] == "TIMEOUT"
    assert record["start_time"].startswith("2026-11-22T05:42:18") and record["end_time"].startswith("2026-11-22T05:43:18")
    assert "error" not in record["status_info"]  # the outdated lookup note is gone
    for _ in range(THRESHOLD - 1):
        module.run_cycle()
    record = batch_job(client, unknown)
    assert record["state"] == "submit_failed"
    assert "left the queue and has no history record" in record["status_info"]["error"]


def test_a_qstat_x_timeout_is_not_a_missing_record(make_site, client) -> None:
    state = {"timeouts": THRESHOLD + 1}

    def qstat(command: Command) -> CommandResult:
        if "-x" not in command.args:
            return answer(command, recorded("pbs", "qstat_f_json_no_jobs"))
        if state["timeouts"]:
            state["timeouts"] -= 1
            raise SchedulerError("`qstat` did not answer within 60 s")  # what subprocess_runner raises
        return answer(command, recorded("pbs", "qstat_x_f_json"))

    pbs = PBSScheduler(ReplayRunner({"qstat": qstat, "pbsnodes": recorded("pbs", "pbsnodes_a_json")}), user="alice")
    site, module = make_module(make_site, client, pbs, {"prod": {"max_nodes": 10, "max_walltime": 60, "max_queued_jobs": 5}},
                               ["datascience"])
    bj = create_batch_job(client, site.site_id, project="datascience", queue="prod")["id"]
    set_active(client, bj, "queued", 1196250)  # ran and ended between two polls
    for _ in range(THRESHOLD + 1):
        module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "queued" and "did not answer within 60 s" in record["status_info"]["error"]
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "finished" and record["start_time"].startswith("2023-11-21T18:05:00")


# -- 4 and 5. a submission whose answer was lost ----------------------------------------------------


def test_a_cobalt_qsub_whose_job_id_was_lost_is_adopted_not_failed(make_site, client, tmp_path, monkeypatch) -> None:
    """qsub (the fake Cobalt, real processes) accepted the job but its id line was lost: a permanent
    refusal made the BatchJob submit_failed and dropped the marker while the job ran. Now the next
    cycle finds the job in the .cobaltlog qsub wrote, and tracks it; no second job."""
    for key, value in fake_batch_env(TESTS / "fixtures" / "fake_cobalt", tmp_path / "server").items():
        monkeypatch.setenv(key, value)
    lost = {"qsub": 1}

    def runner(command: Command) -> CommandResult:
        result = subprocess_runner(command)
        if command.args[0] == "qsub" and lost["qsub"]:
            lost["qsub"] -= 1
            return CommandResult(result.args, result.returncode, recorded("cobalt", "qsub_no_jobid").stdout, result.stderr)
        return result

    cobalt = CobaltScheduler(runner)
    site, module = make_module(make_site, client, cobalt, {"debug": {"max_nodes": 1, "max_walltime": 30, "max_queued_jobs": 5}},
                               ["proj"])
    bj = create_batch_job(client, site.site_id, project="proj", queue="debug")["id"]
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "pending_submission"
    assert "submit failed (attempt 1, will retry): qsub printed no job id: Job routed to queue" in record["status_info"]["error"]
    module.run_cycle()
    record = batch_job(client, bj)
    in_queue = cobalt.get_statuses()
    assert record["state"] in ("queued", "running") and list(in_queue) == [record["scheduler_id"]]

    client.patch("/batch-jobs/", json=[{"id": bj, "state": "pending_deletion"}])
    wait_for(lambda: module.run_cycle() or batch_job(client, bj)["state"] == "finished", timeout=60,
             what="the deleted job's end")
    assert not cobalt.get_statuses()


def test_cancelling_a_batch_job_whose_submission_was_never_answered_deletes_its_job(make_site, client) -> None:
    """sbatch's reply was lost (Socket timed out) after Slurm queued the job, then the user cancels
    the BatchJob: it used to be finished at once, its job left running unwatched. Now the job is
    looked up (by name and script) and cancelled first; while the lookup fails, the BatchJob waits."""
    jobs: dict[int, str] = {}
    state = {"find_down": True}

    def sbatch(command: Command) -> CommandResult:
        jobs[6001] = "PENDING"  # queued; the reply never came
        return answer(command, recorded("slurm", "synthetic_sbatch_timeout"))

    def squeue(command: Command) -> CommandResult:
        if "--name" in command.args:
            if state["find_down"]:
                return answer(command, recorded("slurm", "synthetic_squeue_controller_down"))
            script = module.script_path(bj)
            return CommandResult(tuple(command.args), 0, "".join(f"{i}|{script}\n" for i in jobs), "")
        assert command.args[-1] == SQUEUE_FORMAT
        rows = "".join(f"{i}|{s}|debug|1|5:00|root|5:00|2026-12-04T03:54:55|N/A|2026-12-04T03:55:02|None\n"
                       for i, s in jobs.items())
        return CommandResult(tuple(command.args), 0, rows, "")

    def scancel(command: Command) -> CommandResult:
        jobs[int(command.args[-1])] = "CANCELLED"
        return CommandResult(tuple(command.args), 0, "", "")

    sacct = CommandResult(("sacct",), 0, "6001|CANCELLED by 0|2026-12-04T03:54:55|None|2026-12-04T03:55:02|0:0|None\n", "")
    runner = ReplayRunner({"sbatch": sbatch, "squeue": squeue, "scancel": scancel, "sacct": sacct,
                           "sinfo": recorded("slurm", "sinfo_backfill")})
    slurm = SlurmScheduler(runner, user="root")
    site, module = make_module(make_site, client, slurm, {"debug": {"max_nodes": 8, "max_walltime": 30, "max_queued_jobs": 5}},
                               ["root"])
    bj = create_batch_job(client, site.site_id, project="root", queue="debug")["id"]
    module.run_cycle()
    assert batch_job(client, bj)["state"] == "pending_submission" and jobs == {6001: "PENDING"}

    client.patch("/batch-jobs/", json=[{"id": bj, "state": "pending_deletion"}])
    module.run_cycle()  # the lookup fails: nothing is decided
    record = batch_job(client, bj)
    assert record["state"] == "pending_deletion" and "Unable to contact slurm controller" in record["status_info"]["waiting"]
    assert jobs == {6001: "PENDING"}

    state["find_down"] = False
    module.run_cycle()  # found and cancelled, then followed like any deletion
    assert jobs == {6001: "CANCELLED"} and batch_job(client, bj)["scheduler_id"] == 6001
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "finished" and record["status_info"]["scheduler_state"] == "CANCELLED by 0"
    assert "waiting" not in record["status_info"]
    assert [c.args[0] for c in runner.calls].count("sbatch") == 1


def test_cancelling_when_the_scheduler_cannot_look_the_submission_up_says_so(make_site, client) -> None:
    """Cobalt's qsub timed out before writing a .cobaltlog: whether a job exists cannot be told.
    The BatchJob is finished (nothing to follow) with an error saying a job may be left."""
    def qsub(command: Command) -> CommandResult:
        raise SchedulerError("`qsub` did not answer within 60 s")

    cobalt = CobaltScheduler(ReplayRunner({"qsub": qsub, "qstat": recorded("cobalt", "qstat_header"),
                                           "nodelist": recorded("cobalt", "nodelist")}), user="alice")
    site, module = make_module(make_site, client, cobalt, {"default": {"max_nodes": 128, "max_walltime": 60,
                                                                       "max_queued_jobs": 5}}, ["datascience"])
    bj = create_batch_job(client, site.site_id, project="datascience", queue="default")["id"]
    module.run_cycle()
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "pending_deletion"}])
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "finished"
    assert record["status_info"]["error"] == (
        f"an earlier submit command of qlaunch{bj:05d} ended without an answer and the cobalt scheduler cannot look "
        f"jobs up by name: a job qlaunch{bj:05d} may be left in its queue (delete it by hand)")


# -- 6. garbage from Cobalt's qstat -----------------------------------------------------------------


def test_a_cobalt_poll_with_nothing_readable_is_a_failed_poll(make_site, client) -> None:
    """Only unreadable lines under qstat's header used to read as an empty queue: queued BatchJobs
    became submit_failed after three polls while their jobs waited."""
    cobalt = CobaltScheduler(ReplayRunner({"qstat": recorded("cobalt", "qstat_nothing_readable"),
                                           "nodelist": recorded("cobalt", "nodelist")}), user="alice")
    site, module = make_module(make_site, client, cobalt, {"debug-cache-quad": {"max_nodes": 8, "max_walltime": 60,
                                                                                "max_queued_jobs": 5}}, ["datascience"])
    bj = create_batch_job(client, site.site_id, project="datascience", queue="debug-cache-quad", num_nodes=8)["id"]
    set_active(client, bj, "queued", 498131)
    for _ in range(THRESHOLD + 1):
        module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "queued"
    assert "scheduler status unavailable" in record["status_info"]["scheduler_status_error"]
    assert "qstat printed nothing readable" in record["status_info"]["scheduler_status_error"]

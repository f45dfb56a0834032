"""Faults found running a Cobalt (Theta) site end to end, and their PBS/Slurm counterparts.

- An empty status poll (qstat printing nothing for a while) ended a running allocation: the
  job's history (the .cobaltlog with a start and no end; qstat -x / sacct saying R or RUNNING) was
  read as "no record", the BatchJob was finished after three cycles and its launcher's credential
  revoked mid-run. A history that says "still active" now keeps the BatchJob, until the job is past
  its wall time (plus a grace), when a record that never ends counts as none.
- A Cobalt job in dep_fail stayed in the queue (holding a max_queued_jobs place) and its BatchJob
  ended "left the queue and has no history record" three cycles later: it is deleted, and the
  BatchJob is submit_failed with Cobalt's word at once.
- A finished BatchJob kept the scheduler_reason of its queued days.
- A missing backfill command (`nodelist`) logged the same warning every cycle.
- `site init` for a Theta platform wrote the platform's placeholder project over the projects
  Cobalt listed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import yaml

from balsam.scheduler import Command, CommandResult
from balsam.site.modules.scheduler import ACTIVE_RECORD_GRACE_MIN, SchedulerModule
from balsam.testing.fakebatch import fake_batch_env
from balsam.testing.replay import ReplayRunner, load_recorded
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler
from site_test_utils import batch_job, create_batch_job

TESTS = Path(__file__).resolve().parents[1]
DATA = TESTS / "schedulers" / "data"
THRESHOLD = 3
QUEUES = {"default": {"max_nodes": 128, "max_walltime": 60, "max_queued_jobs": 5}}
EMPTY = CommandResult(("cmd",), 0, "", "")


def make_module(make_site, client, scheduler, projects: list):
    site = make_site(overrides={"scheduler": {"allowed_queues": QUEUES, "allowed_projects": projects}})
    Path(site.job_template_path).write_text("#!/bin/bash\n")
    return site, SchedulerModule(site, site.settings.scheduler, client, scheduler=scheduler)


def running_batch_job(client, site_id: int, scheduler_id: int, *, project: str, wall_time_min: int = 60) -> int:
    bj = create_batch_job(client, site_id, project=project, queue="default", wall_time_min=wall_time_min)["id"]
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "queued", "scheduler_id": scheduler_id}])
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "running"}])
    return bj


def cobaltlog_started(scheduler_id: int, started: dt.datetime) -> str:
    stamp = started.strftime("%a %b %d %H:%M:%S %Y")
    return (f"Jobid: {scheduler_id}\n{stamp} +0000 (UTC) submitted with cwd set to: /home/alice/site/qsubmit\n"
            f"{stamp} +0000 (UTC) Info: Starting job {scheduler_id} on partition 3824-3951 with "
            f"COBALT_STARTTIME={int(started.timestamp())}\n")


def test_an_empty_qstat_does_not_end_a_cobalt_job_whose_log_says_it_runs(make_site, client) -> None:
    runner = ReplayRunner({"qstat": EMPTY, "nodelist": EMPTY})
    site, module = make_module(make_site, client, CobaltScheduler(runner, user="alice"), ["datascience"])
    now = dt.datetime.now(dt.timezone.utc)
    live = running_batch_job(client, site.site_id, 498110, project="datascience")
    stale = running_batch_job(client, site.site_id, 498111, project="datascience", wall_time_min=30)
    module.script_path(live).with_suffix(".cobaltlog").write_text(cobaltlog_started(498110, now - dt.timedelta(minutes=5)))
    # Started longer ago than its wall time and the grace: the end line never came (Cobalt lost it).
    long_ago = now - dt.timedelta(minutes=30 + ACTIVE_RECORD_GRACE_MIN + 5)
    module.script_path(stale).with_suffix(".cobaltlog").write_text(cobaltlog_started(498111, long_ago))
    for _ in range(THRESHOLD + 1):
        module.run_cycle()
    record = batch_job(client, live)
    assert record["state"] == "running" and "error" not in record["status_info"], record
    ended = batch_job(client, stale)
    assert ended["state"] == "finished"
    assert ended["status_info"]["error"] == "scheduler job 498111 left the queue and has no history record"


def test_a_queued_cobalt_job_missed_by_qstat_but_started_in_its_log_becomes_running(make_site, client) -> None:
    runner = ReplayRunner({"qstat": EMPTY, "nodelist": EMPTY})
    site, module = make_module(make_site, client, CobaltScheduler(runner, user="alice"), ["datascience"])
    bj = create_batch_job(client, site.site_id, project="datascience", queue="default")["id"]
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "queued", "scheduler_id": 498120}])
    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(minutes=2)
    module.script_path(bj).with_suffix(".cobaltlog").write_text(cobaltlog_started(498120, started))
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "running"
    assert record["start_time"].startswith(started.strftime("%Y-%m-%dT%H:%M:%S"))  # the log's, not the poll's


def test_a_pbs_record_still_running_in_qstat_x_is_not_a_missing_job(make_site, client) -> None:
    """qstat -f printed nothing of ours (an outage of the listing) while qstat -x still says R."""
    running = {"Jobs": {"1196243.polaris-pbs-01": {"Job_Name": "qlaunch1", "Job_Owner": "alice@polaris-login-01",
                                                    "job_state": "R", "queue": "default",
                                                    "stime": dt.datetime.now().strftime("%a %b %d %H:%M:%S %Y")}}}
    runner = ReplayRunner({"qstat": lambda c: (CommandResult(tuple(c.args), 0, json.dumps(running), "") if "-x" in c.args
                                               else CommandResult(tuple(c.args), 0, '{"Jobs": {}}', "")),
                           "pbsnodes": CommandResult(("pbsnodes",), 0, '{"nodes": {}}', "")})
    site, module = make_module(make_site, client, PBSScheduler(runner, user="alice"), ["datascience"])
    bj = running_batch_job(client, site.site_id, 1196243, project="datascience")
    for _ in range(THRESHOLD + 1):
        module.run_cycle()
    assert batch_job(client, bj)["state"] == "running"


def test_a_slurm_job_sacct_still_shows_running_is_not_a_missing_job(make_site, client) -> None:
    start = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    sacct = CommandResult(("sacct",), 0, f"4242|RUNNING|{start}|{start}|Unknown|0:0|None\n", "")
    runner = ReplayRunner({"squeue": EMPTY, "sacct": sacct, "sinfo": EMPTY})
    site, module = make_module(make_site, client, SlurmScheduler(runner, user="root"), ["root"])
    bj = running_batch_job(client, site.site_id, 4242, project="root")
    for _ in range(THRESHOLD + 1):
        module.run_cycle()
    assert batch_job(client, bj)["state"] == "running"


def test_a_dep_fail_cobalt_job_is_deleted_and_its_batch_job_fails_at_once(make_site, client) -> None:
    listing = ("JobID   State     WallTime  Queue    Nodes  Project      TimeRemaining  QueuedTime  \n"
               "=======================================================================================\n"
               "498106  dep_fail  00:30:00  default  8      datascience  N/A            00:02:10    \n")
    deleted: list[tuple] = []

    def qdel(command: Command) -> CommandResult:
        deleted.append(command.args)
        return load_recorded(DATA / "cobalt", "qdel_ok")

    runner = ReplayRunner({"qstat": CommandResult(("qstat",), 0, listing, ""), "qdel": qdel, "nodelist": EMPTY})
    site, module = make_module(make_site, client, CobaltScheduler(runner, user="alice"), ["datascience"])
    bj = create_batch_job(client, site.site_id, project="datascience", queue="default")["id"]
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "queued", "scheduler_id": 498106,
                                        "status_info": {"scheduler_reason": "user_hold"}}])
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "submit_failed"
    assert record["status_info"]["error"] == "the scheduler will never run job 498106 (dep_fail): deleted it"
    assert "scheduler_reason" not in record["status_info"]
    assert [args[-1] for args in deleted] == ["498106"]


def test_a_finished_batch_job_keeps_no_scheduler_reason(make_site, client, tmp_path, monkeypatch) -> None:
    sacct = load_recorded(DATA / "slurm", "sacct_history")
    first = sacct.stdout.splitlines()[0].split("|")[0]
    runner = ReplayRunner({"squeue": EMPTY, "sacct": sacct, "sinfo": EMPTY})
    site, module = make_module(make_site, client, SlurmScheduler(runner, user="root"), ["root"])
    bj = create_batch_job(client, site.site_id, project="root", queue="default")["id"]
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "queued", "scheduler_id": int(first),
                                        "status_info": {"scheduler_reason": "Priority"}}])
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] in ("finished", "submit_failed") and "scheduler_reason" not in record["status_info"]


def test_a_missing_backfill_command_is_warned_once(make_site, client, caplog) -> None:
    runner = ReplayRunner({"qstat": EMPTY})  # no nodelist: "`nodelist` was not found on PATH"
    site, module = make_module(make_site, client, CobaltScheduler(runner, user="alice"), ["datascience"])
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            module.run_cycle()
    warnings = [r for r in caplog.records if "backfill windows unavailable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_theta_site_init_takes_the_projects_cobalt_lists(balsam_env, client, tmp_path, monkeypatch) -> None:
    from balsam.site.site_ops import init_site

    for key, value in fake_batch_env(TESTS / "fixtures" / "fake_cobalt", tmp_path / "server",
                                     FAKE_COBALT_PROJECTS="catalyst,Other").items():
        monkeypatch.setenv(key, value)
    init_site(tmp_path / "knl", "knl", "theta-knl", client)
    settings = yaml.safe_load((tmp_path / "knl" / "settings.yml").read_text())
    assert settings["scheduler"]["allowed_projects"] == ["catalyst", "Other"]

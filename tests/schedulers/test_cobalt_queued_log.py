"""A Cobalt job that waits in the queue is not declared failed when ``qstat`` misses it.

Before: ``parse_cobaltlog`` answered None ("no record") for a ``.cobaltlog`` holding qsub's dated
"submitted with cwd set to" line and neither a start nor an end, i.e. a job still waiting. Three
empty or cut ``qstat`` polls (~30 s at sync_period 10) then made the BatchJob ``submit_failed``
("left the queue and has no history record"); Cobalt went on to start the job, whose launcher ran
jobs balsam no longer tracked, ``balsam queue term`` refused the BatchJob (submit_failed), and the
elastic queue submitted another. Now the log reads as "still queued" and the agent keeps the
BatchJob queued (bounded by its wall time plus ACTIVE_RECORD_GRACE_MIN, as a running record is).

Also: a queued job deleted by ``qdel`` (cqm writes "user delete requested; removing job from the
queue") still ends, and a job ``qstat`` lists as ``dep_fail`` is still deleted at once whatever its
log says. Real server and site (make_site), the fake Cobalt's own qsub for the log it writes.
"""

from __future__ import annotations

import datetime as dt
import getpass
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from balsam.scheduler import Command, CommandResult, SubmitRequest
from balsam.site.modules.scheduler import SchedulerModule
from balsam.states import BatchJobState
from balsam.testing.replay import ReplayRunner, load_recorded
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_cobalt.scheduler import parse_cobaltlog

from fake_env import ended, fake_batch_env, wait_for
from sched_helpers import DATA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "site"))
from site_test_utils import FAST_SETTINGS, api_client, batch_job, create_batch_job  # noqa: E402

THRESHOLD = 3
QUEUES = {"default": {"max_nodes": 128, "max_walltime": 60, "max_queued_jobs": 5}}
EMPTY = CommandResult(("cmd",), 0, "", "")


def queued_log(scheduler_id: int = 498110, cwd: str = "/home/alice/site/qsubmit") -> str:
    """The recorded qlaunch00012.cobaltlog up to qsub's lines: what the log holds while the job waits."""
    lines = (DATA / "cobalt" / "qlaunch00012.cobaltlog").read_text().splitlines(True)
    head = [ln.replace("498110", str(scheduler_id)).replace("/home/alice/site/qsubmit", cwd) for ln in lines
            if "Starting job" not in ln and "launching script" not in ln and "task completed" not in ln]
    assert any("submitted with cwd set to" in ln for ln in head)
    return "".join(head)


# -- the driver ----------------------------------------------------------------------------------


def test_a_log_with_only_the_submitted_line_is_a_queued_history(tmp_path) -> None:
    cobalt = CobaltScheduler(user="alice")
    script = tmp_path / "qlaunch00012.sh"
    script.with_suffix(".cobaltlog").write_text(queued_log())
    history = cobalt.get_history(498110, script)
    assert history is not None and history.state is BatchJobState.queued, history
    assert history.native_state == "queued" and history.start_time is None and history.end_time is None
    # The directory the submitted line names may hold an end word: still queued.
    assert parse_cobaltlog(queued_log(cwd="/home/alice/failed_runs/qsubmit"), 498110).state is BatchJobState.queued
    # No dated line at all (qsub's header only): not known yet, as before.
    assert parse_cobaltlog("Jobid: 498110\nqsub -O x -n 1 -t 5 x.sh\n", 498110) is None


def test_a_queued_job_deleted_with_qdel_ends(tmp_path) -> None:
    """cqm's words for a queued or held job deleted by its user (``_sm_ready__kill``)."""
    log = queued_log() + "Tue Nov 21 17:45:00 2023 +0000 (UTC) Info: user delete requested; removing job from the queue\n"
    history = parse_cobaltlog(log, 498110)
    assert history.state is BatchJobState.finished and history.start_time is None
    assert history.end_time == dt.datetime(2023, 11, 21, 17, 45, tzinfo=dt.timezone.utc)


def test_the_log_the_fake_qsub_writes_reads_queued_until_deleted(tmp_path, monkeypatch) -> None:
    for key, value in fake_batch_env("fake_cobalt", tmp_path / "server", FAKE_BATCH_START_DELAY_SEC="3600").items():
        monkeypatch.setenv(key, value)
    cobalt = CobaltScheduler(user=getpass.getuser())
    script = tmp_path / "qsubmit" / "qlaunch00001.sh"
    script.parent.mkdir()
    script.write_text("#!/bin/bash\ntrue\n")
    script.chmod(0o755)
    jobid = cobalt.submit(SubmitRequest(script_path=script, project="proj", queue="debug", num_nodes=1, wall_time_min=5))
    try:
        history = cobalt.get_history(jobid, script)
        assert history is not None and history.state is BatchJobState.queued, script.with_suffix(".cobaltlog").read_text()
    finally:
        cobalt.delete_job(jobid)  # ends the fake's runner process
    gone = wait_for(lambda: ended(cobalt.get_history(jobid, script)), 20, "the deletion in the log")
    assert gone.state is BatchJobState.finished and gone.start_time is None


# -- the agent's scheduler module ----------------------------------------------------------------


@pytest.fixture
def client(balsam_env: Any) -> Any:
    from balsam._api.model import reset_default_client

    reset_default_client()
    return api_client()


@pytest.fixture
def make_site(balsam_env: Any, client: Any, tmp_path: Path) -> Callable[..., Any]:
    from balsam.config import SiteConfig
    from balsam.site.site_ops import deep_merge, init_site

    def make(overrides: dict) -> Any:
        name = f"site-{uuid.uuid4().hex[:8]}"
        init_site(tmp_path / name, name, "default", client, settings_overrides=deep_merge(FAST_SETTINGS, overrides))
        return SiteConfig(tmp_path / name)

    return make


def make_module(make_site, client, runner) -> tuple[Any, SchedulerModule]:
    site = make_site({"scheduler": {"allowed_queues": QUEUES, "allowed_projects": ["datascience"]}})
    Path(site.job_template_path).write_text("#!/bin/bash\n")
    return site, SchedulerModule(site, site.settings.scheduler, client, scheduler=CobaltScheduler(runner, user="alice"))


def queued_batch_job(client, site_id: int, scheduler_id: int, **fields: Any) -> int:
    bj = create_batch_job(client, site_id, project="datascience", queue="default", **fields)["id"]
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "queued", "scheduler_id": scheduler_id}])
    return bj


def test_an_empty_qstat_keeps_a_queued_cobalt_job_queued(make_site, client) -> None:
    site, module = make_module(make_site, client, ReplayRunner({"qstat": EMPTY, "nodelist": EMPTY}))
    bj = queued_batch_job(client, site.site_id, 498110)
    module.script_path(bj).with_suffix(".cobaltlog").write_text(queued_log())
    for _ in range(THRESHOLD + 2):
        module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "queued" and "error" not in record["status_info"], record
    # Cobalt starts it (qstat still empty): the log's start makes it running, as before.
    log = module.script_path(bj).with_suffix(".cobaltlog")
    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(minutes=1)
    log.write_text(log.read_text() + started.strftime("%a %b %d %H:%M:%S %Y") + " +0000 (UTC) Info: Starting job "
                   f"498110 on partition 3824-3825 with COBALT_STARTTIME={int(started.timestamp())}\n")
    module.run_cycle()
    assert batch_job(client, bj)["state"] == "running"


def test_a_queued_cobalt_job_deleted_while_qstat_is_empty_ends(make_site, client) -> None:
    site, module = make_module(make_site, client, ReplayRunner({"qstat": EMPTY, "nodelist": EMPTY}))
    bj = queued_batch_job(client, site.site_id, 498111)
    log = module.script_path(bj).with_suffix(".cobaltlog")
    log.write_text(queued_log(498111) + dt.datetime.now(dt.timezone.utc).strftime("%a %b %d %H:%M:%S %Y")
                   + " +0000 (UTC) Info: user delete requested; removing job from the queue\n")
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "pending_deletion"}])
    module.run_cycle()
    assert batch_job(client, bj)["state"] == "finished"


def test_a_dep_fail_job_with_a_submitted_only_log_is_still_deleted(make_site, client) -> None:
    listing = ("JobID   State     WallTime  Queue    Nodes  Project      TimeRemaining  QueuedTime  \n"
               "=======================================================================================\n"
               "498106  dep_fail  00:30:00  default  8      datascience  N/A            00:02:10    \n")
    deleted: list[tuple] = []

    def qdel(command: Command) -> CommandResult:
        deleted.append(command.args)
        return load_recorded(DATA / "cobalt", "qdel_ok")

    runner = ReplayRunner({"qstat": CommandResult(("qstat",), 0, listing, ""), "qdel": qdel, "nodelist": EMPTY})
    site, module = make_module(make_site, client, runner)
    bj = queued_batch_job(client, site.site_id, 498106)
    module.script_path(bj).with_suffix(".cobaltlog").write_text(queued_log(498106))
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "submit_failed", record
    assert record["status_info"]["error"] == "the scheduler will never run job 498106 (dep_fail): deleted it"
    assert [args[-1] for args in deleted] == ["498106"]


def test_a_queued_log_is_bounded_by_the_wall_time(make_site, client, monkeypatch) -> None:
    """A log that never gets a start or an end (Cobalt lost the job) holds the BatchJob no longer
    than its wall time plus the grace after the poll first missed it."""
    from balsam.site.modules import scheduler as module_code

    site, module = make_module(make_site, client, ReplayRunner({"qstat": EMPTY, "nodelist": EMPTY}))
    bj = queued_batch_job(client, site.site_id, 498112, wall_time_min=10)
    module.script_path(bj).with_suffix(".cobaltlog").write_text(queued_log(498112))
    module.run_cycle()
    assert batch_job(client, bj)["state"] == "queued"
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=10 + module_code.ACTIVE_RECORD_GRACE_MIN + 1)
    monkeypatch.setattr(module_code, "utcnow", lambda: later)
    for _ in range(THRESHOLD):
        module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "submit_failed"
    assert record["status_info"]["error"] == "scheduler job 498112 left the queue and has no history record"


def test_a_queued_job_we_deleted_ends_before_its_log_says_so(make_site, client) -> None:
    """qdel answered and qstat no longer lists the job, but its .cobaltlog holds only qsub's
    "submitted" line (cqm's delete line not written or not visible yet: file-system lag). Before:
    the queued record kept the pending_deletion BatchJob for its wall time + ACTIVE_RECORD_GRACE_MIN.
    Now a job we deleted ourselves with a waiting, never-started record ends at once."""
    site, module = make_module(make_site, client, ReplayRunner({"qstat": EMPTY, "nodelist": EMPTY}))
    bj = queued_batch_job(client, site.site_id, 498113, wall_time_min=60)
    module.script_path(bj).with_suffix(".cobaltlog").write_text(queued_log(498113))
    client.patch("/batch-jobs/", json=[{"id": bj, "state": "pending_deletion"}])
    module.run_cycle()
    record = batch_job(client, bj)
    assert record["state"] == "finished", record
    assert "error" not in record["status_info"], record

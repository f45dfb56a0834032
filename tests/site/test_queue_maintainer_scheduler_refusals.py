"""queue_maintainer when the scheduler refuses its BatchJobs (audit of the allocation side).

The module checks its BatchJobs against the site's own rules (allowed_queues, allowed_projects), not
the scheduler's: a partition the scheduler does not have, or a QOS limit, got a new BatchJob every
``submit_period`` (1,440 submit_failed BatchJobs and sbatch calls a day at 60 s), forever, each
refused alike; while the scheduler was unreachable, one every cycle as well. Now a refusal for good
of its newest BatchJob stops it (one ERROR line, until the agent restarts: settings.yml must change),
and failures without a refusal back off (submit_period doubled per failure in a row, 30 min at most).
"""

from __future__ import annotations

import datetime as dt
import logging

from balsam.scheduler import SchedulerError
from balsam.site.modules.queue_maintainer import QueueMaintainerModule, QueueMaintainerSettings
from balsam.site.modules.scheduler import SchedulerModule
from test_site_scheduler_module import ScriptedScheduler

QUEUES = {"scheduler": {"allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 10}}}}


def _setup(make_site, client):
    site = make_site(overrides=QUEUES)
    fake = ScriptedScheduler()
    scheduler = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    maintainer = QueueMaintainerModule(site, QueueMaintainerSettings(submit_period=60, num_queued_jobs=2,
                                                                     wall_time_min=5), client)
    return site, fake, scheduler, maintainer


def _rows(client, site) -> list[dict]:
    return client.get("/batch-jobs/", params={"site_id": site.site_id, "ordering": "id"})["results"]


def test_a_request_the_scheduler_refuses_is_not_made_again_every_cycle(make_site, client, caplog) -> None:
    site, fake, scheduler, maintainer = _setup(make_site, client)
    with caplog.at_level(logging.ERROR, logger="balsam.site.modules.queue_maintainer"):
        for _ in range(5):
            fake.submit_errors.append(SchedulerError("sbatch: error: invalid partition specified: nope",
                                                     permanent=True))
            maintainer.run_cycle()
            scheduler.run_cycle()
    rows = _rows(client, site)
    assert [r["state"] for r in rows] == ["submit_failed"], [(r["id"], r["state"]) for r in rows]  # was 5
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "invalid partition" in errors[0] and "restart the agent" in errors[0], errors
    # A restart (settings.yml fixed) lifts it.
    fake.submit_errors.clear()
    QueueMaintainerModule(site, maintainer.options, client).run_cycle()
    scheduler.run_cycle()
    assert [r["state"] for r in _rows(client, site)] == ["submit_failed", "queued"]


def test_submissions_that_keep_failing_back_off(make_site, client) -> None:
    site, fake, scheduler, maintainer = _setup(make_site, client)
    for _ in range(2):  # the scheduler module's two tries (ScriptedScheduler: threshold 2)
        fake.submit_errors.append(SchedulerError("sbatch: error: Unable to contact slurm controller"))
    maintainer.run_cycle()
    scheduler.run_cycle()
    scheduler.run_cycle()
    assert [r["state"] for r in _rows(client, site)] == ["submit_failed"]
    for _ in range(3):
        maintainer.run_cycle()  # within submit_period of the failure: nothing new
    assert len(_rows(client, site)) == 1
    # Once the wait has passed, it tries again.
    [failed] = _rows(client, site)
    old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=61)).isoformat()
    client.patch("/batch-jobs/", json=[{"id": failed["id"], "status_info": {**failed["status_info"], "error_time": old}}])
    maintainer.run_cycle()
    scheduler.run_cycle()
    assert [r["state"] for r in _rows(client, site)] == ["submit_failed", "queued"]


def test_a_refusal_of_the_previous_agents_request_does_not_hold_the_fixed_one(make_site, client, caplog) -> None:
    """Held only by a refusal of a BatchJob this agent posted: the previous agent (settings.yml
    asking for 4 nodes) posted one and stopped; the restarted agent (settings.yml fixed: 2 nodes)
    submitted that old request, refused for good after the restart. It was compared by time
    (refused after this start), so the fixed request was never posted until the next restart."""
    site = make_site(overrides=QUEUES)
    fake = ScriptedScheduler()
    scheduler = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    old = QueueMaintainerModule(site, QueueMaintainerSettings(submit_period=60, num_queued_jobs=1, num_nodes=4,
                                                              wall_time_min=5), client)
    old.run_cycle()  # posts a 4-node BatchJob; the agent stops before its scheduler module submits it
    new = QueueMaintainerModule(site, QueueMaintainerSettings(submit_period=60, num_queued_jobs=1, num_nodes=2,
                                                              wall_time_min=5), client)
    fake.submit_errors.append(SchedulerError("sbatch: error: QOSMaxNodePerJobLimit", permanent=True))
    scheduler.run_cycle()  # the new agent's scheduler module submits the old request: refused for good
    with caplog.at_level(logging.ERROR, logger="balsam.site.modules.queue_maintainer"):
        new.run_cycle()
        scheduler.run_cycle()
    assert [(r["num_nodes"], r["state"]) for r in _rows(client, site)] == [(4, "submit_failed"), (2, "queued")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # Its own request refused for good still holds it (one ERROR line, no new BatchJob).
    fake.submit_errors.append(SchedulerError("sbatch: error: QOSMaxNodePerJobLimit", permanent=True))
    [queued] = [r for r in _rows(client, site) if r["state"] == "queued"]
    client.patch("/batch-jobs/", json=[{"id": queued["id"], "state": "finished"}])
    with caplog.at_level(logging.ERROR, logger="balsam.site.modules.queue_maintainer"):
        for _ in range(3):
            new.run_cycle()
            scheduler.run_cycle()
    assert [(r["num_nodes"], r["state"]) for r in _rows(client, site)][2:] == [(2, "submit_failed")]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "QOSMaxNodePerJobLimit" in errors[0], errors

"""Jobs are counted as runnable only if a launcher in one of the elastic queue's BatchJobs leases
them. Its batch script starts it with ``-t`` 2 minutes less than the BatchJob (the job template's
``launcher_wall_time_min``), and it offers the whole minutes left of that before its own safety
margin (``balsam.launcher.job_mode.Countdown``: at most 2 minutes): 25 minutes in a 30-minute
BatchJob. The module counted jobs up to 29 minutes and fitted windows one minute longer than the
shortest job: on the CI's real Slurm, 2 jobs of 28 minutes with ``max_wall_time_min: 30`` got 13
BatchJobs of 2 nodes x 30 min in 75 s (``service_period: 2``, ``idle_ttl_sec: 1``), 2 jobs of 27
minutes 6 in 40 s; each leased nothing and left ("0 started"), and the jobs stayed PREPROCESSED,
with no word why."""

from __future__ import annotations

import logging

from balsam.launcher.job_mode import Countdown, longest_offered_min
from balsam.models import BackfillWindow
from balsam.site.job_template import launcher_wall_time
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import Windows, batch_jobs_of, runnable_jobs

LOGGER = "balsam.site.modules.elastic_queue"


def _acquire(client, site, max_wall_time_min: int) -> list:
    """What a launcher's acquire with that offer leases (the server's lease filter)."""
    session = client.post("/sessions/", json={"site_id": site.site_id})["id"]
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": 100, "max_wall_time_min": max_wall_time_min})
    return got if isinstance(got, list) else got["results"]


def _launcher_offer(wall_time_min: int) -> int:
    """The most a real launcher in a BatchJob of that wall time ever offers: its batch script's
    ``-t`` and its own countdown (the core's functions; "stop in 1559 s" for ``-t 28`` on Slurm)."""
    return longest_offered_min(Countdown(launcher_wall_time(wall_time_min)))


def _module(site, client, scheduler, **options):
    return ElasticQueueModule(site, {"submit_queue": "debug", "job_mode": "serial", "max_num_nodes": 4,
                                     "min_wall_time_min": 10, "wall_time_pad_min": 2, **options}, client,
                              scheduler=scheduler)


SETTINGS = {"scheduler": {"allowed_queues": {"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 5}}}}


def test_jobs_longer_than_the_launchers_offer_get_no_batch_job(make_site, client, caplog) -> None:
    site = make_site(overrides=SETTINGS)
    caplog.set_level(logging.INFO, logger=LOGGER)
    module = _module(site, client, Windows(BackfillWindow(num_nodes=4, wall_time_min=1440)), max_wall_time_min=30)
    runnable_jobs(client, site, 2, wall_time_min=28)
    module.run_cycle()
    made = batch_jobs_of(client, site)
    # Before: one 30-minute BatchJob, whose launcher (offering 25 minutes) leased neither job.
    assert made == [], (made, _acquire(client, site, _launcher_offer(made[0]["wall_time_min"])) if made else None)
    errors = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert errors == ["runnable jobs its BatchJobs can never run: wall_time_min of more than 25, and its BatchJobs "
                      "last at most 30 min (a launcher leases only jobs that end before its safety margin: 25 min in "
                      "a 30-min BatchJob)"], errors
    # Jobs the launcher's offer covers are counted, and the BatchJob made for them leases them.
    runnable_jobs(client, site, 2, wall_time_min=25)
    module.run_cycle()
    [made] = batch_jobs_of(client, site)
    assert made["wall_time_min"] == 30 and dict(module.last_decision.numbers)["runnable"] == 2, module.last_decision
    assert len(_acquire(client, site, _launcher_offer(30))) == 2


def test_a_window_too_short_for_the_launchers_margin_is_not_used(make_site, client) -> None:
    """A 34-minute window gives a 32-minute BatchJob (pad 2), which leases jobs of 27 minutes at
    most: for the shortest job of 28 minutes such a window was chosen (from 28 + 1 + pad on), and
    its BatchJob ran nothing, every cycle. A 35-minute window gives 33 minutes, whose launcher
    leases 28."""
    site = make_site(overrides=SETTINGS)
    scheduler = Windows(BackfillWindow(num_nodes=4, wall_time_min=34))
    module = _module(site, client, scheduler, max_wall_time_min=60)
    runnable_jobs(client, site, 2, wall_time_min=28)
    module.run_cycle()
    assert batch_jobs_of(client, site) == [], batch_jobs_of(client, site)
    assert module.last_decision.reason.startswith(
        "no backfill window fits (need >= 1 nodes x >= 35 min; the shortest runnable job needs 28 min, which a "
        "BatchJob of 33 min or more leases"), module.last_decision
    scheduler.windows = [BackfillWindow(num_nodes=4, wall_time_min=35)]
    module.run_cycle()
    [made] = batch_jobs_of(client, site)
    assert made["wall_time_min"] == 33 and len(_acquire(client, site, _launcher_offer(33))) == 2, made

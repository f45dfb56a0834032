"""The module counts a job as runnable only if a launcher in one of its BatchJobs leases it
(``balsam_elastic.strategy.leased_up_to_min``). It counted what the launcher's first acquire offers
at the very start of the batch script, but an acquire offers the whole minutes left when it asks:
under 22 minutes the offer dropped a minute after 6 to 54 s of start-up (module loads, Python
imports, the launcher's own start). With real launchers: a 17-minute job in a 21-minute BatchJob
stayed PREPROCESSED after a 7 s start-up (offered 16), a 7-minute job in a 10-minute one after 13 s;
each cycle then requested a BatchJob that leased nothing. The count now allows a minute of start-up
at every length (the same count as before from 22 minutes on)."""

from __future__ import annotations

import logging
import time

from balsam.launcher.job_mode import StopConditions
from balsam.launcher.service_calls import open_lease
from balsam.models import BackfillWindow
from balsam.site.job_template import launcher_wall_time
from balsam_elastic.module import ElasticQueueModule
from balsam_elastic.strategy import leased_up_to_min, request_min_for
from elastic_test_utils import Windows, batch_jobs_of, runnable_jobs

LOGGER = "balsam.site.modules.elastic_queue"
#: A launcher's first acquire this long after its batch script started (the job template's
#: $BALSAM_LAUNCHER_START_TIME): within the minute allowed, with room for the test's own run time.
START_UP_SEC = 55


def test_counted_job_lengths_allow_a_minute_of_start_up() -> None:
    # BatchJob minutes -> longest job counted: before, 10 -> 7, 11 -> 8, 20 -> 16, 21 -> 17 (6 to 12 s
    # of start-up); unchanged from 22 minutes on (wall_time_min - 5).
    expected = {4: 1, 10: 6, 11: 7, 12: 8, 13: 8, 20: 15, 21: 16, 22: 17, 30: 25, 360: 355}
    assert {w: leased_up_to_min(w) for w in expected} == expected
    # The shortest BatchJob that leases a job of so many minutes.
    assert {j: request_min_for(j) for j in (1, 7, 8, 16, 17, 25, 120)} == {1: 4, 7: 11, 8: 12, 16: 21, 17: 22, 25: 30,
                                                                            120: 125}


def _launcher_acquire(site_id: int, batch_job_id, batch_min: int, tags: dict) -> list:
    """What a launcher of a ``batch_min``-minute BatchJob leases with its first acquire, made
    :data:`START_UP_SEC` after its batch script started: the launcher's own lease (``open_lease``)
    and countdown (``-t`` from the job template, the script's start time), asking its minutes left."""
    stop = StopConditions.for_launcher(launcher_wall_time(batch_min), start_time=time.time() - START_UP_SEC,
                                       idle_ttl_sec=10)
    lease = open_lease(site_id, batch_job_id, tags)
    try:
        return lease.acquire(100, max_wall_time_min=stop.countdown.remaining_min())
    finally:
        lease.close()


def test_a_launcher_leases_the_longest_job_counted_after_its_start_up(make_site, client) -> None:
    site = make_site()
    lengths = (10, 11, 20, 21, 30)
    for batch_min in lengths:
        runnable_jobs(client, site, 1, wall_time_min=leased_up_to_min(batch_min), tags={"batch_min": str(batch_min)})
    leased = {w: [j.wall_time_min for j in _launcher_acquire(site.site_id, None, w, {"batch_min": str(w)})]
              for w in lengths}
    # Before: 10 -> [], 11 -> [], 20 -> [], 21 -> [] (jobs of 7, 8, 16 and 17 min offered 6, 7, 15 and 16).
    assert leased == {10: [6], 11: [7], 20: [15], 21: [16], 30: [25]}, leased


def test_a_21_minute_batch_job_is_requested_only_for_jobs_its_launcher_leases(make_site, client, caplog) -> None:
    settings = {"scheduler": {"allowed_queues": {"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 5}}}}
    site = make_site(overrides=settings)
    caplog.set_level(logging.INFO, logger=LOGGER)
    module = ElasticQueueModule(site, {"submit_queue": "debug", "job_mode": "serial", "max_num_nodes": 4,
                                       "min_wall_time_min": 10, "wall_time_pad_min": 2, "max_wall_time_min": 21},
                                client, scheduler=Windows(BackfillWindow(num_nodes=4, wall_time_min=1440)))
    runnable_jobs(client, site, 2, wall_time_min=17)
    module.run_cycle()
    # Before: a 21-minute BatchJob, whose launcher leased neither job after 7 s of start-up.
    assert batch_jobs_of(client, site) == []
    errors = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert any("wall_time_min of more than 16, and its BatchJobs last at most 21 min" in e for e in errors), errors
    runnable_jobs(client, site, 2, wall_time_min=16)
    module.run_cycle()
    [made] = batch_jobs_of(client, site)
    assert made["wall_time_min"] == 21 and dict(module.last_decision.numbers)["runnable"] == 2, module.last_decision
    got = _launcher_acquire(site.site_id, made["id"], made["wall_time_min"], {})
    assert sorted(j.wall_time_min for j in got) == [16, 16], got

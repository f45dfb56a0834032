"""The most reads of one cycle, as docs/elastic.md counts them ("2 to N in all, with fewer than 33
BatchJobs"). The docs said 8; a cycle can make 10: its BatchJobs, the jobs running in them, four
backlog requests (all runnable jobs, those within the lease filters, and the serial and GPU checks
of why some do not fit), the refused and the ended BatchJobs and whether the latter leased a job
(a submitting cycle right after one of its BatchJobs ended), and the read-again of a request it
withdraws in the same cycle (its own, left waiting in another queue). Against a real API server."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from balsam_elastic import ElasticQueueOptions
from balsam_elastic.module import REQUEST_KIND, ElasticQueueModule
from elastic_test_utils import batch_jobs_of, runnable_jobs

QUEUES = {"scheduler": {"allowed_queues": {"local": {"max_nodes": 16, "max_walltime": 600, "max_queued_jobs": 10}}}}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "elastic.md"


class CountingClient:
    """The real client, counting its GETs."""

    def __init__(self, client) -> None:
        self.client, self.gets = client, []

    def __getattr__(self, name):
        return getattr(self.client, name)

    def get(self, path, *args, **kwargs):
        self.gets.append((path, sorted((kwargs.get("params") or {}).keys())))
        return self.client.get(path, *args, **kwargs)


def test_the_most_reads_of_a_cycle_are_the_documented_most(make_site, client) -> None:
    site = make_site(overrides=QUEUES)
    runnable_jobs(client, site, 3)                    # fit
    runnable_jobs(client, site, 2, wall_time_min=59)  # too long for its 60-min BatchJobs
    runnable_jobs(client, site, 2, gpus_per_rank=1)   # need a GPU its nodes lack
    counting = CountingClient(client)
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, job_mode="serial", node_gpus=0,
                                                          max_num_nodes=4, max_wall_time_min=60), counting)
    module.run_cycle()
    first = batch_jobs_of(client, site)[-1]
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    client.patch("/batch-jobs/", json=[{"id": first["id"], "state": "queued", "scheduler_id": 7000 + first["id"]}])
    client.patch("/batch-jobs/", json=[{"id": first["id"], "state": "running", "start_time": now}])
    client.patch("/batch-jobs/", json=[{"id": first["id"], "state": "finished", "end_time": now}])
    body = {"site_id": site.site_id, "project": first["project"], "num_nodes": 1, "wall_time_min": 60,
            "job_mode": "serial", "filter_tags": {}}
    # One made by hand, running in submit_queue (the jobs running in it are read)...
    by_hand = client.post("/batch-jobs/", json={**body, "queue": "local"})
    client.patch("/batch-jobs/", json=[{"id": by_hand["id"], "state": "queued", "scheduler_id": 8000 + by_hand["id"]}])
    client.patch("/batch-jobs/", json=[{"id": by_hand["id"], "state": "running", "start_time": now}])
    # ...and one of its own requests left waiting in a former submit_queue (withdrawn: read again first).
    client.post("/batch-jobs/", json={**body, "queue": "old", "status_info": {REQUEST_KIND: "backfill"}})
    counting.gets.clear()
    module.run_cycle()
    assert module.last_decision.submit, module.last_decision
    documented = int(re.search(r"2 to\s+(\d+)\s+in all", DOCS.read_text()).group(1))
    # Before: 10 reads, and the docs said 8.
    assert len(counting.gets) == 10 and documented == 10, (documented, counting.gets)

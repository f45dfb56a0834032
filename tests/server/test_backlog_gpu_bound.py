"""``GET /sites/{id}/backlog?max_gpus_per_node=``: the acquire's GPU bound. A launcher whose nodes
have no GPU acquires with ``max_gpus_per_node: 0`` (``job_mode.gpuless_acquire_filter``) and never
leases a job that needs one; the backlog, without the same bound, counted those jobs as runnable and
the elastic queue submitted BatchJob after BatchJob for them (9 in 50 s on the CI's Slurm). The
route counts exactly what such an acquire leases; without the parameter it answers as before."""

from __future__ import annotations

import pytest
from server_testlib import runnable

from balsam.states import JobState

RUNNABLE = ["PREPROCESSED", "RESTART_READY"]


def _count(api, site_id: int, **params) -> int:
    states = api.ok("GET", f"/sites/{site_id}/backlog", params={"state": RUNNABLE, **params})["states"]
    return sum(row["count"] for row in states.values())


def _leased(api, site_id: int, **spec) -> int:
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site_id})["id"]
    got = api.ok("POST", f"/sessions/{session}", json={"max_num_jobs": 100, **spec})
    api.ok("DELETE", f"/sessions/{session}", 204)
    return len(got if isinstance(got, list) else got["results"])


def test_the_gpu_bound_counts_what_the_acquire_leases(api, site_app) -> None:
    site, app = site_app
    runnable(api, app["id"], 2)                                    # no GPU
    runnable(api, app["id"], 3, gpus_per_rank=1)                   # 1 GPU per node
    runnable(api, app["id"], 1, ranks_per_node=4, gpus_per_rank=0.5)  # 2 GPUs per node
    for bound, expected in ((0, 2), (1, 5), (1.5, 5), (2, 6)):
        assert _leased(api, site["id"], max_gpus_per_node=bound) == expected
        assert _count(api, site["id"], max_gpus_per_node=bound) == expected, bound
    assert _count(api, site["id"]) == 6  # no bound: every job, as older clients read it


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "2e9", "x", "0." + "0" * 40])
def test_a_bad_gpu_bound_is_refused_naming_it(api, site_app, bad) -> None:
    site, _app = site_app
    answer = api.http.request("GET", f"/sites/{site['id']}/backlog", params={"max_gpus_per_node": bad})
    assert answer.status_code == 422 and "max_gpus_per_node" in answer.text, answer.text


def test_the_jobs_a_batch_job_ever_leased_are_counted_in_every_state(api, site_app) -> None:
    """The elastic queue's churn guard asks whether a finished BatchJob's launcher leased any job:
    the jobs of those BatchJobs in every state (read from the batch_job_id index on SQLite)."""
    site, app = site_app
    body = {"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1, "wall_time_min": 30, "job_mode": "mpi"}
    ran, idle = (api.ok("POST", "/batch-jobs/", 201, json=body)["id"] for _ in range(2))
    done, running = runnable(api, app["id"], 2)
    runnable(api, app["id"], 1)  # of no BatchJob
    api.ok("PATCH", "/jobs/", json=[{"id": done, "batch_job_id": ran, "state": "RUNNING"},
                                    {"id": running, "batch_job_id": ran, "state": "RUNNING"}])
    api.ok("PATCH", "/jobs/", json=[{"id": done, "state": "RUN_DONE"}])
    api.ok("PATCH", "/jobs/", json=[{"id": done, "state": "POSTPROCESSED"}])
    api.ok("PATCH", "/jobs/", json=[{"id": done, "state": "JOB_FINISHED"}])
    every = [s.value for s in JobState]
    states = api.ok("GET", f"/sites/{site['id']}/backlog", params={"state": every, "batch_job_id": [ran, idle]})["states"]
    assert {s: row["count"] for s, row in states.items()} == {"JOB_FINISHED": 1, "RUNNING": 1}
    assert api.ok("GET", f"/sites/{site['id']}/backlog", params={"state": every, "batch_job_id": [idle]})["states"] == {}

"""``GET /sites/{id}/backlog``: ``leased`` keeps the jobs a launcher session holds (true) or none
holds (false: what an auto-scaler counts as unmet demand, since a job a launcher has prefetched runs
in that launcher's BatchJob); each state's ``min_wall_time_min`` is its shortest job (0 when a job
has none) and ``unpacked_footprint`` its Σ num_nodes (the nodes its jobs hold where MPI runs may
not share a node). On SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from server_testlib import runnable


def _backlog(api, site_id: int, **params) -> dict:
    return api.ok("GET", f"/sites/{site_id}/backlog", params=params)["states"]


def test_leased_splits_held_jobs_from_unmet_demand(api, site_app) -> None:
    site, app = site_app
    ids = runnable(api, app["id"], 6, num_nodes=2, node_packing_count=2)
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    got = api.ok("POST", f"/sessions/{session}", json={"max_num_jobs": 4})
    held = [j["id"] for j in (got if isinstance(got, list) else got["results"])]
    assert len(held) == 4
    api.ok("PATCH", "/jobs/", json=[{"id": held[0], "state": "RUNNING"}])  # one started, three prefetched

    def counts(**params) -> dict:
        return {state: (row["count"], row["footprint"]) for state, row in _backlog(api, site["id"], **params).items()}

    assert counts() == {"PREPROCESSED": (5, 5.0), "RUNNING": (1, 1.0)}
    assert counts(leased="false") == {"PREPROCESSED": (2, 2.0)}
    assert counts(leased="true") == {"PREPROCESSED": (3, 3.0), "RUNNING": (1, 1.0)}
    # with the lease filters, in the same query
    assert counts(leased="false", max_nodes_per_job=1) == {}
    # the session ends: its unstarted jobs are free again
    api.ok("DELETE", f"/sessions/{session}", 204)
    assert counts(leased="false", state="PREPROCESSED") == {"PREPROCESSED": (len(ids) - 1, 5.0)}


def test_leased_rejects_a_non_boolean(api, site_app) -> None:
    site, _ = site_app
    resp = api.http.get(f"/sites/{site['id']}/backlog?leased=maybe")
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["query", "leased"] and "expected true or false" in error["msg"], error


@pytest.mark.parametrize("walls, shortest", [([30, 90, 45], 30), ([30, 0, 45], 0)])
def test_min_wall_time_min_is_the_shortest_job(api, site_app, walls, shortest) -> None:
    site, app = site_app
    for wall in walls:
        runnable(api, app["id"], 1, wall_time_min=wall)
    row = _backlog(api, site["id"], state="PREPROCESSED")["PREPROCESSED"]
    assert (row["min_wall_time_min"], row["max_wall_time_min"]) == (shortest, max(walls))


def test_unpacked_footprint_ignores_node_packing(api, site_app) -> None:
    site, app = site_app
    runnable(api, app["id"], 4, num_nodes=1, node_packing_count=4)
    runnable(api, app["id"], 2, num_nodes=3, node_packing_count=2)
    row = _backlog(api, site["id"], state="PREPROCESSED")["PREPROCESSED"]
    assert (row["footprint"], row["unpacked_footprint"]) == (4.0, 10)


def test_a_job_requeued_while_running_is_no_unmet_demand_until_its_mark_clears(api, site_app) -> None:
    """A RUNNING job its user re-queues keeps its old session's mark (``released_from_session_id``):
    no acquire leases it until that session's heartbeats stop listing it, so ``leased=false`` (the
    elastic queue's unmet demand) does not count it until then; ``leased=true`` does not either
    (no session holds it)."""
    site, app = site_app
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    job, other = runnable(api, app["id"], 2)
    got = api.ok("POST", f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})
    assert sorted(j["id"] for j in got) == sorted([job, other])
    api.ok("PATCH", "/jobs/", json=[{"id": i, "state": "RUNNING", "session_id": session} for i in (job, other)])
    for state in ("FAILED", "RESTART_READY"):  # balsam job modify -s FAILED, then -s RESTART_READY
        api.patch_states([job], state)

    def counts(**params) -> dict:
        return {state: row["count"] for state, row in _backlog(api, site["id"], **params).items()}

    assert counts() == {"RESTART_READY": 1, "RUNNING": 1}
    assert counts(leased="false") == {}
    assert counts(leased="true") == {"RUNNING": 1}
    # The holder's heartbeats: the first after the move lists it (told it is gone), the next does not.
    assert api.ok("PUT", f"/sessions/{session}", json={"job_ids": [job, other]})["gone"] == [job]
    assert counts(leased="false") == {}
    api.ok("PUT", f"/sessions/{session}", json={"job_ids": [other]})
    # The mark is cleared: leasable again, unmet demand again.
    assert counts(leased="false") == {"RESTART_READY": 1}
    assert counts(leased="true") == {"RUNNING": 1}

"""A deleted record's id is never given to a new one (SQLite and PostgreSQL, through a real server).

On SQLite, ``batch_jobs`` and ``sessions`` had lost ``AUTOINCREMENT`` (migrations 0002 and 0016;
0020 repairs them): deleting the newest BatchJob gave its id to the next BatchJob, and the site agent
took the old one's submit marker (``qlaunchNNNNN.sh.scheduler_id``) for it; a launcher still
heartbeating its deleted session kept the next session, another launcher's, alive. Each resource
here: the newest one deleted, the next one created gets a larger id."""

from __future__ import annotations

from test_batch_jobs import bj_body


def _recreated(api, path: str, body: dict) -> tuple[int, int]:
    """(id of the deleted newest record, id of the one created after it)."""
    api.ok("POST", path, 201, json=body)
    newest = api.ok("POST", path, 201, json=body)["id"]
    api.ok("DELETE", f"{path}{newest}", 204)
    return newest, api.ok("POST", path, 201, json=body)["id"]


def test_site_app_and_batch_job_ids(api):
    deleted = api.site()["id"]
    api.ok("DELETE", f"/sites/{deleted}", 204)
    site = api.site()
    assert site["id"] > deleted

    deleted = api.app(site["id"], "First")["id"]
    api.ok("DELETE", f"/apps/{deleted}", 204)
    assert api.app(site["id"], "Second")["id"] > deleted

    deleted, new = _recreated(api, "/batch-jobs/", bj_body(site["id"]))
    assert new > deleted


def test_session_ids_and_a_stale_heartbeat(api):
    site = api.site()
    deleted, new = _recreated(api, "/sessions/", {"site_id": site["id"]})
    assert new > deleted
    # The launcher of the deleted session heartbeats it: not found, and no other session is touched.
    assert api.http.put(f"/sessions/{deleted}").status_code == 404
    assert api.http.post(f"/sessions/{deleted}", json={"max_num_jobs": 1}).status_code == 404


def test_job_and_transfer_item_ids(api):
    site = api.site(transfer_locations={"aps": "globus://aps-endpoint"})
    app = api.app(site["id"], "Xfer", transfers={"input": {"required": True, "direction": "in", "local_path": "in.dat"}})
    transfers = {"input": "aps:/data/in.dat"}

    def job_and_items() -> tuple[int, list[int]]:
        job = api.jobs(app["id"], transfers=transfers)[0]
        items = api.ok("GET", "/transfers/", params={"job_id": [job["id"]]})["results"]
        return job["id"], [i["id"] for i in items]

    job_and_items()
    deleted_job, deleted_items = job_and_items()
    api.ok("DELETE", f"/jobs/{deleted_job}", 204)  # its transfer items with it
    job, items = job_and_items()
    assert job > deleted_job
    assert min(items) > max(deleted_items)

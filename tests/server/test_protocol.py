"""HTTP-level behaviour: error bodies, keep-alive after DELETE, OpenAPI, Balsam 0.7 route coverage."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import urlparse

import httpx

REFERENCE_OPENAPI = Path("/work/shared/reference/balsam-0.7-openapi.json")


def test_delete_keeps_the_connection_alive(api, site_app):
    _site, app = site_app
    jobs = api.jobs(app["id"], 3)
    parsed = urlparse(api.url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    headers = {"Authorization": f"Bearer {api.token}", "Connection": "keep-alive"}
    try:
        conn.request("DELETE", f"/jobs/{jobs[0]['id']}", headers=headers)
        resp = conn.getresponse()
        assert resp.status == 204 and resp.read() == b"" and not resp.will_close
        sock = conn.sock
        conn.request("DELETE", f"/jobs/?id={jobs[1]['id']}", headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == 1 and not resp.will_close
        conn.request("GET", f"/jobs/{jobs[2]['id']}", headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["id"] == jobs[2]["id"]
        assert conn.sock is sock, "the server closed the connection after a DELETE"
    finally:
        conn.close()


def test_error_bodies_are_json_with_detail(api):
    resp = api.http.get("/no/such/route")
    assert resp.status_code == 404 and "no route" in resp.json()["detail"]
    resp = api.http.patch("/sites/")
    assert resp.status_code == 405 and "not allowed" in resp.json()["detail"]
    resp = api.http.post("/sites/", content=b"[1, 2", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body"]
    resp = api.http.post("/sites/", content=b"", headers={"content-type": "application/json"})
    assert resp.status_code == 422
    resp = api.http.post("/sites/", json=["not", "an", "object"])
    assert resp.status_code == 422
    resp = api.http.patch("/jobs/", json={"id": 1})
    assert resp.status_code == 422 and "list" in resp.json()["detail"][0]["msg"]
    resp = api.http.put("/jobs/", json=[1])
    assert resp.status_code == 422
    resp = api.http.get("/jobs/", params={"id": "1,2,x"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "id"]


def test_trailing_slash_redirect_and_head(api):
    resp = api.http.get("/sites", follow_redirects=True)
    assert resp.status_code == 200 and "count" in resp.json()
    assert httpx.head(f"{api.url}/auth/how").status_code == 200


def test_openapi_covers_every_balsam_07_route(server_url):
    ours = httpx.get(f"{server_url}/openapi.json").json()
    reference = json.loads(REFERENCE_OPENAPI.read_text())
    missing = [
        (method.upper(), path)
        for path, ops in reference["paths"].items()
        for method in ops
        if method not in ours["paths"].get(path, {})
    ]
    assert missing == []
    assert "/batch-jobs/" in ours["paths"] and "patch" in ours["paths"]["/batch-jobs/"]
    job_schema = ours["components"]["schemas"]["Job"]["properties"]
    assert {"workdir", "app_id", "parent_ids", "state", "tags"} <= set(job_schema)
    job_params = {p["name"] for p in ours["paths"]["/jobs/"]["get"]["parameters"]}
    ref_params = {p["name"] for p in reference["paths"]["/jobs/"]["get"]["parameters"]}
    assert ref_params <= job_params


def test_every_07_route_answers(api, site_app):
    """Each 0.7 route exists on the live server (no 404/405 from routing)."""
    site, app = site_app
    job = api.jobs(app["id"])[0]
    reference = json.loads(REFERENCE_OPENAPI.read_text())
    ids = {"site_id": site["id"], "app_id": app["id"], "job_id": job["id"], "batch_job_id": 99999999,
           "session_id": 99999999, "transfer_id": 99999999}
    for path, ops in reference["paths"].items():
        concrete = path.format(**ids)
        for method in ops:
            if method == "delete" and path != "/sessions/{session_id}" and path != "/batch-jobs/{batch_job_id}":
                continue  # do not delete the fixtures; DELETE routes are covered elsewhere
            resp = api.http.request(method.upper(), concrete, json={} if method in ("post", "put", "patch") else None)
            assert resp.status_code != 405, (method, path)
            if resp.status_code == 404:
                assert "no route" not in resp.json()["detail"], (method, path)

"""What goes over the wire: Balsam 0.7's datetimes and transitions, tag keys of any shape, size limits."""

from __future__ import annotations

import datetime as dt
import re

import httpx

NAIVE_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?$")


def _datetimes(value, found):
    if isinstance(value, str) and re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d", value):
        found.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _datetimes(item, found)
    elif isinstance(value, list):
        for item in value:
            _datetimes(item, found)
    return found


def test_datetimes_go_out_as_naive_utc_like_balsam_07(api):
    """0.7 clients subtract server datetimes from a naive utcnow(): an offset broke every command."""
    before = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    login = httpx.post(f"{api.url}/auth/password/login", data={"username": api.username, "password": api.password}).json()
    site = api.site()
    app = api.app(site["id"])
    job = api.jobs(app["id"])[0]
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 5, "job_mode": "mpi",
                                                  "start_time": "2030-01-02T03:04:05+02:00"})
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    tick = api.ok("PUT", f"/sessions/{session['id']}")
    payloads = [login, site, job, bj, session, tick, api.ok("GET", "/sites/"), api.ok("GET", "/jobs/"),
                api.ok("GET", "/events/"), api.ok("GET", "/batch-jobs/"), api.ok("GET", "/sessions/"),
                api.ok("GET", "/auth/credentials")]
    found = _datetimes(payloads, [])
    assert len(found) >= 12
    assert all(NAIVE_ISO.match(text) for text in found), [t for t in found if not NAIVE_ISO.match(t)]
    assert bj["start_time"] == "2030-01-02T01:04:05"  # stored as UTC
    assert dt.datetime.fromisoformat(job["last_update"]) >= before - dt.timedelta(seconds=5)
    # Naive datetimes sent by 0.7 clients are UTC too.
    api.ok("PATCH", "/jobs/", json=[{"id": job["id"], "state": "FAILED", "state_timestamp": "2031-05-06T07:08:09"}])
    events = api.events(job_id=job["id"], to_state="FAILED")
    assert events[0]["timestamp"] == "2031-05-06T07:08:09"


def test_our_client_keeps_timezone_aware_datetimes(balsam_env):
    from balsam.client import load_client
    from balsam.models import Site
    from balsam.serialization import from_dict

    client = load_client()
    raw = client.post("/sites/", json={"name": "aware", "path": "/tmp/aware"})
    site = from_dict(Site, raw)
    assert site.last_refresh.tzinfo is not None
    assert abs(site.last_refresh - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=5)
    # The Python API's models: naive local time, comparable with datetime.now() (docs/api.md).
    api_site = client.Site.objects.get(id=raw["id"])
    assert abs(api_site.last_refresh - dt.datetime.now()) < dt.timedelta(minutes=5)


def test_staged_in_jobs_may_run_as_under_balsam_07(api, site_app):
    _site, app = site_app
    job = api.jobs(app["id"])[0]
    assert job["state"] == "STAGED_IN"
    assert api.patch_states([job["id"]], "RUNNING") == 1
    assert api.job(job["id"])["state"] == "RUNNING"


def test_tag_keys_with_quotes_and_backslashes_match_everywhere(api, site_app):
    """Before: on SQLite a tag key holding '"' never matched (filters, acquire, PUT/DELETE by filter)."""
    site, app = site_app
    key = 'say "hi" \\o/ 🙂'
    tagged = api.jobs(app["id"], n=2, tags={key: "yes", "plain": "1"})
    other = api.jobs(app["id"], n=1, tags={key: "no"})
    ids = sorted(j["id"] for j in tagged)
    found = api.ok("GET", "/jobs/", params={"tags": f"{key}:yes"})["results"]
    assert sorted(j["id"] for j in found) == ids
    both = api.ok("GET", "/jobs/", params=[("tags", f"{key}:yes"), ("tags", "plain:1")])["results"]
    assert sorted(j["id"] for j in both) == ids
    assert api.ok("PUT", "/jobs/", params={"tags": f"{key}:yes"}, json={"state": "PREPROCESSED"}) == 2
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    acquired = api.ok("POST", f"/sessions/{session['id']}", json={"max_num_jobs": 10, "filter_tags": {key: "yes"}})
    assert sorted(j["id"] for j in acquired) == ids
    api.ok("DELETE", f"/sessions/{session['id']}", 204)
    events = api.ok("GET", "/events/", params={"tags": f"{key}:yes", "to_state": "PREPROCESSED"})["results"]
    assert sorted(e["job_id"] for e in events) == ids
    assert api.ok("DELETE", "/jobs/", params={"tags": f"{key}:yes"}) == 2
    assert [j["id"] for j in api.ok("GET", "/jobs/", params={"tags": f"{key}:no"})["results"]] == [other[0]["id"]]


def test_bodies_and_fields_have_size_limits(api, site_app, live_server_factory):
    """Before: a 100 MB tag was stored (and on PostgreSQL a 300 MB one left a 2.1 GB worker behind)."""
    _site, app = site_app
    job = api.jobs(app["id"])[0]
    cases = [
        ("PUT", f"/jobs/{job['id']}", {"tags": {"k": "v" * 1025}}, ["body", "tags", "k"]),
        ("PUT", f"/jobs/{job['id']}", {"tags": {"k" * 257: "v"}}, None),
        ("PUT", f"/jobs/{job['id']}", {"workdir": "w/" + "x" * 5000}, ["body", "workdir"]),
        ("PUT", f"/jobs/{job['id']}", {"data": {"big": "x" * (1024 * 1024 + 1)}}, ["body", "data", "big"]),
        ("PUT", f"/jobs/{job['id']}", {"serialized_parameters": "x" * 512_001}, ["body", "serialized_parameters"]),
        ("POST", "/jobs/", [{"workdir": "a", "app_id": app["id"], "tags": {"t": "x" * 2000}}], ["body", 0, "tags", "t"]),
    ]
    for method, path, body, loc in cases:
        resp = api.http.request(method, path, json=body)
        assert resp.status_code == 422, (path, resp.text[:200])
        if loc:
            assert resp.json()["detail"][0]["loc"] == loc
            assert "longer than" in resp.json()["detail"][0]["msg"]
    resp = api.http.get("/jobs/", params={"tags": "k:" + "v" * 5000})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "tags"]
    # Within the limits, all is stored.
    assert api.ok("PUT", f"/jobs/{job['id']}", json={"tags": {"k": "v" * 1024}, "data": {"big": "x" * 100_000}}) == 1

    small = live_server_factory("sqlite", env={"BALSAM_MAX_BODY_BYTES": "100000"})
    from balsam.server.admin import Admin

    with Admin(small.database_url) as admin:
        admin.add_user("big", "a long enough password", 12)
    token = httpx.post(f"{small.url}/auth/password/login",
                       data={"username": "big", "password": "a long enough password"}).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    too_big = httpx.post(f"{small.url}/sites/", headers={**headers, "content-type": "application/json"},
                         content=b"[" + b"1," * 60_000 + b"1]")
    assert too_big.status_code == 413 and "exceeds the limit of 100000 bytes" in too_big.json()["detail"]

    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    streamed = httpx.post(f"{small.url}/sites/", headers=headers, content=chunks())  # no Content-Length
    assert streamed.status_code == 413
    # Without a token, the same body gets 401 (authentication comes first).
    assert httpx.post(f"{small.url}/sites/", content=b"x" * 200_000).status_code == 401

"""Job workdirs stay inside the site's data/ directory: the API refuses the others (422 naming the field)."""

from __future__ import annotations

import pytest
from server_testlib import Api

# Any ".." is refused, even one that stays inside ("a/../b"): simpler to reason about than normalizing.
BAD = ["../../x", "/abs/x", "a/../../..", "", ".", "a/../b/../..", "./..", "a/../b"]
GOOD = ["x", "a/b/c", "./y", "a/./b", "c/d/"]


@pytest.mark.parametrize("workdir", BAD)
def test_a_workdir_outside_data_is_refused_on_create(api: Api, site_app: tuple[dict, dict], workdir: str) -> None:
    _site, app = site_app
    resp = api.http.post("/jobs/", json=[{"workdir": "fine", "app_id": app["id"]}, {"workdir": workdir, "app_id": app["id"]}])
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["body", 1, "workdir"], error
    assert api.ok("GET", "/jobs/", params={"app_id": app["id"], "limit": 0})["count"] == 0  # all or nothing


def test_a_workdir_outside_data_is_refused_on_update(api: Api, site_app: tuple[dict, dict]) -> None:
    _site, app = site_app
    (job,) = api.jobs(app["id"], 1)
    for path, body in ((f"/jobs/{job['id']}", {"workdir": "../up"}), ("/jobs/", [{"id": job["id"], "workdir": "/etc"}])):
        resp = api.http.request("PUT" if path != "/jobs/" else "PATCH", path, json=body)
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][-1] == "workdir", resp.text
    assert api.job(job["id"])["workdir"] == job["workdir"]


def test_relative_workdirs_inside_data_are_accepted(api: Api, site_app: tuple[dict, dict]) -> None:
    _site, app = site_app
    created = api.ok("POST", "/jobs/", 201, json=[{"workdir": w, "app_id": app["id"]} for w in GOOD])
    assert len(created) == len(GOOD)

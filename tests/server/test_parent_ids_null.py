"""``"parent_ids": null`` in a job create is a one-line 422 naming the field and what it takes
(it was refused with "'NoneType' object is not iterable", which named neither)."""

from __future__ import annotations

import uuid


def test_null_parent_ids_is_refused_naming_the_field(api, site_app):
    _site, app = site_app
    prefix = uuid.uuid4().hex[:6]
    body = [{"workdir": f"{prefix}/0", "app_id": app["id"]},
            {"workdir": f"{prefix}/1", "app_id": app["id"], "parent_ids": None}]
    resp = api.http.post("/jobs/", json=body)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert len(detail) == 1, detail
    assert detail[0]["loc"] == ["body", 1, "parent_ids"], detail
    message = detail[0]["msg"]
    assert "NoneType" not in message and "\n" not in message, message
    assert message == "expected a list, got null", message
    # Nothing of the request was stored.
    listed = api.ok("GET", "/jobs/", params={"app_id": app["id"]})
    assert not any(job["workdir"].startswith(prefix) for job in listed["results"]), listed


def test_an_empty_or_absent_parent_ids_is_still_accepted(api, site_app):
    _site, app = site_app
    prefix = uuid.uuid4().hex[:6]
    created = api.ok("POST", "/jobs/", 201, json=[{"workdir": f"{prefix}/0", "app_id": app["id"], "parent_ids": []},
                                                  {"workdir": f"{prefix}/1", "app_id": app["id"]}])
    assert [job["parent_ids"] for job in created] == [[], []]

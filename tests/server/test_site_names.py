"""Site names that ``--site`` could never select (digits: an id; all/active/this: selectors of
their own; a comma: a list) are refused on create and on rename (422, one line per name)."""

from __future__ import annotations

import pytest

BAD_NAMES = ["1", " 42 ", "all", "active", "this", "a,b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_site_create_refuses_a_name_site_cannot_select(api, name):
    resp = api.http.post("/sites/", json={"name": name, "path": "/x"})
    assert resp.status_code == 422, resp.text
    [error] = resp.json()["detail"]
    assert error["loc"] == ["body", "name"] and error["msg"].startswith("must not"), error
    assert api.ok("GET", "/sites/")["count"] == 0


def test_site_rename_refuses_a_name_site_cannot_select(api):
    site = api.site("good")
    for name in BAD_NAMES:
        resp = api.http.put(f"/sites/{site['id']}", json={"name": name})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "name"], (name, resp.text)
    assert api.ok("GET", f"/sites/{site['id']}")["name"] == "good"
    for name in ("ALL", "1a", "site-1", "this-one", "active2"):
        assert api.ok("PUT", f"/sites/{site['id']}", json={"name": name})["name"] == name
    # A whole record sent back with its (good) name is fine.
    record = api.ok("GET", f"/sites/{site['id']}")
    assert api.ok("PUT", f"/sites/{site['id']}", json=record)["name"] == "active2"

"""A 422 lists at most ``MAX_REPORTED_ERRORS`` problems and counts the others: it listed every one,
so a body of many faulty entries (here a site's ``queued_jobs`` of 5,000 empty objects, 60 KB, 8
fields missing in each) was answered with 40,000 items, 3.8 MB: an answer some 60 times the size
of its request, gigabytes for a body near the 64 MiB limit, built in one server process."""

from __future__ import annotations

from server_testlib import Api

#: balsam.server.errors.MAX_REPORTED_ERRORS (spelled out: the test reads the answer, not the code)
MAX_REPORTED_ERRORS = 100


def test_a_422_lists_the_first_problems_and_counts_the_rest(api: Api) -> None:
    site = api.site()
    body = {"queued_jobs": {f"q{i}": {} for i in range(5000)}}
    resp = api.http.put(f"/sites/{site['id']}", json=body)
    assert resp.status_code == 422, resp.text[:300]
    detail = resp.json()["detail"]
    assert len(detail) == MAX_REPORTED_ERRORS + 1, len(detail)  # before: 40000
    assert detail[0]["loc"][:3] == ["body", "queued_jobs", "q0"], detail[0]
    last = detail[-1]
    assert last["loc"] == ["body"] and last["msg"].startswith("and ") and "more problems" in last["msg"], last
    assert int(last["msg"].split()[1]) + MAX_REPORTED_ERRORS > 5000, last
    assert len(resp.content) < 50_000, len(resp.content)
    # A few problems are all listed, as before.
    few = api.http.put(f"/sites/{site['id']}", json={"queued_jobs": {"q": {}}}).json()["detail"]
    assert 0 < len(few) < MAX_REPORTED_ERRORS and all("more problems" not in item["msg"] for item in few), few

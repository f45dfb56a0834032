"""The job page lists every parent of a job, a deleted one too, and says what a job waiting for its
parents (AWAITING_PARENTS) waits for and what the user can do about a FAILED or deleted parent.

Before: only the parents that still existed were listed (``[family.get(p) ... if p in family]``): a
child of one finished and one deleted parent showed the finished one alone, and a child whose only
parent was deleted said "Parents: None." while it waited for that parent forever."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import logged_in_client, make_campaign, text_of  # noqa: E402


def _section(html: str) -> str:
    """The Parents section of a job page (up to the Children heading), as text."""
    match = re.search(r"<h2>Parents</h2>(.*?)<h2>Children</h2>", html, re.S)
    assert match, html[:2000]
    return text_of(match.group(1))


def test_job_page_lists_deleted_and_failed_parents_and_what_the_child_waits_for(live_server: str, register: Any) -> None:
    username, password, _, token, _ = register(live_server)
    campaign = make_campaign(live_server, token, n_jobs=3, finished=True)
    finished, failed, running = campaign["finished"], campaign["failed"], campaign["jobs"][2]["id"]
    api = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def make(workdir: str, parents: list[int]) -> int:
        resp = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": workdir, "parent_ids": parents}])
        assert resp.status_code == 201, resp.text
        return resp.json()[0]["id"]

    deleted = make("run/<i>gone</i>", [])
    child = make("run/child", [finished, deleted])
    only_deleted = make("run/orphan", [deleted])
    child_of_failed = make("run/child-of-failed", [finished, failed, running])
    assert api.delete(f"/jobs/{deleted}").status_code == 204
    for jid in (child, only_deleted, child_of_failed):
        job = api.get(f"/jobs/{jid}").json()
        assert job["state"] == "AWAITING_PARENTS", job
    client = logged_in_client(live_server, username, password)

    page = client.get(f"/dashboard/jobs/{child}")
    assert page.status_code == 200
    parents = _section(page.text)
    assert f"{finished} run/1 JOB_FINISHED" in parents
    assert f"{deleted} deleted or not found" in parents
    assert f"Waiting for: {deleted} (deleted)" in parents
    assert "<i>gone</i>" not in page.text  # the deleted job's workdir is not known any more, nor shown
    assert f"balsam job modify -i {child} -s READY" in parents
    assert "None." not in parents

    parents = _section(client.get(f"/dashboard/jobs/{only_deleted}").text)
    assert "None." not in parents
    assert f"{deleted} deleted or not found" in parents and f"Waiting for: {deleted} (deleted)" in parents

    parents = _section(client.get(f"/dashboard/jobs/{child_of_failed}").text)
    assert f"{failed} run/0 FAILED" in parents and f"{running} run/2 STAGED_IN" in parents
    assert f"Waiting for: {failed} (FAILED), {running} (STAGED_IN)" in parents
    assert f"balsam job modify -i {failed} -s RESTART_READY" in parents  # re-run the parent
    assert f"balsam job modify -i {child_of_failed} -s READY" in parents  # or move the child on
    assert f"{finished} (" not in parents.split("Waiting for:")[1]  # a finished parent is not waited for

    # The page of a job that does not wait any more lists its deleted parent, without the hint
    assert api.patch("/jobs/", json=[{"id": child, "state": "READY"}]).status_code == 200
    parents = _section(client.get(f"/dashboard/jobs/{child}").text)
    assert f"{deleted} deleted or not found" in parents and "Waiting for" not in parents

    # HTML-escaped: a parent's workdir is shown as text
    odd = make("run/<b>&amp;x", [])
    html = client.get(f"/dashboard/jobs/{make('run/odd-child', [odd])}").text
    assert "run/&lt;b&gt;&amp;amp;x" in html and "<b>&amp;x" not in html
    api.close()

"""The job page lists every parent of a job, a deleted one too, and says what a job waiting for its
parents (AWAITING_PARENTS) waits for and what the user can do about a FAILED parent, with the words
and the rule of ``balsam job show`` (one helper: ``balsam.dependencies.parent_wait``). The rule is
the server's (Balsam 0.7's): only the parents that still exist must be JOB_FINISHED; a deleted
parent is listed as "deleted" but not waited for; a FAILED one keeps its children waiting.

Before: only the parents that still existed were listed (``[family.get(p) ... if p in family]``): a
child of one finished and one deleted parent showed the finished one alone, and a child whose only
parent was deleted said "Parents: None."; then a deleted parent was shown as waited for ("a deleted
parent never finishes"), a rule of its own that the server no longer follows."""

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
    failed_and_deleted = make("run/failed-and-deleted", [deleted, failed])
    assert api.delete(f"/jobs/{deleted}").status_code == 204
    # the server's rule: a deleted parent does not hold its children back (needs the server change
    # that re-checks the children of a deleted parent)
    for jid in (child, only_deleted):
        job = api.get(f"/jobs/{jid}").json()
        assert job["state"] in ("READY", "STAGED_IN"), job  # released (no stage-in to do: STAGED_IN)
    for jid in (child_of_failed, failed_and_deleted):
        job = api.get(f"/jobs/{jid}").json()
        assert job["state"] == "AWAITING_PARENTS", job
    client = logged_in_client(live_server, username, password)

    page = client.get(f"/dashboard/jobs/{failed_and_deleted}")
    assert page.status_code == 200
    parents = _section(page.text)
    assert f"{deleted} deleted" in parents and f"{failed} run/0 FAILED" in parents
    assert f"Waiting for: {failed} (FAILED)" in parents  # the FAILED one only
    assert f"{deleted} (deleted)" not in parents.split("Waiting for:")[1]
    assert f"A deleted parent is not waited for ({deleted})" in parents
    assert "never finishes" not in parents
    assert "<i>gone</i>" not in page.text  # the deleted job's workdir is not known any more, nor shown
    assert f"balsam job modify -i {failed} -s RESTART_READY" in parents
    assert f"balsam job modify -i {failed_and_deleted} -s READY" in parents
    assert "None." not in parents

    parents = _section(client.get(f"/dashboard/jobs/{child_of_failed}").text)
    assert f"{failed} run/0 FAILED" in parents and f"{running} run/2 STAGED_IN" in parents
    assert f"Waiting for: {failed} (FAILED), {running} (STAGED_IN)" in parents
    assert f"balsam job modify -i {failed} -s RESTART_READY" in parents  # re-run the parent
    assert f"balsam job modify -i {child_of_failed} -s READY" in parents  # or move the child on
    assert f"{finished} (" not in parents.split("Waiting for:")[1]  # a finished parent is not waited for
    assert "deleted" not in parents

    # The page of a job that does not wait lists its deleted parent, without "Waiting for"
    for jid in (child, only_deleted):
        parents = _section(client.get(f"/dashboard/jobs/{jid}").text)
        assert f"{deleted} deleted" in parents and "Waiting for" not in parents and "None." not in parents

    # HTML-escaped: a parent's workdir is shown as text
    odd = make("run/<b>&amp;x", [])
    html = client.get(f"/dashboard/jobs/{make('run/odd-child', [odd])}").text
    assert "run/&lt;b&gt;&amp;amp;x" in html and "<b>&amp;x" not in html
    api.close()

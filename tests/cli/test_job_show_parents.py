"""`balsam job show` prints the state of each parent (one request for all of them), a deleted parent
as "deleted", and for a job waiting for its parents (AWAITING_PARENTS) what it waits for and what to
do about a FAILED parent. The rule and the words are ``balsam.dependencies.parent_wait``'s, shared
with the dashboard, and the server's: only the parents that still exist must be JOB_FINISHED (a
deleted parent is not waited for; a FAILED one keeps its children waiting).

Before: "parents 24, 26" without states (the children line had them), so a child stuck behind a
FAILED parent did not say so; then a deleted parent was shown as waited for ("it never finishes")."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))

from dashboard_helpers import make_campaign  # noqa: E402
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)


def _line(output: str, key: str) -> str:
    found = [line.strip() for line in output.splitlines() if line.strip().startswith(key + " ")]
    assert found, output
    return found[0][len(key):].strip()


def test_job_show_prints_parent_states_and_what_the_job_waits_for(balsam_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    campaign = make_campaign(balsam_env.url, balsam_env.token, n_jobs=3, finished=True)
    finished, failed, staged = campaign["finished"], campaign["failed"], campaign["jobs"][2]["id"]
    api = httpx.Client(base_url=balsam_env.url, headers=balsam_env.headers(), timeout=60)

    def make(workdir: str, parents: list[int]) -> int:
        resp = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": workdir, "parent_ids": parents}])
        assert resp.status_code == 201, resp.text
        return resp.json()[0]["id"]

    deleted = make("run/gone", [])
    child = make("run/child", [finished, deleted, failed])
    child_of_failed = make("run/child-of-failed", [finished, failed, staged])
    released = make("run/released", [finished, deleted])
    assert api.delete(f"/jobs/{deleted}").status_code == 204
    # the server's rule: its only unfinished parent deleted, a child goes on (needs the server change
    # that re-checks the children of a deleted parent); a FAILED parent still holds one back
    assert api.get(f"/jobs/{released}").json()["state"] in ("READY", "STAGED_IN")  # no stage-in to do: STAGED_IN
    assert api.get(f"/jobs/{child}").json()["state"] == "AWAITING_PARENTS"

    from balsam.client.rest import RESTClient

    job_gets: list[Any] = []
    real_send = RESTClient._send

    def counting_send(self: Any, method: str, path: str, *args: Any, **kw: Any) -> Any:
        if method == "GET" and path.rstrip("/") == "/jobs":
            job_gets.append(dict(kw.get("params") or {}))
        return real_send(self, method, path, *args, **kw)

    monkeypatch.setattr(RESTClient, "_send", counting_send)
    out = balsam("job", "show", str(child), str(child_of_failed))
    assert out.exit_code == 0, out.output
    first, second = out.output.split(f"Job {child_of_failed}")
    assert _line(first, "parents") == ", ".join(f"{p} ({s})" for p, s in sorted(
        {finished: "JOB_FINISHED", deleted: "deleted", failed: "FAILED"}.items()))
    assert _line(first, "waiting for") == f"{failed} (FAILED)"  # not the deleted one
    assert f"a deleted parent is not waited for ({deleted})" in first
    assert "never finishes" not in out.output
    assert f"balsam job modify -i {failed} -s RESTART_READY" in first
    assert f"balsam job modify -i {child} -s READY" in first
    expected = {finished: "JOB_FINISHED", failed: "FAILED", staged: "STAGED_IN"}
    assert _line(second, "parents") == ", ".join(f"{p} ({expected[p]})" for p in sorted(expected))  # by id
    assert _line(second, "waiting for") == f"{failed} (FAILED), {staged} (STAGED_IN)"  # not the finished one
    assert f"balsam job modify -i {failed} -s RESTART_READY" in second  # re-run the parent
    assert f"balsam job modify -i {child_of_failed} -s READY" in second  # or move the child on
    # the shown jobs, their children, and all four parents of both in one request (not one per parent)
    assert len(job_gets) == 3, job_gets
    assert sum(1 for p in job_gets if "id" in p and sorted(map(int, p["id"])) == sorted({finished, deleted, failed, staged})) == 1

    # The suggested command works; a job that does not wait any more lists its parents without the hint
    out = balsam("job", "modify", "-i", str(child), "-s", "READY", "-y")
    assert out.exit_code == 0, out.output
    for jid in (child, released):
        out = balsam("job", "show", str(jid))
        assert out.exit_code == 0, out.output
        assert f"{deleted} (deleted)" in _line(out.output, "parents")
        assert "waiting for" not in out.output
    # a parent shown in the same command is not asked for again: only the deleted and FAILED ones are
    job_gets.clear()
    out = balsam("job", "show", str(finished), str(child))
    assert out.exit_code == 0, out.output
    assert len(job_gets) == 3, job_gets
    assert [sorted(map(int, p["id"])) for p in job_gets if "id" in p][1:] == [sorted([deleted, failed])], job_gets
    api.close()

"""`balsam job ls` says what its AWAITING_PARENTS jobs wait for (as `job show` and the dashboard do):
one line on stderr under the table (stdout stays one row per job for scripts), from the parents in
the table and one more request for the others, against a real server on SQLite and on PostgreSQL.

Before: the table said AWAITING_PARENTS and nothing else, so a campaign's children stuck behind a
FAILED parent (which keeps them waiting until it is re-run) looked like children about to run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))

from dashboard_helpers import make_campaign  # noqa: E402
from cli_test_utils import balsam, fresh_api_state, record_requests, wait_on_parents  # noqa: F401, E402 (fresh_api_state: autouse)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


def test_job_ls_says_what_waiting_jobs_wait_for_without_a_request_per_job(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    campaign = make_campaign(env.url, env.token, n_jobs=8, finished=True)
    site, failed = campaign["site"]["name"], campaign["failed"]
    wait_on_parents(env, campaign, [j["id"] for j in campaign["jobs"][2:]])
    sent = record_requests(monkeypatch)
    out = balsam("job", "ls", "--site", site, "-ns", "AWAITING_PARENTS")
    assert out.exit_code == 0 and "AWAITING_PARENTS" not in out.output, out.output
    without_waiting = [s for s in sent if s == ("GET", "/jobs/")]
    sent.clear()

    out = balsam("job", "ls", "--site", site)
    assert out.exit_code == 0, out.output
    assert out.stdout.count("AWAITING_PARENTS") == 8 and len(out.stdout.splitlines()) == 1 + 8 + 8
    assert "wait for their parents" not in out.stdout
    note = out.stderr.strip()
    assert note.count("\n") == 0, note
    assert note.startswith("8 of these jobs wait for their parents (AWAITING_PARENTS): "), note
    assert (f"2 for a FAILED parent, which keeps them waiting until it is re-run (`balsam job modify -i {failed} "
            "-s RESTART_READY`)") in note
    assert "6 for parents not finished yet" in note and "`balsam job show ID`" in note
    # the parents of all eight are in the table: no more requests (not one per job or per parent)
    assert len([s for s in sent if s == ("GET", "/jobs/")]) == len(without_waiting), sent
    sent.clear()

    out = balsam("job", "ls", "--site", site, "-s", "AWAITING_PARENTS")  # the parents not listed: read
    assert out.exit_code == 0 and len(out.stdout.splitlines()) == 1 + 8, out.output
    assert out.stderr.strip() == note
    assert len([s for s in sent if s == ("GET", "/jobs/")]) == 2, sent  # the page, and all the parents

    out = balsam("job", "ls", "--site", site, "-t", "batch=1")  # no waiting job listed: no note
    assert out.exit_code == 0 and out.stderr == "", out.stderr

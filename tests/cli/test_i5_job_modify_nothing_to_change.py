"""`balsam job modify` that changes nothing says why, against a real server on SQLite and on
PostgreSQL: no job matches (an id typed wrong), or the selected jobs are already in that state.

Before: both printed "No job needs changing.", so `-i 99999999` read as a job already in the state."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "dashboard"))

from dashboard_helpers import make_campaign  # noqa: E402
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


def test_modify_that_changes_nothing_says_why(env: Any) -> None:
    campaign = make_campaign(env.url, env.token, n_jobs=3)
    site, failed = campaign["site"]["name"], campaign["failed"]
    out = balsam("job", "modify", "-i", "999999999", "-s", "FAILED", "-y")
    assert out.exit_code == 0 and out.output == "No job needs changing. No matching jobs.\n", out.output
    out = balsam("job", "modify", "-i", str(failed), "-s", "FAILED", "-y")
    assert out.output == "No job needs changing. The selected job is already FAILED.\n", out.output
    out = balsam("job", "modify", "--site", site, "-t", "batch=1", "-s", "STAGED_IN", "-y")
    assert out.output == "No job needs changing. The selected job is already STAGED_IN.\n", out.output
    out = balsam("job", "modify", "--site", site, "-t", "batch=0", "-f", "STAGED_IN", "-s", "FAILED", "-y")
    assert out.output == "Set 1 job(s) to FAILED\n", out.output
    out = balsam("job", "modify", "--site", site, "-t", "batch=0", "-s", "FAILED", "-y")
    assert out.output == "No job needs changing. All 2 selected jobs are already FAILED.\n", out.output

    # Left waiting for its parent (selected by tag): not "no matching jobs", nor "already".
    resp = httpx.post(f"{env.url}/jobs/", headers=env.headers(), timeout=60,
                      json=[{"app_id": campaign["app"]["id"], "workdir": "kid", "tags": {"kid": "1"}, "parent_ids": [failed]}])
    assert resp.status_code == 201 and resp.json()[0]["state"] == "AWAITING_PARENTS", resp.text
    out = balsam("job", "modify", "--site", site, "-t", "kid=1", "-s", "RESTART_READY", "-y")
    assert out.output.splitlines()[-1] == "No job needs changing.", out.output
    assert out.output.startswith("Left 1 job(s) waiting for their parents"), out.output

"""Bad filters on the dashboard's pages (SQLite and PostgreSQL, real uvicorn): refused with the
API's own one-line message ("state: expected one of ...; got 'BOGUS'"), shown above the page's
results with its filter form kept, never as a Python structure nor as a silent empty list."""

from __future__ import annotations

import html
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import logged_in_client, make_campaign, text_of  # noqa: E402


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def dash(request: pytest.FixtureRequest, register: Any) -> dict[str, Any]:
    """A user with a small campaign, logged in to the dashboard of a live server on either database."""
    url = request.getfixturevalue("live_server" if request.param == "sqlite" else "live_server_pg")
    username, password, _user_id, token, _ = register(url)
    campaign = make_campaign(url, token, n_jobs=3, name=f"err-{uuid.uuid4().hex[:6]}")
    return {"client": logged_in_client(url, username, password), "url": url, "token": token, "campaign": campaign}


def _api_detail(url: str, token: str, path: str) -> str:
    answer = httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 422, answer.text
    return answer.json()["detail"][0]["msg"]


@pytest.mark.parametrize("query", ["state=BOGUS", "state=BOGUS&tags=batch:1", "state=FAILED&state=BOGUS",
                                   "state=BOGUS&workdir__contains=run"])
def test_an_unknown_state_is_refused_like_the_api(dash: dict, query: str) -> None:
    """Before: 200 "0 matching jobs" (the counts sum to 0, so the page skipped the step that checks the state)."""
    page = dash["client"].get(f"/dashboard/jobs?{query}")
    text = html.unescape(text_of(page.text))
    assert page.status_code == 422, text
    expected = _api_detail(dash["url"], dash["token"], "/jobs/?state=BOGUS")
    assert f"state: {expected}" in text and "got 'BOGUS'" in text
    assert "matching job" not in text  # no count of a query that was refused
    assert 'name="workdir__contains"' in page.text  # the filter form stays, to correct it


@pytest.mark.parametrize("path, where", [
    ("/dashboard/batch-jobs?state=BOGUS", "state: expected one of"),
    ("/dashboard/batch-jobs?page=0", "page: must be >= 1, got 0"),
    ("/dashboard/batch-jobs?site_id=abc", "site_id: expected an integer"),
    ("/dashboard/plots?tags=bad", "tags: expected KEY:VALUE, got 'bad'"),
    ("/dashboard/plots?site_id=abc", "site_id: expected an integer"),
    ("/dashboard/plots/data?site_id=abc", "site_id: expected an integer"),
    ("/dashboard/jobs?site_id=abc", "site_id: expected an integer"),
])
def test_errors_read_as_one_line_not_a_python_structure(dash: dict, path: str, where: str) -> None:
    """Before: "[{'loc': ['query', 'state'], 'msg': ...}]" on the BatchJobs and Plots pages."""
    page = dash["client"].get(path)
    text = html.unescape(text_of(page.text))
    assert page.status_code == 422, text
    assert where in text, text
    assert "'loc'" not in text and "{" not in text.replace("{{", "")
    if path.startswith("/dashboard/batch-jobs"):
        # the page stays, with its filter form, as the jobs page does
        assert 'action="/dashboard/batch-jobs"' in page.text and 'role="alert"' in page.text
        assert "BatchJob" in text and "No matching BatchJobs" not in text


@pytest.mark.parametrize("job_id", ["99999999999999999999", str(2 ** 63), str(2 ** 63 - 1), "0"])
def test_a_job_id_out_of_range_is_not_found(dash: dict, job_id: str) -> None:
    """Before, on PostgreSQL: 422 naming a query parameter 'id' the address does not have."""
    page = dash["client"].get(f"/dashboard/jobs/{job_id}")
    text = html.unescape(text_of(page.text))
    assert page.status_code == 404, text
    assert f"Job {job_id} not found" in text and "id:" not in text

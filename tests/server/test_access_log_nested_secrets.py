"""The access log's redaction (access_guard.redact_request_targets) finds a credential parameter
whatever its spelling (``accessToken``, ``api-key``: names compared lowercased without ``_`` and
``-``) and inside another parameter's value: the dashboard's login redirect copies the whole target
it was sent into ``next``, so ``/dashboard/jobs?access_token=...`` was logged again, encoded, as
``/dashboard/login?next=%2Fdashboard%2Fjobs%3Faccess_token%3D...``."""

from __future__ import annotations

import logging

import httpx
import pytest
from uvicorn.protocols.utils import get_path_with_query_string

from balsam.server.access_guard import ACCESS_LOG_REDACTION

SECRET = "eyJ0.eyJ1.c2ln"


def _access_line(url: str) -> str:
    """The line uvicorn's access log writes for a GET of ``url``, through the redaction every app installs."""
    target = httpx.URL(url)
    scope = {"raw_path": target.raw_path.partition(b"?")[0], "query_string": target.query}
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", get_path_with_query_string(scope), "1.1", 303), None)
    assert ACCESS_LOG_REDACTION.filter(record)
    return record.getMessage()


@pytest.mark.parametrize("url, logged", [
    (f"http://h/jobs/?accessToken={SECRET}", "/jobs/?accessToken=[redacted] "),
    (f"http://h/jobs/?api-key={SECRET}&x=1", "/jobs/?api-key=[redacted]&x=1 "),
    (f"http://h/jobs/?Client-Secret={SECRET}", "/jobs/?Client-Secret=[redacted] "),
    # A secret inside another value: encoded once, twice, or a one-time login link.
    (f"http://h/dashboard/login?next=%2Fjobs%2F%3Fstate%3DRUNNING%26access_token%3D{SECRET}&y=2",
     "/dashboard/login?next=[redacted]&y=2 "),
    (f"http://h/dashboard/login?next=%252Fjobs%253Fpassword%253D{SECRET}", "/dashboard/login?next=[redacted] "),
    (f"http://h/dashboard/login?next=%2Fdashboard%2Fticket%3Ft%3D{SECRET}", "/dashboard/login?next=[redacted] "),
    # Values that carry none stay as they were.
    ("http://h/dashboard/login?next=%2Fdashboard%2Fjobs%3Fstate%3DRUNNING",
     "/dashboard/login?next=%2Fdashboard%2Fjobs%3Fstate%3DRUNNING "),
    ("http://h/jobs/?workdir__contains=a%3Db&tags=token:x", "/jobs/?workdir__contains=a%3Db&tags=token:x "),
])
def test_secret_parameters_of_any_spelling_and_nested_are_redacted(url: str, logged: str) -> None:
    line = _access_line(url)
    assert logged in line and "c2ln" not in line, line


def test_the_login_redirect_of_a_target_with_a_token_is_logged_redacted(tmp_path) -> None:
    """The real redirect: the dashboard sends a browser without a session to its login page with
    the target in ``next``; the browser's GET of that page is logged redacted."""
    from starlette.testclient import TestClient

    from balsam.server.app import create_app
    from balsam.server.settings import ServerSettings

    app = create_app(settings=ServerSettings(database_url=f"sqlite:///{tmp_path / 'b.db'}", secret_key="s" * 40),
                     create_tables_now=True)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        redirect = client.get(f"/dashboard/jobs?state=RUNNING&accessToken={SECRET}", follow_redirects=False)
    location = redirect.headers["location"]
    assert redirect.status_code in (302, 303) and "next=" in location and "c2ln" in location, location
    line = _access_line(str(httpx.URL("http://127.0.0.1/").join(location)))
    assert "next=[redacted]" in line and "c2ln" not in line, line

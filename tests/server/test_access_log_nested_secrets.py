"""The access log's redaction (access_guard.redact_request_targets) finds a credential parameter
whatever its spelling (``accessToken``, ``api-key``: names compared lowercased without ``_`` and
``-``) and inside another parameter's value: the dashboard's login redirect copies the whole target
it was sent into ``next``, so ``/dashboard/jobs?access_token=...`` was logged again, encoded, as
``/dashboard/login?next=%2Fdashboard%2Fjobs%3Faccess_token%3D...``."""

from __future__ import annotations


import httpx
import pytest

from balsam.server import access_guard
from server_testlib import uvicorn_access_line

SECRET = "eyJ0.eyJ1.c2ln"


@pytest.mark.parametrize("url, logged", [
    (f"http://h/jobs/?accessToken={SECRET}", "/jobs/?accessToken=[redacted] "),
    (f"http://h/jobs/?api-key={SECRET}&x=1", "/jobs/?api-key=[redacted]&x=1 "),
    (f"http://h/jobs/?Client-Secret={SECRET}", "/jobs/?Client-Secret=[redacted] "),
    # Any spelling: every character but letters and digits is left out of the name compared.
    (f"http://h/jobs/?access.token={SECRET}", "/jobs/?access.token=[redacted] "),
    (f"http://h/jobs/?token[]={SECRET}", "/jobs/?token[]=[redacted] "),
    (f"http://h/dashboard/login?next=%2Fjobs%3Faccess.token%3D{SECRET}", "/dashboard/login?next=[redacted] "),
    # A secret inside another value: encoded once, twice, or a one-time login link.
    (f"http://h/dashboard/login?next=%2Fjobs%2F%3Fstate%3DRUNNING%26access_token%3D{SECRET}&y=2",
     "/dashboard/login?next=[redacted]&y=2 "),
    (f"http://h/dashboard/login?next=%252Fjobs%253Fpassword%253D{SECRET}", "/dashboard/login?next=[redacted] "),
    (f"http://h/dashboard/login?next=%2Fdashboard%2Fticket%3Ft%3D{SECRET}", "/dashboard/login?next=[redacted] "),
    # Values that carry none stay as they were.
    ("http://h/dashboard/login?next=%2Fdashboard%2Fjobs%3Fstate%3DRUNNING",
     "/dashboard/login?next=%2Fdashboard%2Fjobs%3Fstate%3DRUNNING "),
    ("http://h/jobs/?workdir__contains=a%3Db&tags=token:x", "/jobs/?workdir__contains=a%3Db&tags=token:x "),
    # Ordinary data whose decoded form has a secret's name in it is no request target: left as it is.
    ("http://h/jobs/?tags=note:a%26token%3Dx", "/jobs/?tags=note:a%26token%3Dx "),
    ("http://h/jobs/?workdir__contains=run%3Fpassword%3D1", "/jobs/?workdir__contains=run%3Fpassword%3D1 "),
])
def test_secret_parameters_of_any_spelling_and_nested_are_redacted(url: str, logged: str) -> None:
    line = uvicorn_access_line(url)
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
    line = uvicorn_access_line(str(httpx.URL("http://127.0.0.1/").join(location)))
    assert "next=[redacted]" in line and "c2ln" not in line, line


def _counting_unquote(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Counts the redaction's decoding: its calls of ``unquote`` and the characters they decode."""
    seen = {"calls": 0, "chars": 0}
    real = access_guard.unquote

    def unquote(text: str, *args: object, **kwargs: object) -> str:
        seen["calls"] += 1
        seen["chars"] += len(text)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(access_guard, "unquote", unquote)
    return seen


@pytest.mark.parametrize("unit", ["x=%26%3D%26%3D&", "x=%2526%253D%2526%253D&", "a=%26b%3D%2526c%253D%252526d%25253D&",
                                  "tags=note:a%26token%3Dx&"])
def test_a_long_query_of_ordinary_values_is_not_decoded_further(monkeypatch: pytest.MonkeyPatch, unit: str) -> None:
    """Every request's access line is redacted in the event loop, an unauthenticated one's too: a
    value that is no request target (``/...``) is never decoded looking for a secret inside it,
    so a 15,500-character query costs a pass over its names, not a decode of each value's parts."""
    query = (unit * (15_500 // len(unit) + 1))[:15_500]
    seen = _counting_unquote(monkeypatch)
    line = uvicorn_access_line(f"http://h/jobs/?{query}")
    assert query in line
    assert seen["calls"] <= 2 and seen["chars"] <= 20, seen  # the path, once


def test_the_nested_decode_of_one_line_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values that are request targets are decoded up to a budget of characters per line (16 KiB);
    past it they are redacted undecoded, so a line of many costs no more than the budget."""
    query = "&".join(f"next=%2Fjobs%3Fstate%3D{i}%26token%3D{SECRET}" for i in range(3_000))  # 156 KB
    seen = _counting_unquote(monkeypatch)
    line = access_guard.redact_request_targets(f'127.0.0.1:5000 - "GET /dashboard/login?{query} HTTP/1.1" 401')
    assert "c2ln" not in line and line.count("next=[redacted]") == 3_000, line[:300]
    assert seen["chars"] <= 5 * 16_384, (seen, len(query))

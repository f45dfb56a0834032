"""Every answer to a one-time login link (``/dashboard/ticket?t=...``) is sent with
``Referrer-Policy: no-referrer``, the database-error page included: the page's address holds the
ticket, perhaps not yet redeemed, and its stylesheet, script and links must not repeat it in a
Referer (a reverse proxy's access log records those). The server runs in this process so that the
ticket's database read can be made to fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import sqlalchemy as sa

SECRET = "dashboard-ticket-referrer-secret-0123456789-abcdef"
OUTAGE = sa.exc.OperationalError("SELECT users.id FROM users", {}, Exception("could not connect to server (db-host-7)"))


def test_a_ticket_page_answered_by_a_database_error_sends_no_referrer(
        tmp_path: Path, serve_in_process: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the database-error page (503) of an unredeemed ticket sent ``same-origin``."""
    from balsam.server.app import create_app
    from balsam.server.auth import AuthUser
    from balsam.server.dashboard import session as sessions
    from balsam.server.dashboard import views
    from balsam.server.settings import ServerSettings

    url = serve_in_process(create_app(settings=ServerSettings(
        database_url=f"sqlite:///{tmp_path / 'balsam.db'}", secret_key=SECRET), create_tables_now=True))
    # A well-formed ticket (as `balsam dashboard` gets one) for a user this database has not got.
    link = url + "/dashboard/ticket?" + urlencode({"t": sessions.issue_ticket(AuthUser(id=7, username="u7"), SECRET)})

    def outage(*_args: Any, **_kwargs: Any) -> bool:
        raise OUTAGE

    monkeypatch.setattr(views, "_user_exists", outage)
    page = httpx.get(link)
    assert page.status_code == 503 and page.headers["content-type"].startswith("text/html"), page.text
    assert page.headers.get("retry-after") == "5"  # the outage's own page
    assert page.headers["referrer-policy"] == "no-referrer"
    monkeypatch.undo()
    refused = httpx.get(link)  # the database back: the link is refused (no such user), with no Referer either
    assert (refused.status_code, refused.headers["referrer-policy"]) == (401, "no-referrer")
    assert "This login link is invalid or has expired" in refused.text

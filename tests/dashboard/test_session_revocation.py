"""A dashboard session ends with its credential: ``balsam server revoke --user`` (Admin.revoke), a
new password (Admin.set_password), revoking the session's own ``dashboard`` credential, logging out.

Before, the session cookie was a stand-alone signed token: a page checked only that its user
existed, so a stolen cookie (or a browser left logged in) kept working for up to 7 days whatever
the administrator revoked or reset."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import hidden_field, logged_in_client, make_campaign  # noqa: E402


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, live_server_factory: Any) -> Any:
    """A server that trusts a checked credential for no time (the default, 5 s, makes a revocation
    made by another process count within 5 s; within the revoking process it counts at once)."""
    return live_server_factory(request.param, env={"BALSAM_AUTH_REVOCATION_CACHE_SEC": "0"})


def _user(server: Any, register: Any) -> dict[str, Any]:
    username, password, _user_id, token, _ = register(server.url)
    campaign = make_campaign(server.url, token, n_jobs=2, name=f"rev-{uuid.uuid4().hex[:6]}")
    return {"username": username, "password": password, "token": token, "job": campaign["jobs"][0]["id"]}


def _page_status(url: str, cookie: str, path: str = "/dashboard/") -> int:
    """The status of a page asked for with this session cookie alone (a stolen copy of it)."""
    with httpx.Client(base_url=url, cookies={"balsam_dashboard": cookie}, timeout=30) as browser:
        return browser.get(path, follow_redirects=False).status_code


def test_admin_revoke_ends_the_dashboard_session(server: Any, register: Any) -> None:
    from balsam.server.admin import Admin

    alice = _user(server, register)
    browser = logged_in_client(server.url, alice["username"], alice["password"])
    cookie = browser.cookies.get("balsam_dashboard")
    job_page = f"/dashboard/jobs/{alice['job']}"
    assert _page_status(server.url, cookie, job_page) == 200
    with Admin(server.database_url) as admin:
        assert admin.revoke(username=alice["username"])  # her API login and her dashboard session
    assert _page_status(server.url, cookie, job_page) == 303  # to the login page
    assert browser.get(job_page, follow_redirects=False).headers["location"].startswith("/dashboard/login")
    assert _page_status(server.url, cookie, "/dashboard/plots/data") == 401
    # Logging in again works.
    again = logged_in_client(server.url, alice["username"], alice["password"])
    assert again.get(job_page).status_code == 200


def test_a_new_password_ends_the_dashboard_sessions(server: Any, register: Any) -> None:
    from balsam.server.admin import Admin

    bob = _user(server, register)
    cookie = logged_in_client(server.url, bob["username"], bob["password"]).cookies.get("balsam_dashboard")
    link = httpx.post(f"{server.url}/dashboard/login-link", headers={"Authorization": f"Bearer {bob['token']}"}).json()
    from_link = httpx.get(f"{server.url}{link['path']}", follow_redirects=False)
    link_cookie = from_link.cookies.get("balsam_dashboard")
    assert _page_status(server.url, cookie) == 200 and _page_status(server.url, link_cookie) == 200
    with Admin(server.database_url) as admin:
        admin.set_password(bob["username"], "a brand new password 123", 12)
    assert _page_status(server.url, cookie) == 303 and _page_status(server.url, link_cookie) == 303
    # His API login is not a dashboard session: it stays (only `revoke` ends it).
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {bob['token']}"}, timeout=30)
    assert api.get("/jobs/").status_code == 200
    assert logged_in_client(server.url, bob["username"], "a brand new password 123").get("/dashboard/").status_code == 200
    api.close()


def test_a_session_is_a_credential_its_user_can_revoke_and_logout_revokes(server: Any, register: Any) -> None:
    carol = _user(server, register)
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {carol['token']}"}, timeout=30)
    first = logged_in_client(server.url, carol["username"], carol["password"])
    second = logged_in_client(server.url, carol["username"], carol["password"])
    sessions = api.get("/auth/credentials", params={"kind": "dashboard", "active": "true"}).json()["results"]
    assert len(sessions) == 2 and all(s["label"].startswith("dashboard password login") for s in sessions)
    # Revoking the first session's credential ends that session only.
    assert api.delete(f"/auth/credentials/{sessions[0]['id']}").status_code == 204
    assert first.get("/dashboard/", follow_redirects=False).status_code == 303
    page = second.get("/dashboard/")
    assert page.status_code == 200
    # Logging out revokes the session's credential: a copy of the cookie stops working too.
    copy = second.cookies.get("balsam_dashboard")
    answer = second.post("/dashboard/logout", data={"csrf_token": hidden_field(page.text, "csrf_token")},
                         follow_redirects=False)
    assert answer.status_code == 303
    assert _page_status(server.url, copy) == 303
    assert api.get("/auth/credentials", params={"kind": "dashboard", "active": "true"}).json()["count"] == 0
    api.close()

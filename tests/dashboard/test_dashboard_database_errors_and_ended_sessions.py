"""A database error on a dashboard page is a page (HTML, the server's words, never the database's
message nor JSON), and a browser whose session has ended is told so on the login page. The server
runs in this process (a real uvicorn in a thread) so that a page's database read can be made to fail."""

from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import logged_in_client, login, make_campaign, text_of  # noqa: E402

SECRET = "dashboard-db-errors-secret-0123456789-abcdefghij"


@pytest.fixture
def dash(database_url: str, register: Any, serve_in_process: Any) -> Iterator[dict[str, Any]]:
    from balsam.server.app import create_app
    from balsam.server.settings import ServerSettings

    url = serve_in_process(create_app(settings=ServerSettings(database_url=database_url, registration="open", secret_key=SECRET),
                                      create_tables_now=True))
    username, password, _user_id, token, _ = register(url)
    make_campaign(url, token, n_jobs=2, name="dberr")
    client = logged_in_client(url, username, password)
    yield {"url": url, "client": client, "username": username, "password": password, "token": token}
    client.close()


def _fail_with(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    """The Sites and Jobs pages' first database read raises ``exc``."""
    from balsam.server import job_counts, jobs_logic

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(job_counts, "counts_by_site_state", broken)
    monkeypatch.setattr(jobs_logic, "count_jobs_by_state", broken)


OUTAGE = sa.exc.OperationalError("SELECT jobs.id FROM jobs", {}, Exception("could not connect to server: Connection refused (db-host-7)"))
OUR_FAULT = sa.exc.OperationalError("SELECT nope FROM jobs", {}, Exception("no such column: nope (secret-schema-detail)"))


@pytest.mark.parametrize("path", ["/dashboard/", "/dashboard/jobs"])
def test_a_database_outage_is_a_page_that_says_so(dash: dict, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Before: the API's JSON (``{"detail": "The database is unavailable; retry shortly"}``) in the
    browser's window, with no way back to the dashboard."""
    _fail_with(monkeypatch, OUTAGE)
    page = dash["client"].get(path)
    assert page.status_code == 503, page.text
    assert page.headers["content-type"].startswith("text/html"), page.headers["content-type"]
    assert page.headers.get("retry-after") == "5"  # the API's own answer to an outage, kept
    assert "frame-ancestors 'none'" in page.headers.get("content-security-policy", "")
    text = html.unescape(text_of(page.text))
    assert "The database is unavailable; retry shortly" in text and "Reload the page" in text, text
    assert "Connection refused" not in text and "db-host-7" not in text and "SELECT" not in text
    assert 'href="/dashboard/"' in page.text  # a way back


def test_a_database_fault_of_ours_is_a_page_without_its_details(dash: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: JSON ``{"detail": "Internal server error (OperationalError); see the server log"}``."""
    _fail_with(monkeypatch, OUR_FAULT)
    page = dash["client"].get("/dashboard/jobs")
    assert page.status_code == 500, page.text
    assert page.headers["content-type"].startswith("text/html")
    text = html.unescape(text_of(page.text))
    assert "Internal server error (OperationalError); see the server log" in text, text
    assert "secret-schema-detail" not in text and "no such column" not in text and "Traceback" not in page.text


def test_another_fault_is_a_page_without_its_details(dash: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """(Kept as it was: a page that fails says so, naming only the kind of error.)"""
    _fail_with(monkeypatch, RuntimeError("secret-internal-detail"))
    page = dash["client"].get("/dashboard/")
    assert page.status_code == 500 and page.headers["content-type"].startswith("text/html")
    text = html.unescape(text_of(page.text))
    assert "This page failed (RuntimeError)" in text
    assert "secret-internal-detail" not in text and "Traceback" not in page.text


def test_an_ended_session_is_named_on_the_login_page(dash: dict) -> None:
    """Before: a browser whose session had ended (logged out in another tab, revoked, expired) was
    sent to a bare login form, nothing saying why, and kept sending the dead cookie."""
    client = dash["client"]
    cookie = client.cookies.get("balsam_dashboard")
    assert cookie
    api = httpx.Client(base_url=dash["url"], headers={"Authorization": f"Bearer {dash['token']}"}, timeout=30)
    creds = api.get("/auth/credentials", params={"kind": "dashboard"})
    assert creds.status_code == 200, creds.text
    assert creds.json()["results"]
    for cred in creds.json()["results"]:
        assert api.delete(f"/auth/credentials/{cred['id']}").status_code in (200, 204)
    answer = client.get("/dashboard/jobs?state=FAILED", follow_redirects=False)
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert location.startswith("/dashboard/login?next=") and "ended=1" in location
    page = client.get(location)
    text = html.unescape(text_of(page.text))
    assert "Your dashboard session has ended" in text and "log in again" in text, text
    # logging in from there goes back to the page that was asked for
    again = login(client, dash["username"], dash["password"], next_url="/dashboard/jobs?state=FAILED")
    assert again.status_code == 303 and again.headers["location"] == "/dashboard/jobs?state=FAILED"
    # a browser that never logged in is asked to, without being told of a session it never had
    fresh = httpx.Client(base_url=dash["url"], timeout=30)
    first = fresh.get("/dashboard/jobs", follow_redirects=True)
    fresh_text = html.unescape(text_of(first.text))
    assert first.status_code == 200 and "Log in to see that page." in fresh_text and "has ended" not in fresh_text


def test_two_login_forms_open_at_once_both_work(dash: dict) -> None:
    """Before: each login form set a new nonce cookie, so the form opened first answered "The login
    form expired" (two tabs sent to log in when their session ended)."""
    from dashboard_helpers import hidden_field

    browser = httpx.Client(base_url=dash["url"], timeout=30)
    first = hidden_field(browser.get("/dashboard/login?next=/dashboard/jobs").text, "login_token")
    second = hidden_field(browser.get("/dashboard/login?next=/dashboard/plots").text, "login_token")
    answer = browser.post("/dashboard/login", data={"username": dash["username"], "password": dash["password"],
                                                    "login_token": first, "next": "/dashboard/jobs"})
    assert answer.status_code == 303 and answer.headers["location"] == "/dashboard/jobs", answer.text
    # the other form, sent after that login: on to its page (no second session needed)
    answer = browser.post("/dashboard/login", data={"username": dash["username"], "password": dash["password"],
                                                    "login_token": second, "next": "/dashboard/plots"})
    assert answer.status_code == 303 and answer.headers["location"] == "/dashboard/plots", answer.text
    # a form without the nonce and without a session is still refused (login CSRF)
    stranger = httpx.Client(base_url=dash["url"], timeout=30)
    refused = stranger.post("/dashboard/login", data={"username": dash["username"], "password": dash["password"],
                                                      "login_token": first, "next": "/dashboard/jobs"})
    assert refused.status_code == 403 and "balsam_dashboard=" not in refused.headers.get("set-cookie", "")


CONFLICT = sa.exc.IntegrityError("INSERT INTO jobs", {}, Exception('duplicate key value violates unique constraint '
                                                                    '"secret_constraint_7" DETAIL: Key (workdir)=(w/1)'))
NOT_STORED = sa.exc.DataError("UPDATE jobs", {}, Exception("value too long for type character varying(9) "
                                                           "(secret-column-detail)"))


@pytest.mark.parametrize("exc, status, said", [
    (CONFLICT, 409, "The change conflicts with existing data (IntegrityError)"),
    (NOT_STORED, 422, "A value cannot be stored (DataError)"),
])
def test_a_conflict_or_a_value_not_stored_is_a_page_naming_only_the_kind(dash: dict, monkeypatch: pytest.MonkeyPatch,
                                                                         exc: Exception, status: int, said: str) -> None:
    """Before: the page showed the API's detail, which ends with the database's first line (a
    constraint's name, a key's value, a column's type), where docs/dashboard.md says a page names
    only the kind of error. (The API's JSON answer is the server's handlers', not changed here.)"""
    _fail_with(monkeypatch, exc)
    page = dash["client"].get("/dashboard/jobs")
    assert page.status_code == status and page.headers["content-type"].startswith("text/html"), page.text
    text = html.unescape(text_of(page.text))
    assert said in text and "the server log has the details" in text, text
    for secret in ("secret_constraint_7", "duplicate key", "w/1", "secret-column-detail", "character varying"):
        assert secret not in text, text


def test_an_older_login_form_logs_in_only_as_the_session_user(dash: dict, register: Any) -> None:
    """Before: a login form opened before another tab logged in (its nonce gone with that login)
    redirected to the dashboard whatever it was sent with: another account's username and
    password, or a wrong password, landed on the logged-in user's pages without a word. Now only
    that user, with their password, goes on to the page; another account is told who is logged in
    (and the form comes back with a nonce that works); a wrong password is refused."""
    from dashboard_helpers import hidden_field

    other, other_password, *_ = register(dash["url"])
    browser = httpx.Client(base_url=dash["url"], timeout=30)
    older = hidden_field(browser.get("/dashboard/login?next=/dashboard/jobs").text, "login_token")
    newer = hidden_field(browser.get("/dashboard/login").text, "login_token")
    logged = browser.post("/dashboard/login", data={"username": dash["username"], "password": dash["password"],
                                                    "login_token": newer, "next": ""})
    assert logged.status_code == 303, logged.text
    session_cookie = browser.cookies.get("balsam_dashboard")

    answer = browser.post("/dashboard/login", data={"username": other, "password": other_password,
                                                    "login_token": older, "next": "/dashboard/jobs"})
    assert answer.status_code == 409, (answer.status_code, answer.headers.get("location"))
    text = html.unescape(text_of(answer.text))
    assert f"You are logged in as {dash['username']} in this browser" in text and "log out first" in text, text
    assert "balsam_dashboard=" not in answer.headers.get("set-cookie", "")
    fresh = hidden_field(answer.text, "login_token")
    assert fresh and fresh != older and browser.cookies.get("balsam_dashboard_login") == fresh
    assert browser.cookies.get("balsam_dashboard") == session_cookie

    wrong = browser.post("/dashboard/login", data={"username": dash["username"], "password": "not-the-password",
                                                   "login_token": older, "next": "/dashboard/jobs"})
    assert wrong.status_code == 401, (wrong.status_code, wrong.headers.get("location"))
    assert "balsam_dashboard=" not in wrong.headers.get("set-cookie", "")

    right = browser.post("/dashboard/login", data={"username": dash["username"], "password": dash["password"],
                                                   "login_token": older, "next": "/dashboard/jobs"})
    assert right.status_code == 303 and right.headers["location"] == "/dashboard/jobs", right.text


def test_a_login_form_sent_from_another_site_is_refused(dash: dict) -> None:
    """Before: a login POST whose Origin named another site logged in (with a valid nonce) or, with
    a session, was redirected without a look at what it carried. A missing Origin is still taken
    (a browser or a proxy may leave it out)."""
    from dashboard_helpers import hidden_field

    browser = httpx.Client(base_url=dash["url"], timeout=30)
    nonce = hidden_field(browser.get("/dashboard/login").text, "login_token")
    form = {"username": dash["username"], "password": dash["password"], "login_token": nonce, "next": ""}
    refused = browser.post("/dashboard/login", data=form, headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403 and "balsam_dashboard=" not in refused.headers.get("set-cookie", ""), refused.text
    assert "sent from another site" in html.unescape(text_of(refused.text))
    with_session = httpx.Client(base_url=dash["url"], cookies=dash["client"].cookies, timeout=30)
    refused = with_session.post("/dashboard/login", data={"username": "x"}, headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403, (refused.status_code, refused.headers.get("location"))
    same_site = browser.post("/dashboard/login", data=form, headers={"Origin": dash["url"]})
    assert same_site.status_code == 303, same_site.text

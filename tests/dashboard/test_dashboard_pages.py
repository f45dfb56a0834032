"""The dashboard on a real uvicorn server, read as a browser would (plain HTTP; tests/site has the
headless-Chromium test): login and sessions, CSRF, per-user isolation, every page, paging."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import hidden_field, logged_in_client, login, make_campaign, text_of  # noqa: E402


@pytest.fixture
def two_users(live_server: str, register: Any) -> dict[str, Any]:
    users = {}
    for who in ("alice", "bob"):
        username, password, user_id, token, _ = register(live_server)
        users[who] = {"username": username, "password": password, "token": token,
                      "campaign": make_campaign(live_server, token, name=f"{who}-{uuid.uuid4().hex[:6]}")}
    return users


def test_login_required_and_redirect_back(live_server: str, two_users: dict) -> None:
    anon = httpx.Client(base_url=live_server, timeout=30)
    answer = anon.get("/dashboard/jobs?state=FAILED", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/dashboard/login?next=")
    assert anon.get("/dashboard", follow_redirects=False).headers["location"] == "/dashboard/"
    alice = two_users["alice"]
    answer = login(anon, alice["username"], alice["password"], next_url="/dashboard/jobs?state=FAILED")
    assert answer.status_code == 303 and answer.headers["location"] == "/dashboard/jobs?state=FAILED"
    cookie = answer.headers["set-cookie"]
    assert "balsam_dashboard=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")
    assert "Path=/dashboard" in cookie
    page = anon.get("/dashboard/jobs?state=FAILED")
    assert page.status_code == 200 and alice["username"] in page.text
    # an open redirect is refused: the next page must be inside the dashboard
    answer = login(httpx.Client(base_url=live_server), alice["username"], alice["password"], next_url="https://evil.example/")
    assert answer.headers["location"] == "/dashboard/"


def test_wrong_password_and_login_csrf(live_server: str, two_users: dict) -> None:
    alice = two_users["alice"]
    client = httpx.Client(base_url=live_server, timeout=30)
    answer = login(client, alice["username"], "not-the-password")
    assert answer.status_code == 401 and "Incorrect username or password" in answer.text
    assert "balsam_dashboard=" not in answer.headers.get("set-cookie", "")
    # a POST without the form's nonce (a cross-site login form) is refused
    fresh = httpx.Client(base_url=live_server, timeout=30)
    answer = fresh.post("/dashboard/login", data={"username": alice["username"], "password": alice["password"]})
    assert answer.status_code == 403 and "balsam_dashboard=" not in answer.headers.get("set-cookie", "")


def test_security_headers_and_csrf_on_logout(live_server: str, two_users: dict) -> None:
    alice = two_users["alice"]
    client = logged_in_client(live_server, alice["username"], alice["password"])
    page = client.get("/dashboard/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    token = hidden_field(page.text, "csrf_token")
    # no token, a wrong token, or a foreign Origin: refused, still logged in
    assert client.post("/dashboard/logout", data={}).status_code == 403
    assert client.post("/dashboard/logout", data={"csrf_token": "x" + token}).status_code == 403
    assert client.post("/dashboard/logout", data={"csrf_token": token},
                       headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.get("/dashboard/", follow_redirects=False).status_code == 200
    answer = client.post("/dashboard/logout", data={"csrf_token": token}, follow_redirects=False)
    assert answer.status_code == 303
    assert client.get("/dashboard/", follow_redirects=False).status_code == 303


def test_cookie_and_bearer_token_are_not_interchangeable(live_server: str, two_users: dict) -> None:
    alice = two_users["alice"]
    client = logged_in_client(live_server, alice["username"], alice["password"])
    cookie = client.cookies.get("balsam_dashboard")
    assert httpx.get(f"{live_server}/jobs/", headers={"Authorization": f"Bearer {cookie}"}).status_code == 401
    forged = httpx.Client(base_url=live_server, cookies={"balsam_dashboard": alice["token"]})
    assert forged.get("/dashboard/", follow_redirects=False).status_code == 303
    tampered = httpx.Client(base_url=live_server, cookies={"balsam_dashboard": cookie[:-2] + "xx"})
    assert tampered.get("/dashboard/", follow_redirects=False).status_code == 303


def test_pages_show_only_the_users_own_records(live_server: str, two_users: dict) -> None:
    alice, bob = two_users["alice"], two_users["bob"]
    client = logged_in_client(live_server, alice["username"], alice["password"])
    own, other = alice["campaign"], bob["campaign"]
    sites = text_of(client.get("/dashboard/").text)
    assert own["site"]["name"] in sites and other["site"]["name"] not in sites
    jobs = client.get("/dashboard/jobs")
    assert jobs.status_code == 200
    assert f'href="/dashboard/jobs/{own["failed"]}"' in jobs.text
    assert f'href="/dashboard/jobs/{other["failed"]}"' not in jobs.text
    assert "5 matching jobs" in text_of(jobs.text)
    # another user's job, site filter or plot data: nothing
    assert client.get(f"/dashboard/jobs/{other['failed']}").status_code == 404
    assert "0 matching jobs" in text_of(client.get(f"/dashboard/jobs?site_id={other['site']['id']}").text)
    data = client.get(f"/dashboard/plots/data?site_id={other['site']['id']}").json()
    assert data["summary"]["busy_now"] == 0 and data["utilization"]["t"] == []
    own_data = client.get("/dashboard/plots/data").json()
    assert own_data["utilization"]["busy"] == [1, 0]  # alice's failed job ran on one node, bob's is not counted


def test_job_page_shows_error_history_and_output_path(live_server: str, two_users: dict) -> None:
    alice = two_users["alice"]
    client = logged_in_client(live_server, alice["username"], alice["password"])
    campaign = alice["campaign"]
    page = client.get(f"/dashboard/jobs/{campaign['failed']}")
    text = text_of(page.text)
    assert page.status_code == 200
    assert "ValueError: bad mesh 42" in text and "Return code 3" in text
    assert f"/tmp/{campaign['site']['name']}/data/run/0/job.out" in text
    for state in ("STAGED_IN", "PREPROCESSED", "RUNNING", "RUN_ERROR", "FAILED"):
        assert state in text
    assert client.get("/dashboard/jobs/999999999").status_code == 404


def test_jobs_filters_counts_and_keyset_paging(live_server: str, register: Any) -> None:
    username, password, _, token, _ = register(live_server)
    campaign = make_campaign(live_server, token, n_jobs=12)
    client = logged_in_client(live_server, username, password)
    ids = sorted(j["id"] for j in campaign["jobs"])
    first = client.get("/dashboard/jobs?limit=5")
    shown = [int(x) for x in re.findall(r'href="/dashboard/jobs/(\d+)"', first.text)]
    assert shown == ids[::-1][:5]  # newest first
    older = re.search(r'href="([^"]+)" rel="next"', first.text).group(1).replace("&amp;", "&")
    second = client.get(older)
    shown2 = [int(x) for x in re.findall(r'href="/dashboard/jobs/(\d+)"', second.text)]
    assert shown2 == ids[::-1][5:10]
    newer = re.search(r'href="([^"]+)" rel="prev"', second.text).group(1).replace("&amp;", "&")
    back = client.get(newer)
    assert [int(x) for x in re.findall(r'href="/dashboard/jobs/(\d+)"', back.text)] == shown
    # counts by state stay for the other filters; the state filter narrows the list
    failed = client.get("/dashboard/jobs?state=FAILED")
    text = text_of(failed.text)
    assert "1 matching job " in text + " " and "STAGED_IN 11" in text and "FAILED 1" in text
    tagged_page = client.get("/dashboard/jobs?tags=batch:1")
    tagged = text_of(tagged_page.text)
    assert "6 matching jobs" in tagged and "at least" not in tagged  # one tag: exact, from the per-tag counters
    assert 'id="counts-partial"' not in tagged_page.text
    bad = client.get("/dashboard/jobs?tags=nocolon")
    assert bad.status_code == 422 and "expected KEY:VALUE" in bad.text


def test_batch_jobs_and_sites_pages(live_server: str, register: Any) -> None:
    username, password, _, token, _ = register(live_server)
    campaign = make_campaign(live_server, token, n_jobs=2)
    api = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    site_id = campaign["site"]["id"]
    api.put(f"/sites/{site_id}", json={
        "backfill_windows": {"debug": [{"num_nodes": 7, "wall_time_min": 33}]},
        "queued_jobs": {"4242": {"scheduler_id": 4242, "state": "queued", "queue": "debug", "num_nodes": 2,
                                 "wall_time_min": 10, "project": "p", "time_remaining_min": 10, "queued_time_min": 3,
                                 "message": "Priority"}},
    }).raise_for_status()
    bj = api.post("/batch-jobs/", json={"site_id": site_id, "num_nodes": 2, "wall_time_min": 10, "job_mode": "mpi",
                                        "queue": "debug", "project": "p", "filter_tags": {"batch": "1"}}).json()
    api.patch("/batch-jobs/", json=[{"id": bj["id"], "state": "queued", "scheduler_id": 4242,
                                     "status_info": {"scheduler_reason": "Priority"}}]).raise_for_status()
    client = logged_in_client(live_server, username, password)
    sites = text_of(client.get("/dashboard/").text)
    assert "Priority" in sites and "4242" in sites and "debug 7 33" in sites
    page = client.get(f"/dashboard/batch-jobs?site_id={site_id}")
    text = text_of(page.text)
    assert page.status_code == 200 and "1 BatchJob " in text + " " and "scheduler_reason : Priority" in text
    assert "queued" in text and "batch=1" in text
    assert client.get("/dashboard/batch-jobs?state=nonsense").status_code == 422


def test_one_time_link_from_the_cli(live_server: str, balsam_env: Any) -> None:
    from click.testing import CliRunner

    from balsam._api.model import reset_default_client
    from balsam.cli import main

    reset_default_client()
    result = CliRunner().invoke(main, ["dashboard"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    link = next(line.strip() for line in result.output.splitlines() if "/dashboard/ticket?t=" in line)
    assert link.startswith(live_server)
    assert "ssh -L" in result.output  # the server listens on 127.0.0.1: how to reach it from a laptop
    browser = httpx.Client(timeout=30)
    answer = browser.get(link, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/dashboard/"
    page = browser.get(f"{live_server}/dashboard/")
    assert page.status_code == 200 and balsam_env.username in page.text
    # a ticket is not a session, and a garbled one is refused
    assert httpx.get(link.replace("t=", "t=x"), follow_redirects=False).status_code == 401
    assert httpx.Client(base_url=live_server, cookies={"balsam_dashboard": link.split("t=")[1]}).get(
        "/dashboard/", follow_redirects=False).status_code == 303
    # without a bearer token there is no link
    assert httpx.post(f"{live_server}/dashboard/login-link").status_code == 401


def test_a_login_link_works_once(live_server: str, two_users: dict) -> None:
    """Before: a link opened any number of times within its two minutes, each time a new 8 h session."""
    alice = two_users["alice"]
    api = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {alice['token']}"}, timeout=30)
    path = api.post("/dashboard/login-link").json()["path"]
    first = httpx.Client(base_url=live_server, timeout=30).get(path, follow_redirects=False)
    assert first.status_code == 303 and "balsam_dashboard=" in first.headers["set-cookie"]
    again = httpx.Client(base_url=live_server, timeout=30).get(path, follow_redirects=False)
    assert again.status_code == 401 and "balsam_dashboard=" not in again.headers.get("set-cookie", "")
    assert "already been used" in text_of(again.text) and 'href="/dashboard/login"' in again.text
    # a new link works (once) again
    fresh = api.post("/dashboard/login-link").json()["path"]
    assert httpx.Client(base_url=live_server, timeout=30).get(fresh, follow_redirects=False).status_code == 303


def test_a_launcher_credential_gets_no_login_link(live_server: str, two_users: dict) -> None:
    """A site-scoped launcher credential is good for its site only and mints nothing: before, it got
    a login link to a session over all the user's sites that outlived the credential's revocation."""
    alice = two_users["alice"]
    api = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {alice['token']}"}, timeout=30)
    cred = api.post("/auth/credentials", json={"site_id": alice["campaign"]["site"]["id"], "ttl_sec": 3600})
    assert cred.status_code == 201, cred.text
    launcher = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {cred.json()['access_token']}"},
                            timeout=30)
    assert launcher.get("/jobs/").status_code == 200  # the credential works, for its site
    answer = launcher.post("/dashboard/login-link")
    assert answer.status_code == 403, answer.text
    assert "limited to site" in answer.json()["detail"] and "ticket" not in answer.json()
    assert api.post("/dashboard/login-link").status_code == 200  # the user's own login still gets one


def test_static_files_and_unknown_pages(live_server: str) -> None:
    js = httpx.get(f"{live_server}/dashboard/static/vendor/uplot/uPlot.iife.min.js")
    assert js.status_code == 200 and "uPlot" in js.text[:2000]
    missing = httpx.get(f"{live_server}/dashboard/no-such-page", follow_redirects=False)
    assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]
    api_missing = httpx.get(f"{live_server}/no-such-route")
    assert api_missing.status_code == 404 and api_missing.json()["detail"].startswith("Not found")


def test_a_huge_form_post_is_refused_before_any_login(live_server: str) -> None:
    """Form bodies are read before the session check: they are bounded (413), not buffered whole."""
    anon = httpx.Client(base_url=live_server, timeout=30)
    answer = anon.post("/dashboard/login", content=b"username=" + b"a" * 200_000,
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 413
    small = anon.post("/dashboard/login", data={"username": "x", "password": "y"})
    assert small.status_code == 403  # an ordinary form still reaches its checks (no login nonce here)

"""Login throttling that nobody can turn against another user, a password reset that ends the old
sessions, and launcher credentials that cannot redirect their site's transfers.

Before: 10 failed logins for user A from anywhere locked A out for 15 min (429 even with the right
password), and 50 from one address locked out everybody behind it (a login node, a NAT); ``balsam
server set-password`` revoked only dashboard sessions (old access and refresh tokens kept working);
a launcher credential could ``PUT /sites/{own}`` with ``transfer_locations`` or
``globus_endpoint_id`` and send the site's stage-ins and stage-outs elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from typing import Any, Iterator

import httpx
import pytest

from balsam.server.auth import LoginThrottle

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def throttled_server(live_server_factory: Any) -> Any:
    """Small limits (3 failures per user name and address, 6 per address); revocations seen at once."""
    return live_server_factory("sqlite", env={"BALSAM_AUTH_MAX_FAILURES_PER_USER": "3",
                                              "BALSAM_AUTH_MAX_FAILURES_PER_ADDRESS": "6",
                                              "BALSAM_AUTH_FAILURE_WINDOW_SEC": "600",
                                              "BALSAM_AUTH_REVOCATION_CACHE_SEC": "0"})


@pytest.fixture
def from_address() -> Iterator[Any]:
    """``from_address("127.0.0.N") -> httpx.Client`` connecting from that loopback address (the
    server sees it as the client address: a different machine, for the throttle)."""
    clients: list[httpx.Client] = []

    def make(address: str) -> httpx.Client:
        client = httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=60)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def _user(server: Any) -> str:
    from balsam.server.admin import Admin

    name = f"u-{uuid.uuid4().hex[:8]}"
    with Admin(server.database_url) as admin:
        admin.add_user(name, PASSWORD, 12)
    return name


def _login(client: httpx.Client, url: str, name: str, password: str = PASSWORD, **extra: str) -> httpx.Response:
    return client.post(f"{url}/auth/password/login", data={"username": name, "password": password, **extra})


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- login throttling -------------------------------------------------------------------------------


def test_failures_from_another_address_do_not_lock_the_user_out(throttled_server, from_address):
    url, victim = throttled_server.url, _user(throttled_server)
    attacker, home = from_address("127.0.0.2"), from_address("127.0.0.1")
    assert [_login(attacker, url, victim, "wrong guess").status_code for _ in range(3)] == [401, 401, 401]
    # The attacker's address is refused for this user name, even with the right password ...
    refused = _login(attacker, url, victim)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    assert "Too many failed logins" in refused.json()["detail"]
    # ... the user, elsewhere, is not (before: 429 "try again in 600 s").
    ok = _login(home, url, victim)
    assert ok.status_code == 200, ok.text


def test_failures_on_other_names_do_not_lock_out_an_address(throttled_server, from_address):
    url = throttled_server.url
    regular, newcomer = _user(throttled_server), _user(throttled_server)
    login_node = from_address("127.0.0.3")
    assert _login(login_node, url, regular).status_code == 200  # logs in from here: a known address
    # Somebody on the same login node sprays guesses over user names, up to the address's limit.
    assert [_login(login_node, url, f"nobody-{uuid.uuid4().hex[:6]}", "x" * 12).status_code
            for _ in range(6)] == [401] * 6
    # Further names get one try each from this address, no more: guessing stays bounded.
    name = f"nobody-{uuid.uuid4().hex[:6]}"
    assert [_login(login_node, url, name, "y" * 12).status_code for _ in range(2)] == [401, 429]
    # A user who never failed here still logs in with the right password (before: 429) ...
    assert _login(login_node, url, newcomer).status_code == 200
    # ... and one who logged in from here before keeps the normal limit (3) for typos.
    assert [_login(login_node, url, regular, "typo typo typo").status_code for _ in range(2)] == [401, 401]
    assert _login(login_node, url, regular).status_code == 200


def test_throttle_bounds_per_account_across_addresses():
    now = [0.0]
    throttle = LoginThrottle(10, 50, 900, clock=lambda: now[0])
    assert (throttle.account_soft, throttle.account_hard) == (50, 200)
    throttle.record_success("alice", "10.0.0.1")  # alice's usual address
    # A distributed guesser: 5 failures from each of 10 addresses (under every per-address limit).
    for i in range(10):
        for _ in range(5):
            throttle.record_failure("alice", f"192.0.2.{i}")
    # Account over its soft limit: slowed, not locked. A fresh address gets one try; an address
    # that failed already is refused; alice's own address is untouched.
    assert throttle.retry_after("alice", "198.51.100.1") is None
    assert 900 <= throttle.retry_after("alice", "192.0.2.0") <= 990  # counted in slots of window/10
    assert throttle.retry_after("alice", "10.0.0.1") is None
    # Account over its hard limit (200 in the window): only addresses alice logged in from may try.
    for i in range(150):
        throttle.record_failure("alice", f"203.0.113.{i}")
    assert 900 <= throttle.retry_after("alice", "198.51.100.1") <= 990
    assert throttle.retry_after("alice", "10.0.0.1") is None
    assert throttle.retry_after("bob", "198.51.100.1") is None  # other accounts are not concerned
    # Everything ages out with the window; a known address is forgotten after known_address_sec.
    now[0] = 991.0
    assert throttle.retry_after("alice", "198.51.100.1") is None
    assert throttle.retry_after("alice", "192.0.2.0") is None
    now[0] = 31 * 24 * 3600.0
    for i in range(200):
        throttle.record_failure("alice", f"203.0.113.{i}")
    assert throttle.retry_after("alice", "10.0.0.1") is not None


def test_one_address_guessing_is_bounded():
    now = [0.0]
    throttle = LoginThrottle(10, 50, 900, clock=lambda: now[0])
    throttle.record_success("regular", "192.0.2.7")  # logs in from this address
    tries = 0
    for i in range(5000):  # 5000 user names, as many guesses at each as the throttle lets through
        while throttle.retry_after(f"user{i}", "192.0.2.7") is None:
            throttle.record_failure(f"user{i}", "192.0.2.7")
            tries += 1
    # 10 at each of the first 5 names (the address's 50), then 1 per further name up to 4 x 50:
    # 200 scrypt checks per window, not one per name without end (before: 50 + 4995).
    assert tries == 200
    assert throttle.retry_after("newcomer", "192.0.2.7") is not None  # not known here: refused too
    assert throttle.retry_after("regular", "192.0.2.7") is None  # known here: keeps its limit
    assert throttle.retry_after("user0", "198.51.100.1") is None  # other addresses are not concerned
    now[0] = 991.0  # the window has passed
    assert throttle.retry_after("user4999", "192.0.2.7") is None


def test_ipv6_addresses_count_per_64():
    now = [0.0]
    throttle = LoginThrottle(3, 6, 900, clock=lambda: now[0])
    for i in range(3):  # one host hops through the addresses of its /64
        throttle.record_failure("alice", f"2001:db8:1:2::{i + 1:x}")
    assert throttle.retry_after("alice", "2001:db8:1:2:ffff::9") is not None  # before: None
    assert throttle.retry_after("alice", "2001:db8:1:3::1") is None  # another /64
    assert LoginThrottle.address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert LoginThrottle.address_key("unknown") == "unknown"


def test_a_zero_limit_switches_off_that_limit_only():
    now = [0.0]
    throttle = LoginThrottle(0, 50, 900, clock=lambda: now[0])  # no per-(user, address) limit
    assert (throttle.account_soft, throttle.account_hard) == (50, 200)  # before: (0, 0), all off
    for _ in range(200):
        if throttle.retry_after("alice", "192.0.2.1") is None:
            throttle.record_failure("alice", "192.0.2.1")
    # Past the address's 50 the address is restricted (1 try per name; "alice" had hers).
    assert throttle.retry_after("alice", "192.0.2.1") is not None
    no_address = LoginThrottle(10, 0, 900, clock=lambda: now[0])
    for i in range(300):  # no per-address limit: a spray is bounded per name only
        no_address.record_failure(f"user{i}", "192.0.2.1")
    assert no_address.retry_after("user300", "192.0.2.1") is None
    for _ in range(10):
        no_address.record_failure("bob", "192.0.2.1")
    assert no_address.retry_after("bob", "192.0.2.1") is not None


def test_throttle_memory_is_bounded():
    throttle = LoginThrottle(10, 50, 900, clock=lambda: 0.0)
    for i in range(60_000):  # a spray from many addresses: 3 counters per failure
        throttle.record_failure(f"user{i}", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(throttle._failures) <= 100_000  # before: 180,000 (cap 300,000)
    # Each counter is a small fixed array, not a deque of up to 1000 timestamps.
    counter = next(iter(throttle._failures.values()))
    assert sys.getsizeof(counter) < 300


def test_refresh_credential_use_makes_an_address_known(throttled_server, from_address):
    url, victim = throttled_server.url, _user(throttled_server)
    first, agent_host, elsewhere = from_address("127.0.1.1"), from_address("127.0.1.2"), from_address("127.0.1.3")
    refresh = _login(first, url, victim, scope="offline_access").json()["refresh_token"]
    # The site agent uses the refresh credential from another host.
    again = agent_host.post(f"{url}/auth/token", data={"grant_type": "refresh_token", "refresh_token": refresh})
    assert again.status_code == 200, again.text
    # A third party pushes the account past its hard limit (20 x 3 = 60 failures) from 50 addresses.
    failures = 0
    for i in range(60):
        http = from_address(f"127.0.2.{i + 1}")
        while failures < 60 and _login(http, url, victim, "wrong guess x").status_code == 401:
            failures += 1
    assert failures == 60
    # Addresses the user used keep working (the agent host: before, 429); any other is refused.
    assert _login(agent_host, url, victim).status_code == 200
    assert _login(first, url, victim).status_code == 200
    assert _login(elsewhere, url, victim).status_code == 429


def test_forged_forwarded_for_shares_one_address(throttled_server, from_address):
    """The test servers run uvicorn by hand, which trusts X-Forwarded-For from 127.0.0.1 by
    default; without BALSAM_TRUSTED_PROXIES the app puts every such forwarded request on one
    address (before: each forged address got a fresh count)."""
    url, victim = throttled_server.url, _user(throttled_server)
    forger = from_address("127.0.0.1")
    statuses = [forger.post(f"{url}/auth/password/login", data={"username": victim, "password": "wrong guess x"},
                            headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    # Plain requests from 127.0.0.1 are still counted apart from the forwarded ones.
    assert _login(forger, url, victim).status_code == 200


def _run_server(tmp_path: Any, env: "dict[str, str]") -> "tuple[subprocess.Popen, str]":
    """``python -m balsam.server`` (the deployed entry point) on a free port, SQLite."""
    import socket

    from balsam.server.admin import Admin

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db = f"sqlite:///{tmp_path / 'balsam.db'}"
    full_env = {**os.environ, "BALSAM_DATABASE_URL": db, "BALSAM_AUTH_SECRET_KEY": "test-secret-" + "x" * 40,
                "BALSAM_HOME": str(tmp_path / "home"), "BALSAM_SERVER_CREATE_TABLES": "1",
                "BALSAM_AUTH_MAX_FAILURES_PER_USER": "3", **env}
    full_env.pop("FORWARDED_ALLOW_IPS", None)
    log = open(tmp_path / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "balsam.server", "--port", str(port), "--log-level", "warning"],
                            env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        try:
            if httpx.get(f"{url}/auth/how", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    with Admin(db) as admin:
        admin.add_user("alice", PASSWORD, 12)
    return proc, url


@pytest.mark.parametrize("trusted", [None, "127.0.0.1"])
def test_deployed_server_honours_forwarded_for_only_from_trusted_proxies(tmp_path, trusted):
    proc, url = _run_server(tmp_path, {"BALSAM_TRUSTED_PROXIES": trusted} if trusted else {})
    try:
        with httpx.Client(timeout=60) as http:
            def guess(forwarded: str) -> httpx.Response:
                return http.post(f"{url}/auth/password/login", data={"username": "alice", "password": "wrong guess x"},
                                 headers={"X-Forwarded-For": forwarded})

            statuses = [guess(f"198.51.100.{i}").status_code for i in range(5)]
            login = http.post(f"{url}/auth/password/login", data={"username": "alice", "password": PASSWORD},
                              headers={"X-Forwarded-For": "203.0.113.9"})
            labels = set()
            if login.status_code == 200:
                creds = http.get(f"{url}/auth/credentials", headers=_bearer(login.json()["access_token"]))
                labels = {c["label"] for c in creds.json()["results"]}
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    if trusted is None:
        # The header is ignored: all five guesses, and the login, come from 127.0.0.1 (before:
        # six addresses, and the login's label named the forged one).
        assert statuses == [401, 401, 401, 429, 429]
        assert login.status_code == 429
    else:
        # A trusted proxy names the client: five clients, each under its limit.
        assert statuses == [401] * 5
        assert login.status_code == 200 and labels == {"password login from 203.0.113.9"}


# -- a new password ends the old sessions -----------------------------------------------------------


def test_set_password_end_sessions_revokes_login_and_refresh_credentials_but_not_launchers(throttled_server, from_address):
    from balsam.server.admin import Admin

    url, name = throttled_server.url, _user(throttled_server)
    http = from_address("127.0.0.4")
    plain = _login(http, url, name).json()["access_token"]
    offline = _login(http, url, name, scope="offline_access").json()
    access, refresh = offline["access_token"], offline["refresh_token"]
    site = http.post(f"{url}/sites/", headers=_bearer(access), json={"name": f"s-{uuid.uuid4().hex[:6]}",
                                                                     "path": "/projects/s"}).json()
    bj = http.post(f"{url}/batch-jobs/", headers=_bearer(access),
                   json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1, "wall_time_min": 10,
                         "job_mode": "mpi"}).json()
    launcher = http.post(f"{url}/auth/credentials", headers=_bearer(access),
                         json={"site_id": site["id"], "batch_job_id": bj["id"], "ttl_sec": 3600}).json()
    for token in (plain, access, launcher["access_token"]):
        assert http.get(f"{url}/sites/", headers=_bearer(token)).status_code == 200

    with Admin(throttled_server.database_url) as admin:
        kept = admin.set_password(name, "a brand new password 123", 12)  # by default: logins stay
    assert kept == {"login": 0, "refresh": 0, "dashboard": 0, "launcher_kept": 1}
    assert http.get(f"{url}/sites/", headers=_bearer(access)).status_code == 200
    with Admin(throttled_server.database_url) as admin:
        summary = admin.set_password(name, "a brand new password 123", 12, end_sessions=True)

    for token in (plain, access):  # before: both still 200
        resp = http.get(f"{url}/sites/", headers=_bearer(token))
        assert resp.status_code == 401 and "revoked" in resp.json()["detail"]
    again = http.post(f"{url}/auth/token", data={"grant_type": "refresh_token", "refresh_token": refresh})
    assert again.status_code == 401 and "revoked" in again.json()["detail"]
    # The running allocation keeps its launcher credential (revoking it would end its jobs).
    assert http.get(f"{url}/sites/", headers=_bearer(launcher["access_token"])).status_code == 200
    assert _login(http, url, name).status_code == 401
    assert _login(http, url, name, "a brand new password 123").status_code == 200
    assert summary == {"login": 1, "refresh": 1, "dashboard": 0, "launcher_kept": 1}


# -- launcher credentials cannot redirect their site's transfers ------------------------------------


def test_launcher_credential_cannot_change_transfer_destinations(api):
    site = api.site(transfer_locations={"aps": "globus://11111111-2222-3333-4444-555555555555"},
                    globus_endpoint_id="66666666-7777-8888-9999-000000000000")
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q",
                                                  "num_nodes": 1, "wall_time_min": 10, "job_mode": "mpi"})
    cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "batch_job_id": bj["id"],
                                                         "ttl_sec": 600})
    launcher = httpx.Client(base_url=api.url, headers=_bearer(cred["access_token"]), timeout=60)
    try:
        for field, value in (("transfer_locations", {"aps": "globus://attacker"}),
                             ("globus_endpoint_id", "deadbeef-0000-0000-0000-000000000000")):
            resp = launcher.put(f"/sites/{site['id']}", json={field: value})
            assert resp.status_code == 403, resp.text  # before: 200, the site's transfers redirected
            assert field in resp.json()["detail"]
        assert launcher.put(f"/sites/{site['id']}", json={"transfer_locations": {}}).status_code == 403
        # A whole record sent back unchanged, and the status fields, are fine.
        record = launcher.get(f"/sites/{site['id']}").json()
        assert launcher.put(f"/sites/{site['id']}", json=record).status_code == 200
        assert launcher.put(f"/sites/{site['id']}", json={"backfill_windows": {}}).status_code == 200
        # BatchJobs stay within a launcher credential's scope (a workflow inside the allocation).
        more = launcher.post("/batch-jobs/", json={"site_id": site["id"], "project": "p", "queue": "q",
                                                   "num_nodes": 1, "wall_time_min": 10, "job_mode": "mpi"})
        assert more.status_code == 201, more.text
    finally:
        launcher.close()
    stored = api.ok("GET", f"/sites/{site['id']}")
    assert stored["transfer_locations"] == {"aps": "globus://11111111-2222-3333-4444-555555555555"}
    assert stored["globus_endpoint_id"] == "66666666-7777-8888-9999-000000000000"
    # The user's own login (the site agent pushing settings.yml) still changes them.
    changed = api.ok("PUT", f"/sites/{site['id']}", json={"transfer_locations": {"aps": "globus://elsewhere"}})
    assert changed["transfer_locations"] == {"aps": "globus://elsewhere"}

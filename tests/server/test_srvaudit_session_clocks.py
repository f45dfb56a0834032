"""Sessions' expiry with server hosts whose clocks disagree, behind one PostgreSQL.

A heartbeat was written with the clock of the server process that took it, and compared by the
expiry sweep of another process with that one's clock. Host B's clock 120 s ahead of host A's
(expiry 60 s): B's sweep expired a launcher that heartbeat through A a moment before (its RUNNING
job to RUN_TIMEOUT, to be run a second time), and a session whose heartbeat B wrote outlived its
dead launcher by those 120 s. On PostgreSQL the expiry clock is now the database's.

Host A: a uvicorn subprocess with the right clock. Host B: a uvicorn server in this process whose
server clock (``utcnow`` of the session code, as the stall tests inject it) runs ahead; its expiry
sweep is the function its background task runs, called here. SQLite is one host: not tested here.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import Api

from balsam.server import jobs_logic, sessions_logic
from balsam.server.db import write_tx
from balsam.server.routes import sessions as session_routes

pytestmark = pytest.mark.postgres

SECRET = "balsam-test-secret-key-not-for-production-use-0123456789"  # tests/conftest.py SERVER_SECRET
EXPIRE_SEC = 60
SKEW = dt.timedelta(seconds=120)
#: Generous: conditions are waited for, never timed.
WAIT_SEC = 60.0


@pytest.fixture
def hosts(live_server_factory: Any, serve_in_process: Any, monkeypatch: pytest.MonkeyPatch, register: Any) -> Any:
    """``(api_a, api_b, sweep_b, sweep_a)``: one user's clients of host A (right clock) and host B
    (clock ``SKEW`` ahead), and each host's expiry sweep (``sweep(expire_sec)``)."""
    from balsam.server.app import create_app
    from balsam.server.settings import ServerSettings

    env = {"BALSAM_SESSION_EXPIRE_SEC": str(EXPIRE_SEC), "BALSAM_SESSION_SWEEP_SEC": "3600"}
    server_a = live_server_factory("postgresql", env=env)
    real_utcnow = sessions_logic.utcnow
    ahead = [SKEW]
    skewed = lambda: real_utcnow() + ahead[0]  # noqa: E731
    for module in (sessions_logic, session_routes, jobs_logic):
        monkeypatch.setattr(module, "utcnow", skewed)
    settings = ServerSettings(database_url=server_a.database_url, secret_key=SECRET, registration="open",
                              session_expire_sec=EXPIRE_SEC, session_sweep_sec=3600)
    app_b = create_app(settings=settings)
    url_b = serve_in_process(app_b)
    api_a = Api(server_a.url, register)
    api_b = Api(url_b, lambda _url, _name=None: (api_a.username, api_a.password, api_a.user_id, api_a.token, None))

    def sweep(expire_sec: int, skew: dt.timedelta) -> None:
        ahead[0] = skew
        try:
            with write_tx(app_b.state.engine) as conn:
                sessions_logic.sweep_expired(conn, expire_sec)
        finally:
            ahead[0] = SKEW

    yield api_a, api_b, lambda expire_sec=EXPIRE_SEC: sweep(expire_sec, SKEW), \
        lambda expire_sec=EXPIRE_SEC: sweep(expire_sec, dt.timedelta(0))
    api_a.close()


def test_a_sweep_by_a_host_ahead_keeps_a_live_launcher(hosts: Any) -> None:
    api_a, _api_b, sweep_b, _sweep_a = hosts
    site = api_a.site()
    app = api_a.app(site["id"])
    job = api_a.jobs(app["id"], 1)[0]["id"]
    api_a.patch_states([job], "PREPROCESSED")
    session = api_a.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    assert [j["id"] for j in api_a.ok("POST", f"/sessions/{session}", json={"max_num_jobs": 1})] == [job]
    api_a.patch_states([job], "RUNNING")
    sweep_b()  # host B's first sweep (its start): restarts the clocks of the stale sessions
    api_a.ok("PUT", f"/sessions/{session}", json={})  # the launcher heartbeats through host A
    sweep_b()
    assert api_a.job(job)["state"] == "RUNNING", "host B's sweep expired a live launcher's session"
    api_a.ok("PUT", f"/sessions/{session}", json={})


def test_a_dead_launcher_expires_though_a_host_ahead_wrote_its_heartbeat(hosts: Any) -> None:
    api_a, api_b, _sweep_b, sweep_a = hosts
    site = api_a.site()
    session = api_b.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    api_b.ok("PUT", f"/sessions/{session}", json={})  # its last heartbeat, through host B; then it dies
    deadline = time.monotonic() + WAIT_SEC
    while session in [s["id"] for s in api_a.ok("GET", "/sessions/")["results"]]:
        assert time.monotonic() < deadline, "a dead launcher's session outlived a 2 s expiry by a minute"
        sweep_a(2)  # host A's sweeps, with a 2 s expiry
        time.sleep(0.5)

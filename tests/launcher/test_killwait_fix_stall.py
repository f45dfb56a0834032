"""A server process that stands still a few seconds (SIGSTOP, a frozen container, a starved host)
while a launcher's Session is ending (balsam.client.lease, "An announced end": its expiry is a
window of seconds, not ``expire_sec``).

Real uvicorn servers (SQLite and PostgreSQL, the default 5-minute expiry, so the stand-still is far
under the quarter of it that counts as an outage), stopped with SIGSTOP past the announced window
while the launcher's next announcement waits in the socket backlog. The sweeps that resumed with
the process (the one scheduled for the announced moment, the periodic one, the request's own) ran
before that heartbeat and expired the live launcher's Session (its RUNNING jobs RUN_TIMEOUT, run
again; the heartbeat answered 404). Asserted on what the server answers and holds, not on durations;
the sleeps are the stand-still itself.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

EXPIRE_SEC = 300  # the default: a stand-still of seconds is no outage (stall_limit: 75 s)
# The launcher's announced time left (ENDING_IN_SEC is 10: shorter keeps the test short); 3 s still
# leaves the test process time to SIGSTOP the server before the announced moment under CI load.
WINDOW_SEC = 3.0
# Past the announced moment, with 4 s for the sender thread to get its heartbeat into the backlog.
STALL_SEC = WINDOW_SEC + 4


@pytest.fixture(scope="module", params=[("sqlite", "1"), ("postgresql", "1"), ("postgresql", "3600")],
                ids=["sqlite-sweeps-every-second", "postgresql-sweeps-every-second", "postgresql-end-sweep-only"])
def _srv(live_server_factory: Any, request: pytest.FixtureRequest) -> Any:
    database, sweep_sec = request.param
    # Sweeping every second: the request's own sweep and the periodic one resume with the process. Hourly:
    # only the sweep the server schedules for the announced moment.
    return live_server_factory(database, env={"BALSAM_SESSION_EXPIRE_SEC": str(EXPIRE_SEC),
                                              "BALSAM_SESSION_SWEEP_SEC": sweep_sec})


@pytest.fixture
def live_server(_srv: Any, request: pytest.FixtureRequest) -> str:
    request.node._balsam_live_server = _srv
    return _srv.url


def _session_ids(client: Any) -> list[int]:
    return [s["id"] for s in client.get("/sessions/")["results"]]


def test_a_server_that_stood_still_past_the_announced_moment_keeps_a_live_launchers_session(_srv: Any, new_site: Any) -> None:
    from balsam._api.model import get_default_client
    from balsam.client.lease import TICK_RETRY_COUNT

    _name, path = new_site()
    site_id = int((path / ".balsam-site").read_text())
    client = get_default_client()
    session_id = client.post("/sessions/", json={"site_id": site_id})["id"]
    assert "expires" in client.put(f"/sessions/{session_id}", json={"ending_in_sec": WINDOW_SEC})
    answers: list[Any] = []

    def announce_again() -> None:  # the launcher's next announcement, sent while the server stands still
        try:
            # Retried as the lease's heartbeats are: the server may close the idle keep-alive
            # connection this one went out on as it resumes.
            answers.append(client.put(f"/sessions/{session_id}", json={"ending_in_sec": WINDOW_SEC},
                                      retry_count=TICK_RETRY_COUNT))
        except Exception as exc:
            answers.append(exc)

    os.kill(_srv.proc.pid, signal.SIGSTOP)
    try:
        sender = threading.Thread(target=announce_again)
        sender.start()
        time.sleep(STALL_SEC)
    finally:
        os.kill(_srv.proc.pid, signal.SIGCONT)
    sender.join(60)
    assert answers and isinstance(answers[0], dict) and "expires" in answers[0], (answers, _srv.log_tail(12))
    assert session_id in _session_ids(client), _srv.log_tail(12)
    # A launcher killed now (no heartbeat after that one) still has its Session expired by the server
    # by itself, about the window later: bounded wait, far under the expiry and the hourly sweep.
    deadline = time.monotonic() + 60
    while session_id in _session_ids(client) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_id not in _session_ids(client), _srv.log_tail(12)

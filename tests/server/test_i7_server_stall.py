"""A server process that stood still longer than the session expiry, or whose wall clock stepped
forward, must not expire the sessions of launchers that heartbeat all along.

The launchers' heartbeats wait in the stopped server's socket backlog (SIGSTOP, a frozen container,
a paused VM); at its resume the sweeper ran first, found every session older than the expiry and
sent a live launcher's RUNNING jobs to RUN_TIMEOUT, to be run a second time beside the first run
(sessions_logic, "A server process that stood still").
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
import time
import types
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from server_testlib import HAND_SWEPT_EXPIRY_SEC, SHORT_EXPIRY_SEC, Api, runnable

from balsam.server import sessions_logic
from balsam.server.db import write_tx
from balsam.server.tables import sessions


@pytest.mark.slow
def test_a_stopped_server_keeps_the_sessions_that_heartbeat_meanwhile(db_kind: str, live_server_factory: Any,
                                                                      register: Any) -> None:
    # A server of its own: it is stopped for seconds.
    server = live_server_factory(db_kind, env={"BALSAM_SESSION_EXPIRE_SEC": str(SHORT_EXPIRY_SEC),
                                               "BALSAM_SESSION_SWEEP_SEC": "1"})
    api = Api(server.url, register)
    site = api.site()
    app = api.app(site["id"])
    ids = runnable(api, app["id"], 3)
    live = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    assert sorted(j["id"] for j in api.ok("POST", f"/sessions/{live}", json={"max_num_jobs": 2})) == ids[:2]
    api.ok("PATCH", "/jobs/", json=[{"id": i, "state": "RUNNING", "session_id": live} for i in ids[:2]])
    silent = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    assert [j["id"] for j in api.ok("POST", f"/sessions/{silent}", json={"max_num_jobs": 1})] == ids[2:]
    api.ok("PATCH", "/jobs/", json=[{"id": ids[2], "state": "RUNNING", "session_id": silent}])

    # The live launcher heartbeats every 0.4 s throughout, as a launcher does (retrying a dropped
    # connection, as its client does).
    answers: list[int] = []
    stop = threading.Event()

    def heartbeats() -> None:
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.token}"}, timeout=60) as http:
            while not stop.is_set():
                try:
                    answers.append(http.put(f"/sessions/{live}", json={"job_ids": ids[:2]}).status_code)
                except httpx.TransportError:
                    pass
                stop.wait(0.4)

    beat = threading.Thread(target=heartbeats)
    beat.start()
    try:
        time.sleep(1)
        os.kill(server.proc.pid, signal.SIGSTOP)  # longer than both the expiry and stall_limit
        time.sleep(SHORT_EXPIRY_SEC + 3)
        os.kill(server.proc.pid, signal.SIGCONT)
        # The silent session is still expired, an expiry period after the restart of its clock.
        deadline = time.monotonic() + SHORT_EXPIRY_SEC * 3 + 5
        while api.job(ids[2])["state"] == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.3)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        stop.set()
        beat.join()
    assert 404 not in answers, answers
    assert [api.job(i)["state"] for i in ids] == ["RUNNING", "RUNNING", "RUN_TIMEOUT"]
    assert api.ok("GET", "/sessions/", params={"id": [live, silent]})["count"] == 1
    api.close()


EXPIRE_SEC = HAND_SWEPT_EXPIRY_SEC  # the hand_swept_server's


def test_a_forward_step_of_the_servers_clock_expires_no_live_session(
        hand_swept_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = hand_swept_server.app.state.engine
    with write_tx(engine) as conn:
        sessions_logic.sweep_expired(conn, EXPIRE_SEC)  # this process has swept (and watches its clock)
    session = hand_swept_server.post("/sessions/", json={"site_id": hand_swept_server.site["id"]}).json()["id"]
    # The wall clock steps forward by more than the expiry (an NTP step), between two sweeps.
    step = EXPIRE_SEC * 2
    real_time, real_utcnow = time.time, sessions_logic.utcnow
    monkeypatch.setattr(sessions_logic, "time", types.SimpleNamespace(
        time=lambda: real_time() + step, sleep=time.sleep, monotonic=time.monotonic))
    monkeypatch.setattr(sessions_logic, "utcnow", lambda: real_utcnow() + dt.timedelta(seconds=step))
    with write_tx(engine) as conn:
        assert sessions_logic.sweep_expired(conn, EXPIRE_SEC) == 0
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(sessions).where(sessions.c.id == session)).scalar() == 1


def test_a_clock_restart_rolled_back_with_its_request_is_done_again(hand_swept_server: Any) -> None:
    """The first sweep of a process restarts the stale sessions' clocks. It may run inside a request
    (the user's sweep before an acquire, tick or session create) whose transaction then fails (a
    404 for a session deleted meanwhile): the restart was rolled back with it, but the process
    counted it as done, and its next sweep expired every session the downtime had made stale."""
    engine = hand_swept_server.app.state.engine
    live = hand_swept_server.post("/sessions/", json={"site_id": hand_swept_server.site["id"]}).json()["id"]
    with write_tx(engine) as conn:  # the server was down longer than the expiry (a new process)
        conn.execute(sa.update(sessions).values(heartbeat=sessions_logic.utcnow() - dt.timedelta(seconds=EXPIRE_SEC + 5)))
    sessions_logic._swept_since_outage.clear()
    sessions_logic._last_user_sweep.clear()
    # The first request after the start: a tick of a session that is no more (its sweep, then 404).
    assert hand_swept_server.put("/sessions/999999", json={}).status_code == 404
    with write_tx(engine) as conn:  # the background sweep
        assert sessions_logic.sweep_expired(conn, EXPIRE_SEC) == 0
    assert hand_swept_server.put(f"/sessions/{live}", json={}).status_code == 200  # the launcher heartbeats again


def test_a_replayed_acquire_heartbeats_its_session(hand_swept_server: Any) -> None:
    """A launcher counts every answered acquire as a heartbeat sent when it sent the request
    (balsam.client.lease, ``_confirm``), the resent one whose first answer was lost included. The
    replay (the same jobs again) did not heartbeat: the server's clock of the session still ran from
    the lost original, and it expired the session while the launcher counted it fresh and started
    the jobs, which then ran a second time elsewhere."""
    engine = hand_swept_server.app.state.engine
    hand_swept_server.post("/jobs/", json=[{"workdir": "w/1", "app_id": hand_swept_server.post("/apps/", json={
        "site_id": hand_swept_server.site["id"], "name": "A", "serialized_class": "", "source_code": "",
        "parameters": {}, "transfers": {}, "description": ""}).json()["id"]}])
    [job] = hand_swept_server.get("/jobs/").json()["results"]
    hand_swept_server.patch("/jobs/", json=[{"id": job["id"], "state": "PREPROCESSED"}]).raise_for_status()
    session = hand_swept_server.post("/sessions/", json={"site_id": hand_swept_server.site["id"]}).json()["id"]
    key = {"Idempotency-Key": "acquire-1"}
    assert [j["id"] for j in hand_swept_server.post(f"/sessions/{session}", json={"max_num_jobs": 5},
                                                    headers=key).json()] == [job["id"]]

    def age(seconds: int) -> None:
        with write_tx(engine) as conn:
            for sid, beat in conn.execute(sa.select(sessions.c.id, sessions.c.heartbeat)).all():
                conn.execute(sa.update(sessions).where(sessions.c.id == sid)
                             .values(heartbeat=beat - dt.timedelta(seconds=seconds)))

    age(EXPIRE_SEC - 10)  # the answer was lost; the launcher resends the request for a while
    assert [j["id"] for j in hand_swept_server.post(f"/sessions/{session}", json={"max_num_jobs": 5},
                                                    headers=key).json()] == [job["id"]]
    age(20)  # well within the expiry, for the launcher, since its resent acquire was answered
    with write_tx(engine) as conn:
        assert sessions_logic.sweep_expired(conn, EXPIRE_SEC) == 0
    assert hand_swept_server.get(f"/jobs/{job['id']}").json()["state"] == "PREPROCESSED"

"""A launcher's announced end (``PUT /sessions/{id}`` with ``ending_in_sec``).

The batch system SIGKILLs an allocation's processes some time after its SIGTERM (Slurm's
``KillWait``): a launcher killed before it reported its jobs left them RUNNING until its Session
expired (5 minutes by default). A stopping launcher now says how long it still needs, and the server
expires its Session that much later (sessions_logic, "A launcher's announced end"). These tests look
at the stored expiry and at what the sweep does with it, never at how long anything took.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from server_testlib import HAND_SWEPT_EXPIRY_SEC

from balsam.server import sessions_logic
from balsam.server.db import write_tx
from balsam.server.jobs_logic import SESSION_EXPIRED_MSG
from balsam.server.tables import sessions

EXPIRE_SEC = HAND_SWEPT_EXPIRY_SEC  # the hand_swept_server's


def _running_jobs(tc: Any, n: int = 2) -> tuple[int, list[int]]:
    """A session of the hand-swept server's site holding ``n`` RUNNING jobs: (session id, job ids)."""
    app = tc.post("/apps/", json={"site_id": tc.site["id"], "name": "A", "serialized_class": "", "source_code": "",
                                  "parameters": {}, "transfers": {}, "description": ""}).json()
    jobs = tc.post("/jobs/", json=[{"workdir": f"w/{i}", "app_id": app["id"]} for i in range(n)]).json()
    ids = [j["id"] for j in jobs]
    assert tc.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids]).status_code == 200
    session_id = tc.post("/sessions/", json={"site_id": tc.site["id"]}).json()["id"]
    leased = tc.post(f"/sessions/{session_id}", json={"max_num_jobs": n}).json()
    assert sorted(j["id"] for j in leased) == ids
    answer = tc.patch("/jobs/", json=[{"id": i, "state": "RUNNING", "session_id": session_id} for i in ids])
    assert answer.status_code == 200, answer.text
    return session_id, ids


def _expiry(engine: sa.Engine, session_id: int) -> "dt.datetime | None":
    with engine.connect() as conn:
        beat = conn.execute(sa.select(sessions.c.heartbeat).where(sessions.c.id == session_id)).scalar()
    return None if beat is None else beat + dt.timedelta(seconds=EXPIRE_SEC)


def _db_now(engine: sa.Engine) -> dt.datetime:
    with engine.connect() as conn:
        return sessions_logic.clock_now(conn)


def _sweep(engine: sa.Engine) -> int:
    with write_tx(engine) as conn:
        return sessions_logic.sweep_expired(conn, EXPIRE_SEC)


def _states(tc: Any, ids: list[int]) -> dict[int, str]:
    return {i: tc.get(f"/jobs/{i}").json()["state"] for i in ids}


def test_an_announced_end_expires_the_session_at_its_moment_and_the_sweep_times_its_jobs_out(hand_swept_server: Any) -> None:
    tc = hand_swept_server
    engine = tc.app.state.engine
    session_id, ids = _running_jobs(tc)
    _sweep(engine)  # the process's first sweep (its clock restart) is behind us
    before = _db_now(engine)
    answer = tc.put(f"/sessions/{session_id}", json={"ending_in_sec": 0})
    assert answer.status_code == 200, answer.text
    after = _db_now(engine)
    expiry = _expiry(engine, session_id)
    assert expiry is not None and before <= expiry <= after, (before, expiry, after)
    assert "expires" in answer.json()  # said back: the launcher tells an older server by its absence
    # A launcher killed now: the next sweep times its RUNNING jobs out (a plain heartbeat's
    # session would live EXPIRE_SEC more, its jobs RUNNING).
    assert _sweep(engine) == 1
    assert set(_states(tc, ids).values()) <= {"RUN_TIMEOUT", "RESTART_READY"}
    reasons = [e["data"].get("message") for e in tc.get("/events/", params={"job_id": ids[0]}).json()["results"]
               if e["to_state"] == "RUN_TIMEOUT"]
    assert reasons == [SESSION_EXPIRED_MSG], reasons


def test_an_announced_end_keeps_the_session_until_its_moment_and_a_live_launchers_report_wins(hand_swept_server: Any) -> None:
    tc = hand_swept_server
    engine = tc.app.state.engine
    session_id, ids = _running_jobs(tc)
    _sweep(engine)
    before = _db_now(engine)
    assert tc.put(f"/sessions/{session_id}", json={"ending_in_sec": 20}).status_code == 200
    expiry = _expiry(engine, session_id)
    # 20 s from the announcement, not EXPIRE_SEC (60 s): the stored expiry says so.
    assert expiry is not None and expiry - before <= dt.timedelta(seconds=21), (before, expiry)
    assert expiry - before >= dt.timedelta(seconds=19), (before, expiry)
    assert _sweep(engine) == 0  # not yet: the launcher still ends its jobs
    # The launcher reports in time: its RUN_TIMEOUT (and its delete) end the jobs once.
    tc.patch("/jobs/", json=[{"id": i, "state": "RUN_TIMEOUT", "session_id": session_id} for i in ids])
    assert tc.delete(f"/sessions/{session_id}").status_code == 204
    assert _sweep(engine) == 0
    events = [e for e in tc.get("/events/", params={"to_state": "RUN_TIMEOUT"}).json()["results"] if e["job_id"] in ids]
    assert sorted(e["job_id"] for e in events) == ids  # one RUN_TIMEOUT each, none from the session's end


def test_a_late_report_after_the_sweep_is_refused_not_applied_twice(hand_swept_server: Any) -> None:
    tc = hand_swept_server
    engine = tc.app.state.engine
    session_id, ids = _running_jobs(tc, 1)
    _sweep(engine)
    tc.put(f"/sessions/{session_id}", json={"ending_in_sec": 0})
    assert _sweep(engine) == 1
    late = tc.patch("/jobs/", json=[{"id": ids[0], "state": "RUN_DONE", "session_id": session_id}])
    assert late.status_code >= 400 or _states(tc, ids)[ids[0]] != "RUN_DONE", late.text
    events = [e for e in tc.get("/events/", params={"job_id": ids[0]}).json()["results"] if e["from_state"] == "RUNNING"]
    assert [e["to_state"] for e in events] == ["RUN_TIMEOUT"]


def test_an_announced_end_is_never_longer_than_a_heartbeat_and_bad_values_are_refused(hand_swept_server: Any) -> None:
    tc = hand_swept_server
    engine = tc.app.state.engine
    session_id, _ids = _running_jobs(tc, 1)
    before = _db_now(engine)
    assert tc.put(f"/sessions/{session_id}", json={"ending_in_sec": 10 * EXPIRE_SEC}).status_code == 200
    expiry = _expiry(engine, session_id)
    assert expiry is not None and expiry - before <= dt.timedelta(seconds=EXPIRE_SEC + 1)
    for bad in (-1, "5", True, 1e9):
        answer = tc.put(f"/sessions/{session_id}", json={"ending_in_sec": bad})
        assert answer.status_code == 422 and "ending_in_sec" in answer.text, (bad, answer.text)
    # A plain heartbeat (Balsam 0.7's {}) answers as before, without "expires".
    plain = tc.put(f"/sessions/{session_id}", json={})
    assert plain.status_code == 200 and "expires" not in plain.json()


def test_the_server_sweeps_an_announced_end_by_itself_with_a_long_sweep_period(hand_swept_server: Any) -> None:
    """The periodic sweep (and the requests' own) runs at most hourly here: the announcement's own
    scheduled sweep is what times the jobs out."""
    import time

    tc = hand_swept_server
    engine = tc.app.state.engine
    session_id, ids = _running_jobs(tc)
    _sweep(engine)
    assert tc.put(f"/sessions/{session_id}", json={"ending_in_sec": 0.5}).status_code == 200
    deadline = time.monotonic() + 30  # a bound on the wait, far under the expiry and the sweep period
    while _expiry(engine, session_id) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _expiry(engine, session_id) is None  # swept: the session is gone...
    assert set(_states(tc, ids).values()) <= {"RUN_TIMEOUT", "RESTART_READY"}  # ...and its jobs timed out

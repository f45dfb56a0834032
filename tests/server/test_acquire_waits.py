"""Acquires that wait for work (``Prefer: wait=N``): the wake-up mechanism, then the route in an
in-process server on SQLite and PostgreSQL, then wake-ups between two server processes on
PostgreSQL (LISTEN/NOTIFY; two in-process apps, each with its own wake-ups and listener).

No test here measures time. Where a wake-up must be shown, the wait's deadline is an hour away
(the cap is raised for the test): a wake-up that did not happen shows as the test's timeout.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Iterator

import pytest

import sqlalchemy as sa
from starlette.testclient import TestClient

from balsam.server import acquire_notify, acquire_waits
from balsam.server.acquire_notify import CHANNEL, WakeBridge, parse_payload
from balsam.server.acquire_waits import MAX_WAIT_SEC, AcquireWaits, requested_wait
from balsam.server.app import create_app
from balsam.server.settings import ServerSettings
from server_testlib import client_with_session, create_site_and_app


SECRET = "acquire-waits-test-secret-0123456789-abcdefghijklm"
PROCESSABLE = ["RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT", "STAGED_IN"]


@pytest.mark.parametrize(("header", "seconds"), [
    ("wait=5", 5.0),
    ("return=minimal, wait=2.5", 2.5),
    ("wait=3; return=minimal", 3.0),
    ('WAIT="4"', 4.0),
    ("wait=100000", MAX_WAIT_SEC),
    ("", None),
    ("return=minimal", None),
    ("wait=0", None),
    ("wait=-1", None),
    ("wait=nan", None),
    ("wait=soon", None),
])
def test_the_wait_a_prefer_header_asks_for(header: str, seconds: "float | None") -> None:
    assert requested_wait(header) == seconds


def test_a_wake_from_another_thread_ends_a_wait() -> None:
    waits = AcquireWaits()

    async def scenario() -> None:
        since = waits.generation(7)
        threading.Timer(0.05, waits.wake, args=(7,)).start()
        await waits.wait(7, since, time.monotonic() + 3600)

    asyncio.run(scenario())
    assert waits.generation(7) == 1
    assert waits._waiting == {}  # the wait took itself off the list


def test_a_wake_between_the_look_and_the_wait_is_not_missed() -> None:
    waits = AcquireWaits()
    since = waits.generation(7)  # read before the look...
    waits.wake(7)  # ...a write commits after it, before the wait starts
    asyncio.run(waits.wait(7, since, time.monotonic() + 3600))  # returns at once


def test_a_wake_of_another_user_does_not_end_a_wait_and_the_deadline_does() -> None:
    waits = AcquireWaits()

    async def scenario() -> None:
        since = waits.generation(1)
        waits.wake(2)
        await waits.wait(1, since, time.monotonic() + 0.1)

    asyncio.run(scenario())
    assert (waits.generation(1), waits.generation(2)) == (0, 1)


def test_a_wake_of_every_user_ends_the_wait_of_a_user_never_woken_before() -> None:
    # The expiry sweep wakes everyone, also a user whose look is in flight and who has no
    # generation of its own yet.
    waits = AcquireWaits()
    since = waits.generation(9)
    waits.wake_all()
    asyncio.run(waits.wait(9, since, time.monotonic() + 3600))  # returns at once

    async def scenario() -> None:
        since = waits.generation(9)
        threading.Timer(0.05, waits.wake_all).start()
        await waits.wait(9, since, time.monotonic() + 3600)

    asyncio.run(scenario())
    assert waits._waiting == {}


@pytest.mark.parametrize(("payload", "parsed"), [
    ("abc 12", ("abc", 12)),
    ("abc *", ("abc", None)),
    ("abc", None),
    ("abc 12 x", None),
    (" 12", None),
    ("abc -1", None),
    ("abc twelve", None),
    ("", None),
])
def test_the_payload_of_a_wake_up_notification(payload: str, parsed: Any) -> None:
    assert parse_payload(payload) == parsed


def test_without_a_database_the_bridge_logs_once_and_raises_nothing(caplog: pytest.LogCaptureFixture) -> None:
    # A closed port: every publish fails, and the listener keeps retrying until stopped.
    nowhere = sa.create_engine(f"postgresql+psycopg2://balsam@127.0.0.1:{_closed_port()}/nothing")
    bridge = WakeBridge(nowhere, AcquireWaits())
    with caplog.at_level("WARNING", logger="balsam.server.acquire_notify"):
        bridge.publish(1)
        bridge.publish(None)
        bridge.start()
        _until(lambda: any("Cannot listen" in r.getMessage() for r in caplog.records))
        time.sleep(0.6)  # a retry or two
        bridge.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Could not tell other server processes" in m for m in messages) == 1, messages
    assert sum("Cannot listen" in m for m in messages) == 1, messages
    assert not bridge.listening.is_set()
    nowhere.dispose()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.setattr(acquire_waits, "MAX_WAIT_SEC", 3600.0)
    with client_with_session(database_url, SECRET) as server:
        yield server


def _acquire(server: dict[str, Any], wait: "str | None", out: list) -> None:
    headers = {"Prefer": f"wait={wait}"} if wait else {}
    resp = server["client"].post(f"/sessions/{server['session']}", headers=headers,
                                 json={"max_num_jobs": 10, "filter_tags": {}, "states": PROCESSABLE})
    out.append(resp)


def _waiting(server: dict[str, Any]) -> bool:
    return bool(server["app"].state.acquire_waits._waiting)


def _until(predicate: Any) -> None:
    while not predicate():
        time.sleep(0.01)


def test_a_waiting_acquire_answers_with_the_job_a_launcher_finishes(server: dict[str, Any]) -> None:
    client = server["client"]
    (job,) = client.post("/jobs/", json=[{"workdir": "w/0", "app_id": server["app_id"]}]).json()
    # The processing module takes the new job (STAGED_IN) and moves it on; a launcher runs it.
    taken = []
    _acquire(server, "3600", taken)
    assert [j["id"] for j in taken[0].json()] == [job["id"]]  # there was one: answered at once
    client.patch("/jobs/", json=[{"id": job["id"], "state": "PREPROCESSED"}]).raise_for_status()
    out: list = []
    waiter = threading.Thread(target=_acquire, args=(server, "3600", out))
    waiter.start()
    _until(lambda: _waiting(server))  # nothing to lease: the request waits
    waits = server["app"].state.acquire_waits
    (user,) = waits._waiting
    generation = waits.generation(user)
    client.patch("/jobs/", json=[{"id": job["id"], "state": "RUNNING"}]).raise_for_status()
    assert waits.generation(user) == generation  # RUNNING makes nothing leasable: no wake-up
    client.patch("/jobs/", json=[{"id": job["id"], "state": "RUN_DONE"}]).raise_for_status()
    waiter.join()  # woken: an hour early
    assert out[0].status_code == 200
    assert [(j["id"], j["state"]) for j in out[0].json()] == [(job["id"], "RUN_DONE")]
    assert not _waiting(server)


def test_a_wake_up_that_finds_nothing_waits_again_and_new_jobs_end_it(server: dict[str, Any]) -> None:
    client = server["client"]
    _, other_app = create_site_and_app(client, "other")
    out: list = []
    waiter = threading.Thread(target=_acquire, args=(server, "3600", out))
    waiter.start()
    _until(lambda: _waiting(server))
    waits = server["app"].state.acquire_waits
    (user,) = waits._waiting
    generation = waits.generation(user)
    # A job created on another site wakes the user's waits, but this session's site has none.
    client.post("/jobs/", json=[{"workdir": "elsewhere", "app_id": other_app}]).raise_for_status()
    _until(lambda: waits.generation(user) > generation and _waiting(server))
    assert waiter.is_alive()
    (job,) = client.post("/jobs/", json=[{"workdir": "here", "app_id": server["app_id"]}]).json()
    waiter.join()
    assert [j["id"] for j in out[0].json()] == [job["id"]]


def test_without_the_preference_an_empty_acquire_answers_at_once_and_a_wait_ends_at_its_deadline(
    server: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    out: list = []
    _acquire(server, None, out)
    assert out[0].status_code == 200 and out[0].json() == []
    monkeypatch.setattr(acquire_waits, "MAX_WAIT_SEC", 0.2)
    _acquire(server, "3600", out)  # cut to the cap: answered, empty, at its deadline
    assert out[1].status_code == 200 and out[1].json() == []
    assert not _waiting(server)


def test_a_waiting_acquire_of_a_session_that_is_gone_says_so(server: dict[str, Any]) -> None:
    client = server["client"]
    client.delete(f"/sessions/{server['session']}").raise_for_status()
    out: list = []
    _acquire(server, "3600", out)
    assert out[0].status_code == 404


# -- between server processes (PostgreSQL) --------------------------------------------------------


#: Wake-ups cross server processes on PostgreSQL only (the embedded SQLite server is one process).
ON_POSTGRESQL = pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)


@pytest.fixture
def two_servers(server: dict[str, Any], database_url: str) -> Iterator[dict[str, Any]]:
    """``server`` and a second server process on the same database (its own app, wake-ups and
    listener), with a client logged in as the same user."""
    settings = ServerSettings(database_url=database_url, secret_key=SECRET, registration="open")
    other = create_app(settings=settings, create_tables_now=False)
    with TestClient(other) as other_client:
        other_client.headers["Authorization"] = server["client"].headers["Authorization"]
        for app in (server["app"], other):
            assert app.state.wake_bridge.listening.wait(60)
        yield {**server, "other_client": other_client, "other_app": other}


@ON_POSTGRESQL
def test_a_waiting_acquire_is_woken_by_a_write_in_another_server_process(two_servers: dict[str, Any]) -> None:
    (job,) = two_servers["client"].post("/jobs/", json=[{"workdir": "w/0", "app_id": two_servers["app_id"]}]).json()
    taken: list = []
    _acquire(two_servers, "3600", taken)  # the processing module takes the new job
    assert [j["id"] for j in taken[0].json()] == [job["id"]]
    out: list = []
    waiter = threading.Thread(target=_acquire, args=(two_servers, "3600", out))
    waiter.start()
    _until(lambda: _waiting(two_servers))  # waits in the first process
    other = two_servers["other_client"]
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE"):  # a launcher talks to the second one
        other.patch("/jobs/", json=[{"id": job["id"], "state": state}]).raise_for_status()
    waiter.join()  # woken through PostgreSQL: an hour early
    assert [(j["id"], j["state"]) for j in out[0].json()] == [(job["id"], "RUN_DONE")]


@ON_POSTGRESQL
def test_a_process_skips_its_own_notifications_and_applies_the_others(
    two_servers: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(acquire_notify, "PING_AFTER_SEC", 0.01)  # the quiet listeners check their connections
    time.sleep(0.1)
    first, second = two_servers["app"].state.wake_bridge, two_servers["other_app"].state.wake_bridge
    waits = two_servers["app"].state.acquire_waits
    before = waits.generation(5)
    first.publish(5)  # its own: already woken locally, not again
    second.publish(5)  # delivered after the first one (PostgreSQL keeps a sender's order)
    _until(lambda: waits.generation(5) > before)
    time.sleep(0.2)
    assert waits.generation(5) == before + 1
    before_all = waits.generation(6)
    second.publish(None)  # every user (the expiry sweep)
    _until(lambda: waits.generation(6) > before_all)


@ON_POSTGRESQL
def test_other_programs_on_the_channel_are_ignored_and_a_lost_listener_reconnects(
    two_servers: dict[str, Any], database_url: str,
) -> None:
    bridge: WakeBridge = two_servers["app"].state.wake_bridge
    waits = two_servers["app"].state.acquire_waits
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            for payload in ("hello", "x y z", "token not-a-user"):
                conn.execute(sa.select(sa.func.pg_notify(CHANNEL, payload)))
            conn.commit()
            before = waits.generation(3)
            two_servers["other_app"].state.wake_bridge.publish(3)
            _until(lambda: waits.generation(3) > before)  # still listening after the garbage
            assert bridge.listening.is_set()
            # The database ends the listener's connection (a restart, an administrator):
            before_all = waits.generation(4)
            listeners = [app.state.wake_bridge.backend_pid for app in (two_servers["app"], two_servers["other_app"])]
            for pid in listeners:
                assert conn.execute(sa.select(sa.func.pg_terminate_backend(pid))).scalar()
            conn.commit()
        # It reconnects, and wakes every user once for what it may have missed meanwhile.
        _until(lambda: waits.generation(4) > before_all)
        _until(lambda: bridge.listening.is_set() and bridge.backend_pid not in listeners)
        before = waits.generation(3)
        two_servers["other_app"].state.wake_bridge.publish(3)
        _until(lambda: waits.generation(3) > before)
    finally:
        engine.dispose()

"""Acquires that wait for work (``Prefer: wait=N``): the wake-up mechanism, then the route in an
in-process server on SQLite and PostgreSQL.

No test here measures time. Where a wake-up must be shown, the wait's deadline is an hour away
(the cap is raised for the test): a wake-up that did not happen shows as the test's timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Iterator

import pytest

from balsam.server import acquire_waits
from balsam.server.acquire_waits import MAX_WAIT_SEC, AcquireWaits, requested_wait
from server_testlib import create_site_and_app, logged_in_test_client

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

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


@pytest.fixture
def server(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.setattr(acquire_waits, "MAX_WAIT_SEC", 3600.0)
    with logged_in_test_client(database_url, SECRET) as (client, app):
        site_id, app_id = create_site_and_app(client)
        session = client.post("/sessions/", json={"site_id": site_id}).json()["id"]
        yield {"client": client, "app": app, "app_id": app_id, "site_id": site_id, "session": session}


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

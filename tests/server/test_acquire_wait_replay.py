"""A retried waiting acquire (``Prefer: wait``) whose first answer was lost is answered from its
Idempotency-Key's record at once: the jobs it leased are held by its Session, so the look for
leasable jobs finds none, and without the key's check first the retry waited on the server for the
whole wait (5 s for a launcher) before the replay, with the jobs leased and idle meanwhile.

Nothing is timed: the wait asked for is an hour (the cap raised); a retry that waits shows in the
server's list of waits, and the Session's deletion then ends it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import pytest

from balsam.server import acquire_waits
from server_testlib import client_with_session

SECRET = "acquire-wait-replay-test-secret-0123456789-abcdefg"
BODY = {"max_num_jobs": 10, "filter_tags": {}, "states": ["STAGED_IN"]}


@pytest.fixture
def server(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.setattr(acquire_waits, "MAX_WAIT_SEC", 3600.0)
    with client_with_session(database_url, SECRET) as server:
        yield server


def _acquire(server: dict[str, Any], key: str, out: list) -> None:
    out.append(server["client"].post(f"/sessions/{server['session']}", json=BODY,
                                     headers={"Prefer": "wait=3600", "Idempotency-Key": key}))


def test_a_retried_waiting_acquire_is_replayed_without_waiting(server: dict[str, Any]) -> None:
    client = server["client"]
    (job,) = client.post("/jobs/", json=[{"workdir": "w/0", "app_id": server["app_id"]}]).json()
    first: list = []
    _acquire(server, "key-1", first)
    assert [j["id"] for j in first[0].json()] == [job["id"]]
    # The answer was lost: the client sends the same request with the same key.
    again: list = []
    retry = threading.Thread(target=_acquire, args=(server, "key-1", again))
    retry.start()
    waits = server["app"].state.acquire_waits
    while not (again or waits._waiting):
        time.sleep(0.01)
    held = bool(waits._waiting)
    if held:  # the retry waits (the bug): the Session's deletion ends its wait
        client.delete(f"/sessions/{server['session']}")
    retry.join()
    assert not held, "the retry waited on the server before its replay"
    assert again[0].status_code == 200
    assert [j["id"] for j in again[0].json()] == [job["id"]]  # the same job, replayed

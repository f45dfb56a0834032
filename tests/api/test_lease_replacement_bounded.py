"""A lease that finds its Session gone creates a new one while it holds its lock (the acquiring
thread and every confirmation wait for it). That POST was retried for the client's whole budget
(~2.5 min, longer with slow 503s) under the lock; now as a heartbeat is (TICK_RETRY_COUNT), and
a failed replacement is tried again by the next request. Fake client and clock: no waits."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from balsam.client.lease import TICK_RETRY_COUNT, JobLease


class Gone404(Exception):
    status_code = 404


class Unavailable(Exception):
    status_code = 503


class FakeClient:
    def __init__(self) -> None:
        self.sessions = 0
        self.session_posts: list[dict] = []
        self.create_fails: Optional[Exception] = None
        self.gone: set[int] = set()

    def request(self) -> None:  # a client, not a factory
        pass

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        if path == "/sessions/":
            self.session_posts.append(kw)
            if self.create_fails is not None:
                raise self.create_fails
            self.sessions += 1
            return {"id": self.sessions}
        return []

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        session_id = int(path.rsplit("/", 1)[1])
        if session_id in self.gone:
            raise Gone404(f"Session {session_id} not found")
        return {"id": session_id, "gone": []}

    def delete(self, path: str, **kw: Any) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_env_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALSAM_SESSION_EXPIRE_SEC", raising=False)


def test_the_replacement_session_is_retried_as_a_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeClient()
    lease = JobLease(client, 1, tick_period=10, heartbeat_thread=False)
    assert client.session_posts == [{}]  # the start-up Session: the client's budget, as before
    client.gone.add(1)
    client.create_fails = Unavailable("The database is unavailable; retry shortly")
    with pytest.raises(Unavailable):
        lease.tick()
    assert client.session_posts[1] == {"retry_count": TICK_RETRY_COUNT}, client.session_posts
    assert lease.session_id == 1 and not lease._lock.locked()
    client.create_fails = None
    lease.tick()  # the next heartbeat finds it gone again and replaces it
    assert lease.session_id == 2 and client.session_posts[2] == {"retry_count": TICK_RETRY_COUNT}

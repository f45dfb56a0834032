"""A caller's deadline for one REST call (``RESTClient.request(..., deadline=...)``), and the serial
launcher's release bound that uses it (balsam.launcher.prefetch, "Giving back").

A server that accepts the connection and never answers held a call for one client read timeout
(120 s by default) per attempt, whatever the caller's own bound: the prefetcher's release, "given up
after 5 tries or 60 s", held its thread and every acquire for 120 s on its first try. Now a call
with a deadline waits no longer than the time left to it (each attempt's read and connect timeouts)
and is not retried past it; a call without one is sent as before (the pool's own timeouts).

The real RESTClient against a real TCP server that accepts and never answers. No timed assertion:
the client's clock is the test's (each attempt's wait moves it by the timeout the attempt was given),
the timeout each attempt was given is recorded at the pool, and the real wait is made short there
(the server's silence still ends it with the pool's own read timeout error). Both pools: the loopback
one (LocalHTTPPool, a server on this machine) and httpx's (any other server).
"""

from __future__ import annotations

import datetime as dt
import http.server
import socket
import threading
import types
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from balsam.client import rest
from balsam.client.rest import RESTClient, ServerUnavailable
from balsam.launcher import prefetch
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.prefetch import Prefetcher


@pytest.fixture(params=["local", "httpx"])
def pool_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "httpx":  # the pool of a remote server, here against the loopback one
        monkeypatch.setattr(rest, "local_pool_args", lambda api_root: None)
    return request.param


@pytest.fixture
def silent_server(pool_kind: str) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a server that accepts connections, reads, and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # kept open, never answered
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


class Waits:
    """The client's clock (``now``) and the timeouts its pool was given, one per attempt, as
    ``(read, connect)`` (None: no per-call timeout, the pool's own). Each attempt moves the clock by
    the wait it was allowed and really waits a fraction of a second for the silent server."""

    def __init__(self, client: RESTClient, monkeypatch: pytest.MonkeyPatch, now: float) -> None:
        import httpx

        self.now = now
        self.timeouts: list[Optional[tuple[float, float]]] = []
        self.client = client
        monkeypatch.setattr(rest, "time", types.SimpleNamespace(monotonic=lambda: self.now, sleep=self._sleep))
        pool = client._http()
        real = pool.request
        short: Any = httpx.Timeout(0.2) if isinstance(pool, httpx.Client) else 0.2

        def request(method: str, url: str, **kw: Any) -> Any:
            timeout = kw.pop("timeout", None)
            if isinstance(timeout, httpx.Timeout):
                self.timeouts.append((timeout.read, timeout.connect))
            else:  # LocalHTTPPool: one number, the connect's and the read's
                self.timeouts.append(None if timeout is None else (timeout, timeout))
            waited = self.timeouts[-1]
            self.now += client.read_timeout if waited is None else waited[0]  # the wait this attempt may take
            return real(method, url, timeout=short, **kw)

        monkeypatch.setattr(pool, "request", request)

    def _sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_call_with_a_deadline_waits_no_longer_than_the_time_left_and_is_not_retried_past_it(
        silent_server: str, pool_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = RESTClient(silent_server, read_timeout=120.0, connect_timeout=6.2, retry_count=3)
    waits = Waits(client, monkeypatch, now=1000.0)
    with pytest.raises(ServerUnavailable) as raised:
        client.post("/sessions/1/release", json={"job_ids": [1]}, idempotency_key="k", deadline=1007.5)
    # One attempt, given the 7.5 s left (not the 120 s read timeout); none after the deadline,
    # whatever the retry budget.
    assert waits.timeouts == [(7.5, 6.2 if pool_kind == "httpx" else 7.5)]
    assert client.request_counts["POST /sessions/1/release"] == 1
    assert "deadline" in str(raised.value) and "1 attempt" in str(raised.value)


def test_a_deadline_past_already_sends_nothing(silent_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, one attempt went out with a 1 ms timeout: a write the server applied, its answer lost."""
    client = RESTClient(silent_server, read_timeout=120.0, retry_count=0)
    waits = Waits(client, monkeypatch, now=1000.0)
    with pytest.raises(ServerUnavailable) as raised:
        client.post("/sessions/1/release", json={"job_ids": [1]}, idempotency_key="k", deadline=1000.0)
    assert waits.timeouts == [] and client.request_counts["POST /sessions/1/release"] == 0
    assert "not sent" in str(raised.value)


def test_a_token_renewal_made_for_a_call_waits_no_longer_than_its_deadline(
        silent_server: str, pool_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The access token is about to expire: the renewal (POST /auth/token) made inside the call is
    bounded by the call's deadline too (before, it waited the client's read timeout, 120 s), and
    the call itself is not sent once the deadline has passed."""
    client = RESTClient(silent_server, token="old", token_expiry=dt.datetime.now(dt.timezone.utc),
                        refresh_token="refresh", read_timeout=120.0, connect_timeout=6.2, retry_count=0)
    client.settings_path = None
    waits = Waits(client, monkeypatch, now=1000.0)
    with pytest.raises(ServerUnavailable) as raised:
        client.post("/sessions/1/release", json={"job_ids": [1]}, idempotency_key="k", deadline=1007.5)
    assert waits.timeouts == [(7.5, 6.2 if pool_kind == "httpx" else 7.5)]
    assert client.request_counts["POST /auth/token"] == 1 and client.request_counts["POST /sessions/1/release"] == 0
    assert "deadline" in str(raised.value)


def test_a_call_is_not_sent_again_after_a_renewal_that_ended_past_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 401, then a new access token answered once the deadline has passed: the call is not sent
    again (its attempt would have a 1 ms timeout: applied by the server, its answer lost)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hits.append(self.path)
            status, body = (200, b'{"access_token": "new", "expiration": null}') if self.path == "/auth/token" \
                else (401, b'{"detail": "expired"}')
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = RESTClient(f"http://127.0.0.1:{server.server_port}", token="old", refresh_token="refresh",
                            retry_count=0)
        client.settings_path = None
        now = [1000.0]
        monkeypatch.setattr(rest, "time", types.SimpleNamespace(monotonic=lambda: now[0], sleep=lambda s: None))
        pool = client._http()
        real = pool.request

        def request(method: str, url: str, **kw: Any) -> Any:
            answer = real(method, url, **kw)
            if url == "/auth/token":
                now[0] = 1010.0  # the renewal's answer came after the call's deadline
            return answer

        monkeypatch.setattr(pool, "request", request)
        with pytest.raises(ServerUnavailable) as raised:
            client.post("/sessions/1/release", json={"job_ids": [1]}, idempotency_key="k", deadline=1005.0)
        assert hits == ["/sessions/1/release", "/auth/token"] and "not sent" in str(raised.value)
        assert client.token == "new"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_call_without_a_deadline_is_sent_as_before(silent_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = RESTClient(silent_server, read_timeout=120.0, retry_count=1)
    waits = Waits(client, monkeypatch, now=1000.0)
    with pytest.raises(ServerUnavailable) as raised:
        client.get("/sessions")
    # No per-call timeout (the pool's: read_timeout), and the client's retries.
    assert waits.timeouts == [None, None] and "unreachable after 2 attempts" in str(raised.value)


def test_the_release_gives_up_within_its_bound_against_a_server_that_never_answers(
        silent_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The prefetcher's release (one request a try) waits at most RELEASE_GIVE_UP_SEC from its first
    try: its first try against a silent server is given that bound, and is then given up, with the
    acquires free to go on. Before: the try waited one read timeout (120 s), twice the bound."""
    client = RESTClient(silent_server, read_timeout=120.0, retry_count=10)
    waits = Waits(client, monkeypatch, now=500.0)
    monkeypatch.setattr(prefetch, "time", types.SimpleNamespace(monotonic=lambda: waits.now))
    lease = types.SimpleNamespace(client=client, session_id=7, lost_generation=0)
    f = Prefetcher(lambda: lease, lambda job: job, lambda demand: None, None, depth=4, remaining_min=lambda: 60,
                   release_after_sec=5.0, retry_sec=0.0)
    f.lease = lease
    job = PreparedJob(job=types.SimpleNamespace(id=3, wall_time_min=0), id=3, workdir=tmp_path, cmdline="true", env={})
    f.give_back([(job, 1)])
    f._send_release()
    assert [t and t[0] for t in waits.timeouts] == [prefetch.RELEASE_GIVE_UP_SEC]
    assert client.request_counts["POST /sessions/7/release"] == 1  # one request a try (no client retries)
    assert f.release_given_up and f.release_unknown == [3] and not f._releasing  # given up after that one try

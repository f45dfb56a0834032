"""A call gives up after the same budget of time whether the server is down (connection refused:
the backoff, 0.5 s doubling to 30 s, 10 retries: ~2.5 min) or answers 503 with ``Retry-After: 5``
(its database restarting). Obeyed ``retry_count`` times, the Retry-After made a call give up after
~50 s of a database outage (a PostgreSQL restart or fail-over takes 30-90 s), and every client came
back at the same instant. Fake clock and transport: no real waits.

The fake clock is the test's thread's alone: ``rest.time`` is the process's ``time`` module, and a
pytest worker holds other threads that sleep (an in-process server's session watch,
balsam.server.sessions_logic._ProcessWatch, sleeps 0.5 s in a loop for the rest of the process).
Faked for every thread, their sleeps were counted among the call's waits (and spun, each returning
at once): under load, one fell within a call and failed ``5 <= wait``."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

import balsam.client.rest as rest
from balsam.client import APIError, RESTClient, ServerUnavailable


class FakeClock:
    """``time.monotonic`` and ``time.sleep`` of the thread that made it; any other thread gets the
    real ones (see the module's docstring)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self._owner = threading.get_ident()
        self._real_monotonic = time.monotonic
        self._real_sleep = time.sleep

    def monotonic(self) -> float:
        if threading.get_ident() != self._owner:
            return self._real_monotonic()
        return self.now

    def sleep(self, seconds: float) -> None:
        if threading.get_ident() != self._owner:
            self._real_sleep(seconds)
            return
        self.sleeps.append(seconds)
        self.now += seconds


class ScriptedPool:
    """Answers each request from ``answer(n)`` (n: the request's number from 0): an
    ``httpx.Response``, or an exception to raise (no connection)."""

    def __init__(self, answer) -> None:  # noqa: ANN001
        self.answer = answer
        self.count = 0

    def request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        n, self.count = self.count, self.count + 1
        result = self.answer(n)
        if isinstance(result, BaseException):
            raise result
        return result


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(rest.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(rest.time, "sleep", fake.sleep)
    return fake


def client_with(answer, retry_count: int = 10) -> tuple[RESTClient, ScriptedPool]:  # noqa: ANN001
    client = RESTClient("http://balsam.invalid", "tok", retry_count=retry_count, connect_wait=float("inf"))
    pool = ScriptedPool(answer)
    client._http = lambda: pool  # type: ignore[method-assign]
    client._retry_errors = (httpx.TransportError,)
    return client, pool


def unavailable(n: int) -> httpx.Response:
    return httpx.Response(503, json={"detail": "The database is unavailable; retry shortly"},
                          headers={"Retry-After": "5"})


def refused(n: int) -> BaseException:
    return httpx.ConnectError("[Errno 111] Connection refused")


def test_database_outage_503_is_retried_as_long_as_a_server_that_is_down(clock: FakeClock) -> None:
    client, _ = client_with(refused)
    with pytest.raises(ServerUnavailable):
        client.get("/sites/")
    down = sum(clock.sleeps)
    assert 151.5 <= down <= 151.5 * 1.25  # the backoff schedule, with its jitter

    clock.sleeps.clear()
    client, pool = client_with(unavailable)
    with pytest.raises(APIError) as info:
        client.get("/sites/")
    assert info.value.status_code == 503
    outage = sum(clock.sleeps)
    # The same budget (151.5 s of waits by the schedule): 30 waits of Retry-After 5, not 10.
    assert pool.count == 31
    assert 150 <= outage <= 150 * 1.1
    assert outage >= 0.75 * down


def test_a_database_back_after_80_s_is_ridden_out(clock: FakeClock) -> None:
    start = clock.now
    client, pool = client_with(lambda n: unavailable(n) if clock.now - start < 80
                               else httpx.Response(200, json={"ok": True}))
    assert client.get("/sites/") == {"ok": True}
    assert 80 <= clock.now - start <= 80 + 5.5 * 1.1


def test_retry_after_waits_are_spread(clock: FakeClock) -> None:
    client, _ = client_with(unavailable)
    with pytest.raises(APIError):
        client.get("/sites/")
    assert all(5 <= wait <= 5.5 for wait in clock.sleeps)
    assert len({round(wait, 6) for wait in clock.sleeps}) > 1  # not every client back at the same instant


def test_retry_after_waits_are_spread_beside_a_thread_that_sleeps(clock: FakeClock) -> None:
    """The same waits while another thread of the process sleeps during the call, as the session
    watch of an earlier test's in-process server does: its sleeps are not the call's, and do not
    move the call's clock. Events order the two threads: nothing here depends on timing."""
    slept, stop = threading.Event(), threading.Event()

    def watch() -> None:  # balsam.server.sessions_logic._ProcessWatch._run's loop, shortened
        while not stop.is_set():
            time.sleep(0.001)
            slept.set()

    watcher = threading.Thread(target=watch, name="sleeping-neighbour", daemon=True)

    def answer(n: int) -> httpx.Response:
        if n == 0:  # the neighbour has slept once within the call before the call's first wait
            watcher.start()
            slept.wait()
        return unavailable(n)

    start = clock.now
    client, pool = client_with(answer)
    try:
        with pytest.raises(APIError):
            client.get("/sites/")
    finally:
        stop.set()
        if watcher.ident is not None:  # started
            watcher.join()
    assert pool.count == 31 and len(clock.sleeps) == 30, (pool.count, len(clock.sleeps), clock.sleeps[:5])
    assert all(5 <= wait <= 5.5 for wait in clock.sleeps)
    assert len({round(wait, 6) for wait in clock.sleeps}) > 1
    assert clock.now - start == pytest.approx(sum(clock.sleeps))  # moved by the call's own waits alone


def test_short_retry_counts_keep_their_retries(clock: FakeClock) -> None:
    # A heartbeat (2 retries: it is sent again next period) or a call with none is not stretched:
    # their budget (0.5 + 1 s) holds no wait of 5 s.
    for retries in (0, 2):
        client, pool = client_with(unavailable, retry_count=retries)
        with pytest.raises(APIError):
            client.get("/sites/")
        assert pool.count == retries + 1


def test_retry_after_zero_gets_the_backoff_not_a_tight_loop(clock: FakeClock) -> None:
    client, pool = client_with(lambda n: httpx.Response(503, json={}, headers={"Retry-After": "0"}), retry_count=3)
    with pytest.raises(APIError):
        client.get("/sites/")
    assert pool.count == 4 and all(wait >= 0.5 for wait in clock.sleeps)


def test_server_down_after_503s_is_retried_to_the_end_of_the_budget(clock: FakeClock) -> None:
    # 20 answers of 503 (more than retry_count), then the server restarts: its refused connections
    # are retried until the budget is spent, not given up at once.
    client, pool = client_with(lambda n: unavailable(n) if n < 20 else refused(n))
    with pytest.raises(ServerUnavailable):
        client.get("/sites/")
    assert pool.count > 21
    assert sum(clock.sleeps) <= 151.5 * 1.25


def slow_unavailable(clock: FakeClock, retry_after: str, seconds: float = 10.0):  # noqa: ANN201
    """503s that each take the server ``seconds`` (a vanished database host: libpq's connect
    timeout of 10 s per request)."""
    def answer(n: int) -> httpx.Response:
        clock.now += seconds
        return httpx.Response(503, json={"detail": "The database is unavailable; retry shortly"},
                              headers={"Retry-After": retry_after})
    return answer


@pytest.mark.parametrize("retry_after", ["5", "1"])
def test_slow_503s_end_within_the_budget_of_time(clock: FakeClock, retry_after: str) -> None:
    """The budget bounds the call's time, its attempts' own included: counted by its waits alone, a
    call of 10 s 503s went on for ~467 s (Retry-After 5) or 152 attempts over ~28 min (Retry-After 1)."""
    start = clock.now
    client, pool = client_with(slow_unavailable(clock, retry_after))
    with pytest.raises(APIError):
        client.get("/sites/")
    assert pool.count >= 11  # never fewer than retry_count retries
    # The budget (151.5 s) less the waits' jitter, then at most one more wait and attempt.
    assert clock.now - start <= 151.5 + sum(clock.sleeps) * 0.1 + 5.5 + 10, (pool.count, clock.now - start)


@pytest.mark.parametrize("retries", [3, 4, 5, 9])
def test_short_retry_counts_keep_their_retries_for_a_short_retry_after(clock: FakeClock, retries: int) -> None:
    """A retry_count below the default is a number of retries, whatever the Retry-After (4-5 got
    8-16 attempts of Retry-After 1 within their budgets of 7.5-15.5 s)."""
    client, pool = client_with(lambda n: httpx.Response(503, json={}, headers={"Retry-After": "1"}), retry_count=retries)
    with pytest.raises(APIError):
        client.get("/sites/")
    assert pool.count == retries + 1


def test_short_retry_counts_are_not_stretched_by_refusals_after_503s(clock: FakeClock) -> None:
    # 503s with Retry-After 1, then the server goes down: still retry_count retries in all.
    client, pool = client_with(lambda n: httpx.Response(503, json={}, headers={"Retry-After": "1"}) if n < 3
                               else refused(n), retry_count=5)
    with pytest.raises(ServerUnavailable):
        client.get("/sites/")
    assert pool.count == 6

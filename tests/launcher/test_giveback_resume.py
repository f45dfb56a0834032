"""Giving back resumes after a release was given up (balsam.launcher.prefetch, "Giving back").

A release that keeps failing (no answer, 5xx, 429) is given up after MAX_RELEASE_TRIES tries or
RELEASE_GIVE_UP_SEC, so that acquires go on. Before: nothing was given back again for the rest of the
launcher's run, so a 24 h launcher whose server was out of reach for a minute held its lookahead,
hidden from the elastic queue and from other BatchJobs, at every stall for hours. Now giving back
resumes once the given-up release has settled (answered, its Session gone, or refused for good) and
RELEASE_RESUME_SEC has passed; not on any answer (an acquire): a release route failing for good while
acquires were answered then stranded one more batch of stalled jobs at each resumption. A server
without the route (405) still stops it for good. Jobs set aside as too late meanwhile are given back
once it resumes. A try is one request (RELEASE_RETRY_COUNT): with the client's own retries one try
on a 503 route held every acquire back for minutes, past the give-up's bound.

The no-run-twice guarantees are checked across the resumption: the jobs of the given-up release are
never handed to the loop while it is unsettled (even when leased again), the resumed release is a new
request (a new key) naming only jobs the loop gave back, and every job ends up leased by the other
launcher exactly once.

Real components: a uvicorn server (SQLite, PostgreSQL), the real client and JobLease, the
prefetcher's own thread; lost answers, a 503 route and a 405 are injected around the real client
(test_release_resend's harness); the real RESTClient against a real HTTP server answering 503. The
back-off's doubling and the too-late jobs on their own: the prefetcher without its thread, the
test's clock (test_prefetch_release_units). No timed assertion: the tests wait for states (and count
resends), and the 503 test's client backoff moves the test's clock.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from typing import Any, Callable, Iterator, Optional

import pytest

from balsam.client import rest
from balsam.client.rest import RESTClient
from balsam.launcher import prefetch
from balsam.launcher.app_run import PreparedJob

import test_release_resend
from launcher_helpers import make_runnable
from test_prefetch_release_units import Lease, Refused, busy_fetcher, clock, prepared  # noqa: F401
from test_release_resend import APPLIED, UNREACHED, Launcher, LossyClient, wait_until


class NoRoute(Exception):
    """An older server's answer to the release route."""

    status_code = 405
    detail = "Method Not Allowed"


class PickyClient(LossyClient):
    """:class:`LossyClient` whose losses apply only to the releases ``only`` picks (by their ids), and
    which can answer releases like a server without the route (``no_route``)."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.only: Callable[[list[int]], bool] = lambda ids: True
        self.no_route = False
        self.acquires = 0  # acquires answered

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        if path.endswith("/release"):
            ids = list(json["job_ids"])
            if self.no_route:
                self.releases.append((ids, kw.get("idempotency_key", "")))
                raise NoRoute("405 Method Not Allowed")
            if not self.only(ids):
                self.releases.append((ids, kw.get("idempotency_key", "")))
                return self.client.post(path, json=json, **kw)
            return super().post(path, json=json, **kw)
        answer = super().post(path, json=json, **kw)
        if path.rstrip("/") != "/sessions":  # not the Session's creation
            self.acquires += 1
        return answer


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fractions of a second instead of 5 s and 60 s; raising=False: the tests also run against the
    # code before the resumption existed, where they fail waiting for it.
    monkeypatch.setattr(prefetch, "RELEASE_RESEND_FIRST_SEC", 0.2, raising=False)
    monkeypatch.setattr(prefetch, "RELEASE_RESEND_MAX_SEC", 0.4, raising=False)
    monkeypatch.setattr(prefetch, "RELEASE_RESUME_SEC", 0.2, raising=False)
    # The harness's lease and prefetcher go through a PickyClient.
    monkeypatch.setattr(test_release_resend, "LossyClient", PickyClient)


@contextlib.contextmanager
def _started(count: int) -> Iterator[tuple[Launcher, list[PreparedJob]]]:
    """A :class:`Launcher` of ``count`` jobs, every one taken by the loop (every slot busy):
    ``(launcher, taken)``; closed on the way out, failed or not."""
    launcher = Launcher(count)
    try:
        yield launcher, launcher.start_and_take_all()
    finally:
        launcher.close()


def _give_up(launcher: Launcher, jobs: list[PreparedJob], how: str,
             only: Optional[Callable[[list[int]], bool]] = None) -> None:
    launcher.lossy.lose = how
    if only is not None:
        launcher.lossy.only = only
    launcher.f.give_back([(p, launcher.f.taken_generation) for p in jobs])
    wait_until("the release was given up", lambda: launcher.f.release_given_up)
    assert not launcher.f.may_give_back and launcher.f.release_unknown == sorted(p.id for p in jobs)


def _add_jobs(launcher: Launcher, count: int) -> list[int]:
    from balsam.api import App, Job

    app = App.objects.get(site_id=launcher.site.id, name="A")
    return sorted(make_runnable(Job(workdir=f"later/{i}", app_id=app.id) for i in range(count)))


def _leased_elsewhere(launcher: Launcher, ids: list[int]) -> list[int]:
    got: list[int] = []
    wait_until("another launcher leased the given-back jobs",
               lambda: got.extend(launcher.lease_elsewhere(len(launcher.ids))) or sorted(got) == sorted(ids))
    return got


@pytest.mark.parametrize("env", ["balsam_env", "balsam_env_pg"])
def test_giving_back_resumes_once_the_server_answers_again(
        env: str, request: pytest.FixtureRequest, quick: None) -> None:
    request.getfixturevalue(env)
    with _started(6) as (launcher, taken):
        f = launcher.f
        first, rest = taken[:3], taken[3:]
        _give_up(launcher, first, UNREACHED)  # the server out of reach: no try reached it
        launcher.lossy.lose = None  # back: the resend of the given-up release is answered
        wait_until("the given-up release was answered", lambda: f.release_unknown == [])
        # The loop's other jobs stall later (every slot busy): they can be given back again.
        wait_until("giving back resumed", lambda: f.may_give_back, timeout=30)
        assert f.release_give_ups == 1
        f.give_back([(p, f.taken_generation) for p in rest])
        got = _leased_elsewhere(launcher, launcher.ids)
        # The server applied the release before its answer reached the launcher's thread (a loaded
        # CI machine: released read 3): the count follows the answer.
        wait_until("the release's answer was taken", lambda: f.released == 6)
        assert sorted(got) == launcher.ids and f.take() == [] and f.backlog == 0
        # A new request (a new key) for the resumed release; it names only the loop's jobs.
        first_key = launcher.lossy.releases[0][1]
        last_ids, last_key = launcher.lossy.releases[-1]
        assert last_key != first_key and last_ids == sorted(p.id for p in rest)


def _resends_after(launcher: Launcher, count: int) -> None:
    """Wait for ``count`` more resends of the given-up release: each comes RELEASE_RESEND_FIRST_SEC
    at least after the last, on the prefetch thread, which looks at resuming right after each; so
    past the back-off (the fixture's), the resumption the code would make has been made."""
    seen = len(launcher.lossy.releases)
    wait_until(f"{count} more resends", lambda: len(launcher.lossy.releases) >= seen + count)


@pytest.mark.parametrize("env", ["balsam_env", "balsam_env_pg"])
def test_no_resumption_while_the_given_up_release_is_unsettled_and_one_once_it_settles(
        env: str, request: pytest.FixtureRequest, quick: None) -> None:
    """Before: an answered acquire let giving back resume while the given-up release was still
    unsettled, so the next stall's jobs went into a new release that could be given up in turn
    (see test_a_release_route_failing_for_good_strands_one_batch_only)."""
    request.getfixturevalue(env)
    with _started(6) as (launcher, taken):
        f = launcher.f
        first, running = taken[:3], taken[3:]
        first_ids = sorted(p.id for p in first)
        # The first try freed them; every answer to that request is lost from now on (its resends too).
        _give_up(launcher, first, APPLIED, only=lambda ids: ids == first_ids)
        launcher.lossy.lose = UNREACHED
        # The other three run; three slots free: an acquire is answered (the server answers) and
        # leases the first three again: not handed over (a try may still free them).
        f.note_held(0, 3)
        wait_until("the jobs were leased again", lambda: f.acquired == 9)
        assert f.take() == [] and f.release_unknown == first_ids
        # New work comes; the loop takes it, and it stalls (every slot busy).
        later = _add_jobs(launcher, 3)
        wait_until("the new jobs were leased", lambda: f.backlog == 3)
        stalled = f.take()
        assert sorted(p.id for p in stalled) == later
        f.note_held(3, 0)
        # Past the back-off, acquires answered, the given-up release unsettled: no giving back.
        _resends_after(launcher, 3)
        assert f.release_given_up and not f.may_give_back and f.release_unknown == first_ids
        # The server answers the first request: settled; the jobs leased again go back in a new
        # release, and giving back resumes: the stalled jobs are given back in another.
        launcher.lossy.lose = None
        wait_until("giving back resumed", lambda: f.may_give_back, timeout=30)
        assert f.release_unknown == [] and f.release_give_ups == 1
        f.give_back([(p, f.taken_generation) for p in stalled])
        got = _leased_elsewhere(launcher, first_ids + later)
        assert sorted(got) == sorted(first_ids + later) and f.take() == [] and f.backlog == 0
        # Never sent: the running jobs. The resumed release and the parked jobs' one: new keys.
        sent = {i for ids, _key in launcher.lossy.releases for i in ids}
        assert not sent & {p.id for p in running}
        first_key = launcher.lossy.releases[0][1]
        resumed = {key for ids, key in launcher.lossy.releases if ids == later}
        assert len(resumed) == 1 and first_key not in resumed
        # The given-up one (its resends), the one giving back the parked jobs, and the resumed one.
        assert len({key for _ids, key in launcher.lossy.releases}) == 3


class RouteDown(Exception):
    """A release route failing for good (a proxy's or the server's 5xx): nothing was applied."""

    status_code = 503
    detail = "Service Unavailable"


class RouteDownClient:
    """The real client, but its release route answers 503."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        if path.endswith("/release"):
            raise RouteDown("HTTP 503 (release route down)")
        return self.client.post(path, json=json, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_a_release_route_failing_for_good_strands_one_batch_only(balsam_env: Any, quick: None) -> None:
    """The release route answers 503 for good while acquires are answered. Before: each resumption
    gave the next stall's jobs to a release given up in turn: 3, 6, 9 jobs held by this Session in
    release_unknown (never started here, never freed) until its end. Now giving back stays off
    while the given-up release is unsettled: the stalled jobs stay with the loop (it starts them
    when slots free), and only the first batch waits for the route."""
    with _started(3) as (launcher, taken):
        f = launcher.f
        lossy = launcher.lossy
        first_ids = sorted(p.id for p in taken)
        _give_up(launcher, taken, UNREACHED)
        lossy.lose = None
        lossy.only = lambda ids: False  # releases are recorded and go to the client below
        lossy.client = RouteDownClient(launcher.client)
        for _round in range(3):
            _add_jobs(launcher, 3)
            f.note_held(0, 3)  # slots free: an acquire is answered
            wait_until("the new jobs were leased", lambda: f.backlog == 3)
            stalled = f.take()
            f.note_held(3, 0)  # every slot busy again: they stall
            _resends_after(launcher, 2)  # past the back-off
            assert not f.may_give_back, "giving back resumed while the given-up release is unsettled"
        assert f.release_unknown == first_ids and f.release_give_ups == 1 and len(f._unsettled) == 1
        # The route comes back: the first batch is released, and giving back resumes.
        lossy.client = launcher.client
        wait_until("giving back resumed", lambda: f.may_give_back, timeout=30)
        f.give_back([(p, f.taken_generation) for p in stalled])
        got = _leased_elsewhere(launcher, first_ids + sorted(p.id for p in stalled))
        assert f.release_unknown == [] and len(got) == 6


def test_a_server_without_the_route_stops_giving_back_for_good(balsam_env: Any, quick: None) -> None:
    with _started(4) as (launcher, taken):
        f = launcher.f
        launcher.lossy.no_route = True
        f.give_back([(taken[0], f.taken_generation)])
        wait_until("the release was refused", lambda: f.release_refused)
        # Handed back to the loop (started here as before); later acquires are answered.
        wait_until("the job came back to the loop", lambda: f.backlog == 1)
        f.take()
        acquires = launcher.lossy.acquires
        f.note_held(0, 2)
        wait_until("an acquire was answered after the refusal", lambda: launcher.lossy.acquires > acquires)
        time.sleep(5 * prefetch.RELEASE_RESUME_SEC)  # past any back-off: still no giving back
        assert not f.may_release and not f.may_give_back and f.release_refused
        assert len(launcher.lossy.releases) == 1


def _fail_until_given_up(f: Any, lease: Any, ids: list[int]) -> None:
    lease.client.fail = [Refused(None) for _ in range(prefetch.MAX_RELEASE_TRIES)]
    f.give_back([(prepared(i), 1) for i in ids])
    while f._releasing:
        f._send_release()
    assert f.release_given_up and not f.may_give_back and not lease.client.fail


def test_the_wait_before_resuming_doubles_at_each_give_up_and_starts_over_once_a_release_is_answered(
        clock: list[float]) -> None:
    """The back-off on its own (the prefetcher without its thread, the test's clock and client)."""
    lease = Lease()
    f = busy_fetcher(lease)
    wait = prefetch.RELEASE_RESUME_SEC
    _fail_until_given_up(f, lease, [5, 6])
    clock[0] += wait
    f._resume_release()
    assert f.release_given_up  # the back-off passed, but the given-up release is not settled
    f._resend_unsettled()  # the given-up release, resent: answered
    assert f.release_unknown == []
    f._resume_release()
    assert not f.release_given_up and f.may_give_back
    # Given up again at once: twice the wait, answered or not.
    _fail_until_given_up(f, lease, [7])
    clock[0] += wait
    f._resend_unsettled()
    f._resume_release()
    assert f.release_given_up and f.release_unknown == []
    clock[0] += wait
    f._resume_release()
    assert not f.release_given_up and f.release_give_ups == 2
    # A release answered: the next give-up waits the first wait again.
    f.give_back([(prepared(8), 1)])
    f._send_release()
    assert f.released == 4
    _fail_until_given_up(f, lease, [9])
    clock[0] += wait
    f._resend_unsettled()
    f._resume_release()
    assert not f.release_given_up


def test_jobs_set_aside_as_too_late_while_given_up_are_given_back_once_it_resumes(clock: list[float]) -> None:
    """Before: a job the prefetcher set aside as too long for the time left while giving back was
    given up stayed leased (hidden from the elastic queue and from launchers with time left) until
    the Session's deletion, also after giving back resumed. A lost Session's is not sent."""
    lease = Lease()
    f = busy_fetcher(lease)
    _fail_until_given_up(f, lease, [5])
    late, old = prepared(42), prepared(43)
    late.job.wall_time_min = old.job.wall_time_min = 120  # 60 min left
    with f._lock:  # an acquire of this Session (number 2) and one of a Session lost since (1)
        f._ready.extend([old, late])
        f._ready_generations.extend([1, 2])
    assert f.take() == [] and sorted(p.id for p in f.too_late) == [42, 43]
    lease.lost_generation = 1
    clock[0] += max(prefetch.RELEASE_RESUME_SEC, prefetch.RELEASE_RESEND_FIRST_SEC)
    f._resend_unsettled()  # the given-up release, answered: settled
    f._resume_release()
    assert f.may_release and f.too_late == [] and f.releasing == 2
    while f._releasing:
        f._send_release()
    posted = [json["job_ids"] for path, json, _key in lease.client.posts if path.endswith("/release")]
    assert posted[-1] == [42] and 43 not in {i for ids in posted for i in ids} and f.may_give_back


class Http503(http.server.BaseHTTPRequestHandler):
    """A server (or its proxy) whose release route answers 503 to every request."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"detail": "down"}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def route_503() -> Any:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Http503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_release_answered_503_is_given_up_within_its_bound_with_the_real_client(
        clock: list[float], route_503: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: each try was a client call with the client's own retries (10 by default, backoff up to
    30 s), ~3 minutes on 503s (11 requests) and up to 11 read timeouts on a server that never
    answers, while every acquire waited: the bound of 60 s held nothing. Now a try is one request.
    The real RESTClient against a real HTTP server; its backoff sleeps move the test's clock."""
    client = RESTClient(route_503, token="t", allow_insecure_http=True)  # the default retries
    # rest.time is the process's time module: only this thread's sleeps move the test's clock (an
    # in-process server's session-watch thread, left by an earlier test of this worker, slept on
    # it and moved the clock by 1,615 s in a CI run); other threads sleep for real.
    mine, real_sleep = threading.get_ident(), time.sleep

    def sleep(sec: float) -> None:
        if threading.get_ident() == mine:
            clock[0] += sec
        else:
            real_sleep(sec)

    monkeypatch.setattr(rest.time, "sleep", sleep)
    lease = Lease()
    lease.client = client  # type: ignore[assignment]
    f = busy_fetcher(lease)
    start = clock[0]
    f.give_back([(prepared(5), 1)])
    while f._releasing:
        f._send_release()
    assert f.release_given_up and f.release_unknown == [5]
    assert clock[0] - start <= prefetch.RELEASE_GIVE_UP_SEC
    assert client.request_counts["POST /sessions/7/release"] == prefetch.MAX_RELEASE_TRIES

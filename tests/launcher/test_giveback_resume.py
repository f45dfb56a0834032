"""Giving back resumes after a release was given up (balsam.launcher.prefetch, "Giving back").

A release that keeps failing (no answer, 5xx, 429) is given up after MAX_RELEASE_TRIES tries or
RELEASE_GIVE_UP_SEC, so that acquires go on. Before: nothing was given back again for the rest of the
launcher's run, so a 24 h launcher whose server was out of reach for a minute held its lookahead,
hidden from the elastic queue and from other BatchJobs, at every stall for hours. Now giving back
resumes once the server answers again (an acquire, or a resend of the given-up release) and
RELEASE_RESUME_SEC has passed; a server without the route (405) still stops it for good.

The no-run-twice guarantees are checked across the resumption: the jobs of the given-up release are
never handed to the loop while it is unsettled (even when leased again), the resumed release is a new
request (a new key) naming only jobs the loop gave back, and every job ends up leased by the other
launcher exactly once.

Real components: a uvicorn server (SQLite, PostgreSQL), the real client and JobLease, the
prefetcher's own thread; lost answers and a 405 are injected around the real client
(test_release_resend's harness). The back-off's doubling on its own: the prefetcher without its
thread, the test's clock (test_prefetch_release_units). No timed assertion: the tests wait for states.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import pytest

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
    monkeypatch.setattr(prefetch, "RELEASE_RESUME_SEC", 0.2, raising=False)
    # The harness's lease and prefetcher go through a PickyClient.
    monkeypatch.setattr(test_release_resend, "LossyClient", PickyClient)


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
    launcher = Launcher(6)
    f = launcher.f
    try:
        taken = launcher.start_and_take_all()
        first, rest = taken[:3], taken[3:]
        _give_up(launcher, first, UNREACHED)  # the server out of reach: no try reached it
        launcher.lossy.lose = None  # back: the resend of the given-up release is answered
        wait_until("the given-up release was answered", lambda: f.release_unknown == [])
        # The loop's other jobs stall later (every slot busy): they can be given back again.
        wait_until("giving back resumed", lambda: f.may_give_back, timeout=30)
        assert f.release_give_ups == 1
        f.give_back([(p, f.taken_generation) for p in rest])
        got = _leased_elsewhere(launcher, launcher.ids)
        assert sorted(got) == launcher.ids and f.released == 6 and f.take() == [] and f.backlog == 0
        # A new request (a new key) for the resumed release; it names only the loop's jobs.
        first_key = launcher.lossy.releases[0][1]
        last_ids, last_key = launcher.lossy.releases[-1]
        assert last_key != first_key and last_ids == sorted(p.id for p in rest)
    finally:
        launcher.close()


@pytest.mark.parametrize("env", ["balsam_env", "balsam_env_pg"])
def test_resumed_while_the_given_up_release_is_unsettled_runs_nothing_twice(
        env: str, request: pytest.FixtureRequest, quick: None) -> None:
    request.getfixturevalue(env)
    launcher = Launcher(6)
    f = launcher.f
    try:
        taken = launcher.start_and_take_all()
        first, running = taken[:3], taken[3:]
        first_ids = sorted(p.id for p in first)
        # The first try freed them; every answer to that request is lost from now on (its resends too).
        _give_up(launcher, first, APPLIED, only=lambda ids: ids == first_ids)
        launcher.lossy.lose = UNREACHED
        # The other three run; three slots free: an acquire is answered (the server answers again)
        # and leases the first three again: not handed over (a try may still free them).
        f.note_held(0, 3)
        wait_until("the jobs were leased again", lambda: f.acquired == 9)
        wait_until("giving back resumed", lambda: f.may_give_back, timeout=30)
        assert f.take() == [] and f.release_unknown == first_ids and f.release_give_ups == 1
        # New work comes; the loop takes it, and it stalls (every slot busy): given back in a new
        # request, answered, while the first is still unsettled.
        later = _add_jobs(launcher, 3)
        wait_until("the new jobs were leased", lambda: f.backlog == 3)
        stalled = f.take()
        assert sorted(p.id for p in stalled) == later
        f.note_held(3, 0)
        f.give_back([(p, f.taken_generation) for p in stalled])
        got = _leased_elsewhere(launcher, later)
        assert f.take() == [] and f.release_unknown == first_ids
        # The server answers the first request too: the jobs leased again go back in a new release.
        launcher.lossy.lose = None
        got += _leased_elsewhere(launcher, first_ids)
        assert sorted(got) == sorted(first_ids + later) and f.take() == [] and f.backlog == 0
        wait_until("every release was answered", lambda: f.release_unknown == [])
        # Never sent: the running jobs. The resumed release and the parked jobs' one: new keys.
        sent = {i for ids, _key in launcher.lossy.releases for i in ids}
        assert not sent & {p.id for p in running}
        first_key = launcher.lossy.releases[0][1]
        resumed = {key for ids, key in launcher.lossy.releases if ids == later}
        assert len(resumed) == 1 and first_key not in resumed
        # The given-up one (its resends), the resumed one, and the one giving back the parked jobs.
        assert len({key for _ids, key in launcher.lossy.releases}) == 3
    finally:
        launcher.close()


def test_a_server_without_the_route_stops_giving_back_for_good(balsam_env: Any, quick: None) -> None:
    launcher = Launcher(4)
    f = launcher.f
    try:
        taken = launcher.start_and_take_all()
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
    finally:
        launcher.close()


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
    assert f.release_given_up  # the back-off passed, but the server has not answered since
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

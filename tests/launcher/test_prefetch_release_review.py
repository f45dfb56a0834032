"""Review fixes of the prefetcher's giving back (balsam.launcher.prefetch, "Giving back"), on its
own and with the serial master's loop (no thread, no sleep, the clock is the test's):

- a lean prefetcher leases the free room beside held jobs that cannot be placed now (before: none
  while any job was held, so a slot freed beside a whole-node job stood idle);
- only a server without the route (405, a 404 naming no Session) stops the giving back, and the
  prefetcher is then no longer lean (before: any 404/422 stopped it, and it stayed lean for good);
- a release names at most 2,048 ids, never jobs of a lost Session, and a new Session gets a new key;
- a release refused after an unanswered try never hands its jobs back to the loop (it may have
  been applied);
- jobs too long for the time left are given back too (before: held until the Session's deletion).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from balsam.models import MAX_JOBS_PER_SESSION_ACQUIRE as MAX_RELEASE_IDS  # the server's bound
from test_prefetch_release_units import Lease, Refused, busy_fetcher, clock, fetcher, prepared  # noqa: F401
from test_serial_too_late import _exit, _prepared, _sent, make_master


class Answered(Refused):
    """A refusal with the server's ``detail`` (balsam.client.rest.APIError has both)."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(status_code)
        self.detail = detail


NO_ROUTE = [Refused(405), Answered(404, "Not found: no route POST /sessions/7/release"), Answered(404, "Not Found")]
OTHER = [Answered(404, "Session 7 not found (it may have expired: no heartbeat for too long)"),
         Answered(422, "job_ids: expected a JSON object with job_ids")]


@pytest.mark.parametrize("refusal", NO_ROUTE, ids=["405", "no-route-404", "plain-404"])
def test_a_server_without_the_route_stops_the_giving_back_and_the_lean_state(clock: list[float], refusal: Exception) -> None:
    lease = Lease()
    f = busy_fetcher(lease)
    lease.client.fail = [refusal]
    f.give_back([(prepared(5), 1), (prepared(6), 1)])
    assert f.lean
    f._send_release()
    assert f.release_refused and not f.may_give_back and not f.lean
    assert [p.id for p in f.take()] == [5, 6]
    # One slot frees while the loop holds one job it cannot place: the lookahead is back, and leases.
    f.note_held(1, None, 1)
    clock[0] += 60
    f._measure_rate()
    assert f._target() >= f.floor


@pytest.mark.parametrize("refusal", OTHER, ids=["session-gone-404", "422"])
def test_other_refusals_return_the_jobs_and_the_next_stall_gives_back_again(clock: list[float], refusal: Exception) -> None:
    lease = Lease()
    f = fetcher(lease)
    lease.client.fail = [refusal]
    f.give_back([(prepared(5), 3), (prepared(6), 4)])
    f._send_release()
    first_key = lease.client.posts[-1][2]
    assert not f.release_refused and f.may_give_back
    assert [p.id for p in f.take()] == [5, 6] and f.taken_generation == 4
    f.give_back([(prepared(5), 3)])
    f._send_release()
    assert lease.client.posts[-1][1] == {"job_ids": [5]} and lease.client.posts[-1][2] != first_key
    assert f.released == 1


def test_a_lean_prefetcher_leases_the_room_beside_jobs_that_do_not_fit(clock: list[float]) -> None:
    lease = Lease()
    f = busy_fetcher(lease, given_back=range(3, 11))
    f._send_release()
    assert f.lean
    # A slot frees; the loop holds one job that needs the whole node (it cannot be placed now).
    f.note_held(1, 1, 1)
    assert f._target() == 2  # the held job and the free slot: one job leased for the slot
    # Two such jobs held and one slot free: still leased at once (not at half the target).
    lease.acquired.clear()
    f.note_held(2, 1, 1)

    def acquire(count: int, **kw: Any) -> list[Any]:
        lease.acquired.append(count)
        f.stop()
        return []

    lease.acquire = acquire  # type: ignore[method-assign]
    f._open_lease = lambda: lease
    f._run()
    assert lease.acquired == [1]
    # Held jobs are counted up to the floor only: a queue of whole-node jobs is not leased whole.
    f.note_held(50, 1, 1)
    assert f._target() == f.floor + 1


def test_a_release_names_at_most_2048_ids_each_under_its_own_key(clock: list[float]) -> None:
    lease = Lease()
    f = fetcher(lease)
    count = MAX_RELEASE_IDS + 952
    f.give_back([(prepared(i), 1) for i in range(1, count + 1)])
    f._send_release()
    assert f._releasing and not f.may_give_back  # the rest before any acquire
    f._send_release()
    sizes = [len(body["job_ids"]) for _, body, _ in lease.client.posts]
    assert sizes == [2048, 952] and len({key for _, _, key in lease.client.posts}) == 2
    assert f.released == count and not f._releasing


def test_jobs_of_a_lost_session_are_not_released_and_a_new_session_gets_a_new_key(clock: list[float]) -> None:
    lease = Lease()
    f = fetcher(lease)
    lease.client.fail = [Refused(None)]  # unanswered: the key is kept for a resend
    f.give_back([(prepared(5), 3), (prepared(6), 4)])
    f._send_release()
    first_key = lease.client.posts[-1][2]
    # The lease lost Session 7 (its jobs up to acquire 4 were freed with it) and opened Session 8.
    lease.session_id, lease.lost_generation = 8, 4
    f._send_release()
    assert len(lease.client.posts) == 1 and not f._releasing  # nothing of the lost Session is sent
    f.give_back([(prepared(9), 5)])
    f._send_release()
    path, body, key = lease.client.posts[-1]
    assert path == "/sessions/8/release" and body == {"job_ids": [9]} and key != first_key


def test_a_release_refused_after_an_unanswered_try_never_returns_its_jobs(clock: list[float]) -> None:
    lease = Lease()
    f = fetcher(lease)
    lease.client.fail = [Refused(None), Answered(422, "refused")]  # the first try may have been applied
    f.give_back([(prepared(5), 1), (prepared(6), 1)])
    f._send_release()
    f._send_release()
    assert f.take() == [] and f.release_unknown == [5, 6] and not f._releasing and not f.release_refused


def _late(job_id: int, minutes: int) -> Any:
    p = prepared(job_id)
    p.job.wall_time_min = minutes
    return p


def test_jobs_the_prefetcher_holds_back_as_too_late_are_given_back(clock: list[float]) -> None:
    lease = Lease()
    f = fetcher(lease)  # 60 minutes left
    f._ready.extend([_late(1, 30), _late(2, 90), _late(3, 0)])
    assert [p.id for p in f.take()] == [1, 3]
    assert f.too_late == [] and not f.lean  # not held for the Session's deletion; no lean state
    f._send_release()
    assert [body for _, body, _ in lease.client.posts] == [{"job_ids": [2]}] and f.released == 1
    # A server without the route: the job stays leased until the lease's close, as before.
    lease.client.fail = [Refused(405)]
    f._ready.append(_late(4, 90))
    f.take()
    f._send_release()
    assert [p.id for p in f.too_late] == [4] and f.release_refused
    f._ready.append(_late(5, 90))
    f.take()
    assert [p.id for p in f.too_late] == [4, 5] and not f._releasing


class ReleasingLease:
    """test_serial_master's FakeLease with the client and Session the release goes through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.session_id = 7
        self.lost_generation = 0
        self.client = Lease().client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_masters_too_late_jobs_are_given_back(tmp_path: Path) -> None:
    left = [600.0]
    master, prefetcher, lease, _updater, transport = make_master(tmp_path, left)
    prefetcher.release_after_sec = 5.0
    prefetcher.lease = ReleasingLease(lease)
    prefetcher._ready.extend([_prepared(1, workdir=tmp_path), _prepared(2, workdir=tmp_path),
                              _prepared(3, 5, tmp_path), _prepared(4, workdir=tmp_path)])
    master.step()
    assert _sent(transport) == [1, 2] and [p.id for p in master.pending] == [3, 4]
    left[0] = 200.0  # job 3 (5 min) can no longer finish
    _exit(transport, 1)
    master.step()
    assert _sent(transport) == [1, 2, 4] and not master.too_late and not prefetcher.lean
    prefetcher._send_release()
    assert [body for _, body, _ in prefetcher.lease.client.posts] == [{"job_ids": [3]}]
    assert prefetcher.released == 1
    master.shutdown("test over")

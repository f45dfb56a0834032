"""The resend of an unsettled release (balsam.launcher.prefetch, "Giving back"), on its own: the
prefetcher and a recording client, the clock is the test's (test_release_resend has the real server).

- resent with its key and ids at doubling waits (capped), in the background: acquires go on;
- a Session gone (404 naming it, or replaced by the lease) settles it: the server freed its jobs;
- a refusal that would be refused for ever (422) stops the resends (kept leased, never started);
  one a later answer may differ from (408, 409, 425) after a lost answer is resent;
- the new release of jobs leased again meanwhile goes out at once, before any acquire;
- jobs leased again under a Session since lost are not released again by a later Session;
- a too-late job of an answered release is no longer counted as held until the lease's close.
"""

from __future__ import annotations

from typing import Any

import pytest

from balsam.launcher import prefetch
from test_prefetch_release_review import Answered
from test_prefetch_release_units import Job, Lease, Refused, busy_fetcher, clock, prepared  # noqa: F401


def given_up(lease: Lease, late: bool = False) -> Any:
    """A busy fetcher whose release of 5 and 6 (and 8, too late) got no answer MAX_RELEASE_TRIES times."""
    f = busy_fetcher(lease)
    lease.client.fail = [Refused(None) for _ in range(prefetch.MAX_RELEASE_TRIES)]
    f.give_back([(prepared(5), 1), (prepared(6), 1)])
    if late:
        f.give_back([(prepared(8), 1)], too_late=True)
    while f._releasing:
        f._send_release()
    assert f.release_given_up and f.release_unknown == [5, 6] and not lease.client.fail
    return f


def test_resent_with_its_key_and_ids_at_doubling_waits_until_answered(clock: list[float]) -> None:
    lease = Lease()
    f = given_up(lease)
    first = lease.client.posts[0]
    lease.client.fail = [Refused(503), Refused(None), Refused(409)]
    sent_at = []
    for _ in range(400):
        before = len(lease.client.posts)
        f._resend_unsettled()
        if len(lease.client.posts) > before:
            sent_at.append(clock[0])
        if not f.release_unknown:
            break
        clock[0] += 1.0
    assert all(post == first for post in lease.client.posts[prefetch.MAX_RELEASE_TRIES:])
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:])]
    first_wait = prefetch.RELEASE_RESEND_FIRST_SEC
    assert gaps == [2 * first_wait, 4 * first_wait, 8 * first_wait], (sent_at, gaps)
    assert f.release_unknown == [] and f.released == 2 and not f._unsettled
    # Answered: a later acquire that leases one of them hands it over.
    assert [job.id for job in f._drop_release_unknown([Job(5), Job(9)])] == [5, 9]


def test_the_wait_is_capped(clock: list[float]) -> None:
    lease = Lease()
    f = given_up(lease)
    lease.client.fail = [Refused(None) for _ in range(50)]
    for _ in range(20):
        clock[0] = f._unsettled[0].due
        f._resend_unsettled()
    assert f._unsettled[0].wait == prefetch.RELEASE_RESEND_MAX_SEC and f.release_unknown == [5, 6]


def test_a_gone_session_settles_it_without_starting_its_jobs(clock: list[float]) -> None:
    lease = Lease()
    f = given_up(lease)
    f._drop_release_unknown([Job(6)])  # leased again under Session 7
    lease.client.fail = [Answered(404, "Session 7 not found (it may have expired: no heartbeat for too long)")]
    clock[0] += prefetch.RELEASE_RESEND_FIRST_SEC
    f._resend_unsettled()
    # Session 7 is gone: its jobs were freed with it; nothing is released again under 7.
    assert f.release_unknown == [] and not f._unsettled and f.take() == [] and f.released == 0
    f._resend_unsettled()
    assert len(lease.client.posts) == prefetch.MAX_RELEASE_TRIES + 1


def test_a_replaced_session_settles_it_and_its_jobs_leased_again_are_not_released(clock: list[float]) -> None:
    lease = Lease()
    f = given_up(lease)
    f._drop_release_unknown([Job(6)])  # leased again under Session 7
    lease.session_id, lease.lost_generation = 8, 1  # the lease lost Session 7 and opened Session 8
    f._drop_release_unknown([Job(5)])  # leased again under Session 8, before the settling look
    f._resend_unsettled()
    # No request names Session 7 again; 5, held by Session 8, is given back there in a new release
    # (in the same step: before any acquire).
    posts = lease.client.posts[prefetch.MAX_RELEASE_TRIES:]
    assert [(path, body) for path, body, _key in posts] == [("/sessions/8/release", {"job_ids": [5]})]
    assert f.release_unknown == [] and f.released == 1


def test_a_refusal_for_ever_stops_the_resends(clock: list[float]) -> None:
    lease = Lease()
    f = given_up(lease)
    lease.client.fail = [Answered(422, "this key was already used for a different request")]
    clock[0] += prefetch.RELEASE_RESEND_FIRST_SEC
    f._resend_unsettled()
    clock[0] += prefetch.RELEASE_RESEND_MAX_SEC
    f._resend_unsettled()
    assert len(lease.client.posts) == prefetch.MAX_RELEASE_TRIES + 1 and not f._unsettled
    assert f.release_unknown == [5, 6] and f.take() == []  # kept leased until the Session's deletion


def test_a_too_late_job_of_an_answered_release_is_no_longer_held(clock: list[float]) -> None:
    lease = Lease()
    f = given_up(lease, late=True)
    assert [p.id for p in f.too_late] == [8]
    assert lease.client.posts[-1][1] == {"job_ids": [5, 6, 8]}
    clock[0] += prefetch.RELEASE_RESEND_FIRST_SEC
    f._resend_unsettled()
    assert lease.client.posts[-1][1] == {"job_ids": [5, 6, 8]}  # the same body
    assert f.too_late == [] and f.release_unknown == [] and f.released == 3


def run_with(f: Any, lease: Lease, acquire: Any) -> list[str]:
    """Run the prefetch thread's loop on this thread with ``acquire`` as the lease's; the order of
    releases posted and acquires sent ("release", "acquire") once it stops."""
    order: list[str] = []
    post = lease.client.post

    def posting(path: str, json: Any = None, idempotency_key: str = "", **kw: Any) -> Any:
        order.append("release")
        return post(path, json=json, idempotency_key=idempotency_key, **kw)

    def acquiring(count: int, **kw: Any) -> list[Job]:
        order.append("acquire")
        return acquire(count, **kw)

    lease.client.post = posting  # type: ignore[method-assign]
    lease.acquire = acquiring  # type: ignore[method-assign]
    f._open_lease = lambda: lease
    f._prepare = lambda job: prepared(job.id)
    f.note_held(0, 2)
    f._run()
    return order


def test_acquires_go_on_between_resends_and_the_resends_go_out(clock: list[float]) -> None:
    lease = Lease()
    f = given_up(lease)
    first = lease.client.posts[0]
    lease.client.fail = [Refused(None) for _ in range(50)]

    start = clock[0]

    def acquire(count: int, **kw: Any) -> list[Job]:
        clock[0] += 1.0  # each acquire (none found) one second; a bounded number of loop passes
        if len(lease.client.posts) == prefetch.MAX_RELEASE_TRIES + 2 or clock[0] - start > 100:
            f.stop()
        return []

    order = run_with(f, lease, acquire)
    # Acquires before the first resend (due RELEASE_RESEND_FIRST_SEC after the give-up), between it
    # and the second, and the resends themselves: the first try's key and ids.
    resends = [i for i, what in enumerate(order) if what == "release"]
    assert len(resends) == 2 and resends[0] > 0 and resends[1] - resends[0] > 1, order
    assert lease.client.posts[prefetch.MAX_RELEASE_TRIES:] == [first, first]
    assert f.release_unknown == [5, 6] and len(f._unsettled) == 1


def test_the_release_of_jobs_leased_again_goes_out_before_any_acquire(clock: list[float]) -> None:
    """The answered release's jobs leased again meanwhile are given back at once: where the answer
    was a try applied now (a key expired on the server) they are free already, and an acquire sent
    first leased them again, parked them again, and their release freed them again, for ever."""
    lease = Lease()
    f = given_up(lease)
    first = lease.client.posts[0]
    f._drop_release_unknown([Job(5), Job(6)])  # leased again under Session 7: parked
    clock[0] += prefetch.RELEASE_RESEND_FIRST_SEC
    acquires: list[int] = []

    def acquire(count: int, **kw: Any) -> list[Job]:
        acquires.append(count)
        if len(acquires) == 3:
            f.stop()
        return [Job(5), Job(6)] if len(acquires) == 1 else []  # the freed jobs, leased again

    order = run_with(f, lease, acquire)
    posts = lease.client.posts[prefetch.MAX_RELEASE_TRIES:]
    # The resend (first key), then the new release of the parked jobs (a new key), then acquires.
    assert order[:3] == ["release", "release", "acquire"] and order.count("release") == 2, order
    assert posts[0] == first and posts[1][1] == {"job_ids": [5, 6]} and posts[1][2] != first[2]
    # Nothing unsettled: the jobs the acquire leased again are handed over, not parked.
    assert not f._unsettled and f.release_unknown == [] and not f._parked
    assert sorted(p.id for p in f.take()) == [5, 6]


@pytest.mark.parametrize("status", [408, 409, 425, 422])
def test_a_refusal_after_a_lost_answer_is_resent_unless_it_stands_for_ever(clock: list[float], status: int) -> None:
    """A release refused (408, 409, 425: a later answer may differ) after a try that got no answer:
    unsettled, resent with its key and ids; one refused for ever (422) is not resent."""
    lease = Lease()
    f = busy_fetcher(lease)
    lease.client.fail = [Refused(None), Answered(status, "refused")]
    f.give_back([(prepared(5), 1), (prepared(6), 1)])
    f._send_release()
    f._send_release()
    first = lease.client.posts[0]
    assert lease.client.posts == [first, first] and not f._releasing
    assert f.release_unknown == [5, 6] and f.take() == []  # a try may have been applied: not started here
    clock[0] += prefetch.RELEASE_RESEND_FIRST_SEC
    f._resend_unsettled()
    if status == 422:
        assert not f._unsettled and lease.client.posts == [first, first] and f.release_unknown == [5, 6]
        return
    assert lease.client.posts == [first, first, first]  # resent, answered
    assert not f._unsettled and f.release_unknown == [] and f.released == 2

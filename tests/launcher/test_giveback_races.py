"""Races between the serial launcher's loop thread and the prefetch thread around giving back
(balsam.launcher.prefetch, "Giving back").

* A too-late job held back by take() while the prefetch thread resumes giving back
  (_resume_release): take read may_release (given up) without the lock, the resumption emptied
  too_late and turned giving back on, then take stored the job in too_late: nothing moved it to a
  release again, leased, unstarted and hidden from everyone until the Session's end.
* An old copy of a job given back by the loop after the prefetch thread's check for jobs leased
  again (_drop_leased_again) and before the new copy (the same Session leased it again after its
  user re-queued it) reached _ready: the release named the id and freed the new copy, which the
  loop started (another launcher could lease it: run twice).
* Jobs given back by the loop after its check of may_release and before the prefetch thread gave
  up a release: sent at once as a new release while giving back was given up.

Each interleaving is forced: the loop's step runs on a real second thread, started and joined at
the point of the race (a hook in the code path, or the lock's own contention seen by a wrapper),
and the prefetch thread's work runs on the test's thread with the test's clock. No timed assertion
(the waits below only guard against a hang).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from balsam.launcher import prefetch
from balsam.launcher.prefetch import Prefetcher
from test_prefetch_release_units import Job, Lease, Refused, clock, fetcher, prepared  # noqa: F401

HANG_GUARD_SEC = 30.0


class ContendedLock:
    """The prefetcher's lock, telling when a thread has to wait for it (``contended``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.contended = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        self.contended.set()
        return self._lock.acquire(True, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "ContendedLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def on_other_thread(step: Callable[[], None], lock: "ContendedLock | None" = None) -> threading.Thread:
    """Run ``step`` on a new thread until it ends or, with ``lock``, waits for that lock (the caller
    holds it: the step goes on once the caller lets it go). Returns the thread (join it)."""
    went_on = threading.Event()

    def run() -> None:
        try:
            step()
        finally:
            went_on.set()

    if lock is not None:
        lock.contended.clear()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while not went_on.is_set() and not (lock is not None and lock.contended.is_set()):
        went_on.wait(0.01)
        assert thread.is_alive() or went_on.is_set(), "the step's thread died"
    return thread


class ResumesOnRead(Prefetcher):
    """The prefetch thread's resumption (_resume_release) runs right after the loop thread's read
    of may_release: until it ends, or until it waits for the lock the loop thread holds."""

    resume: "Callable[[], None] | None" = None
    resumed: "threading.Thread | None" = None

    @property
    def may_release(self) -> bool:  # type: ignore[override]
        value = Prefetcher.may_release.fget(self)  # type: ignore[attr-defined]
        step, self.resume = self.resume, None
        if step is not None:
            self.resumed = on_other_thread(step, self._lock)  # type: ignore[arg-type]
        return value


def test_a_too_late_job_held_back_while_giving_back_resumes_is_given_back(clock: list[float]) -> None:
    lease = Lease()
    f = fetcher(lease)
    f.__class__ = ResumesOnRead
    f._lock = ContendedLock()  # type: ignore[assignment]
    # Giving back was given up, the release settled, the back-off passed: the prefetch thread resumes.
    f.release_given_up = True
    f._resume_at = clock[0] - 1
    late = prepared(42)
    late.job.wall_time_min = 120  # 60 min left: too late
    with f._lock:
        f._ready.append(late)
        f._ready_generations.append(1)
    f.resume = f._resume_release  # type: ignore[attr-defined]
    assert f.take() == []  # held back, never handed to the loop
    assert f.resumed is not None
    f.resumed.join(HANG_GUARD_SEC)
    assert not f.release_given_up and f.may_release
    # The prefetch thread goes on: the job is given back, not kept leased until the Session's end.
    for _ in range(3):
        if f.release_given_up:
            f._resume_release()
        if f._releasing:
            f._send_release()
    assert [json["job_ids"] for _p, json, _k in lease.client.posts] == [[42]]
    assert f.too_late == []


def test_an_old_copy_given_back_as_the_new_copy_is_prepared_is_not_released(clock: list[float]) -> None:
    """The prefetch thread checked for jobs leased again (none queued), then the loop gave back its
    old copy of 42; the new copy reaches _ready before the release goes out."""
    lease = Lease()
    old = prepared(42)  # taken by the loop earlier (acquire number 1), stalled since
    calls = [0]

    def acquire(count: int, **kw: Any) -> list[Job]:
        calls[0] += 1
        if calls[0] == 1:
            return [Job(42)]  # leased again: its user re-queued it, which ended the old lease
        f.stop()
        return []

    lease.acquire = acquire  # type: ignore[method-assign]

    def before_prepare(jobs: list[Any]) -> None:  # the prefetch thread, after _drop_leased_again
        on_other_thread(lambda: f.give_back([(old, 1)])).join(HANG_GUARD_SEC)  # the loop's give-back now

    f = Prefetcher(lambda: lease, lambda job: prepared(job.id), lambda demand: None, None, depth=64,
                   remaining_min=lambda: 60, release_after_sec=5.0, retry_sec=0.0, before_prepare=before_prepare)
    f._run()  # the prefetch thread's turns, on this thread, until the second acquire stops it
    assert [p.id for p in f.take()] == [42]
    assert lease.client.posts == [], "the release of the old copy freed the new copy the loop starts"
    assert not f._releasing


def test_an_old_copy_given_back_before_the_loop_takes_the_new_copy_is_not_released(clock: list[float]) -> None:
    """As above, but the loop takes the new copy before the prefetch thread sends the release."""
    lease = Lease()
    f = fetcher(lease)
    with f._lock:  # the new copy of 42, leased again (acquire number 2)
        f._ready.append(prepared(42))
        f._ready_generations.append(2)
    on_other_thread(lambda: f.give_back([(prepared(42), 1)])).join(HANG_GUARD_SEC)  # the old copy
    assert [p.id for p in f.take()] == [42]
    f._send_release()
    assert lease.client.posts == [], "the release of the old copy freed the new copy the loop starts"
    assert not f._releasing


def test_the_ids_of_a_release_in_flight_stay_named_by_its_resends(clock: list[float]) -> None:
    """A resend names exactly its first try's jobs (the server refuses a key reused for another
    body): take drops only the entries never sent."""
    lease = Lease()
    f = fetcher(lease)
    lease.client.fail = [Refused(None)]  # the first try unanswered
    f.give_back([(prepared(7), 1)])
    f._send_release()
    key = lease.client.posts[0][2]
    f.give_back([(prepared(8), 1)])  # queued behind the try in flight
    with f._lock:
        f._ready.extend([prepared(7), prepared(8)])
        f._ready_generations.extend([2, 2])
    f.take()
    f._send_release()
    assert [(json["job_ids"], k == key) for _p, json, k in lease.client.posts] == [([7], True), ([7], True)]
    assert not f._releasing


def test_jobs_given_back_as_the_release_is_given_up_are_not_sent_while_given_up(clock: list[float]) -> None:
    """The loop checked may_release (a release was in flight), the prefetch thread gave that release
    up, then the loop gave back too-late jobs: not sent while giving back is given up (a new
    release while the given-up one is unsettled), kept as the give-up keeps those never sent."""
    lease = Lease()
    f = fetcher(lease)
    f.give_back([(prepared(1), 1)])  # a stalled job's release, whose tries get no answer
    lease.client.fail = [Refused(None)] * prefetch.MAX_RELEASE_TRIES
    assert f.may_release  # the loop's check (its _release_too_late)
    while not f.release_given_up:  # the prefetch thread's tries, then the give-up
        f._send_release()
    tries = len(lease.client.posts)
    assert f._unsettled  # the given-up release is resent later, unsettled until answered
    on_other_thread(lambda: f.give_back([(prepared(5), 1)], too_late=True)).join(HANG_GUARD_SEC)

    def acquire(count: int, **kw: Any) -> list[Job]:
        f.stop()
        return []

    lease.acquire = acquire  # type: ignore[method-assign]
    f._open_lease = lambda: lease
    f._run()
    assert len(lease.client.posts) == tries, "a release went out while giving back was given up"
    assert [p.id for p in f.too_late] == [5] and not f._releasing  # queued again when giving back resumes

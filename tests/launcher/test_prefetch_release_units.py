"""The prefetcher's giving back (balsam.launcher.prefetch, "Giving back"), on its own: the release
goes out in one request before any further acquire, is resent under the same key until answered,
returns the jobs to the loop when the server refuses it, and the lean prefetcher leases only free
room until the floor's jobs would start within the bound. The clock is the test's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import pytest

from balsam.launcher import prefetch
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.prefetch import Prefetcher


class Job:
    def __init__(self, job_id: int) -> None:
        self.id = job_id
        self.wall_time_min = 0


class Refused(Exception):
    def __init__(self, status_code: "int | None") -> None:
        super().__init__(f"status {status_code}")
        self.status_code = status_code


class Client:
    def __init__(self) -> None:
        self.posts: list[tuple[str, Any, str]] = []
        self.fail: list[Exception] = []

    def post(self, path: str, json: Any = None, idempotency_key: str = "", **kw: Any) -> Any:
        self.posts.append((path, json, idempotency_key))
        if self.fail:
            raise self.fail.pop(0)
        return {"id": 7, "released": json["job_ids"]}


class Lease:
    session_id = 7
    lost_generation = 0

    def __init__(self) -> None:
        self.client = Client()
        self.acquired: list[int] = []

    def acquire(self, count: int, **kw: Any) -> list[Job]:
        self.acquired.append(count)
        return []


def prepared(job_id: int) -> PreparedJob:
    return PreparedJob(job=Job(job_id), id=job_id, workdir=Path("."), cmdline="true", env={})


@pytest.fixture
def clock(monkeypatch: Any) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(prefetch.time, "monotonic", lambda: now[0])
    return now


def fetcher(lease: Lease) -> Prefetcher:
    f = Prefetcher(lambda: lease, prepared, lambda demand: None, None, depth=64, remaining_min=lambda: 60,
                   lookahead_sec=0.25, max_depth=2048, floor=8, room=2, release_after_sec=5.0, retry_sec=0.0)
    f.lease = lease
    return f


def busy_fetcher(lease: Lease, given_back: Iterable[int] = ()) -> Prefetcher:
    """A fetcher of ``lease`` that took 10 jobs, 2 running (both slots busy), and gave back the jobs
    ``given_back`` (one slot each)."""
    f = fetcher(lease)
    f._taken, f._running = 10, 2
    if given_back:
        f.give_back([(prepared(i), 1) for i in given_back])
    return f


def test_given_back_jobs_go_in_one_request_and_the_prefetcher_turns_lean(clock: list[float]) -> None:
    lease = Lease()
    f = fetcher(lease)
    f._taken, f._held = 10, 8  # 2 placed and running, 8 waiting in the loop
    f.note_held(8, None, 2)
    assert f.may_give_back
    f.give_back([(prepared(i), 1) for i in range(3, 11)])
    assert f.lean and f._held == 0 and not f.may_give_back  # one release in flight at a time
    f._send_release()
    assert [(p, b) for p, b, _ in lease.client.posts] == [("/sessions/7/release", {"job_ids": list(range(3, 11))})]
    assert f.released == 8 and f.may_give_back
    # Full (no room): nothing ahead; a slot that frees is leased, and only it.
    f.note_held(0, 0, 2)
    assert f._target() == 0
    f.note_held(0, 1, 1)
    assert f._target() == 1


def test_an_unanswered_release_is_resent_with_its_key_before_any_acquire(clock: list[float]) -> None:
    lease = Lease()
    f = fetcher(lease)
    lease.client.fail = [Refused(None), Refused(None)]  # the API unreachable twice (no status)
    f.give_back([(prepared(5), 1), (prepared(6), 1)])
    order: list[tuple[str, int]] = []
    send = f._send_release

    def sending() -> None:
        send()
        order.append(("release", len(f._releasing)))

    def acquire(count: int, **kw: Any) -> list[Job]:
        order.append(("acquire", len(f._releasing)))
        f.stop()
        return []

    f._send_release = sending  # type: ignore[method-assign]
    lease.acquire = acquire  # type: ignore[method-assign]
    f._open_lease = lambda: lease
    f._run()
    assert order == [("release", 2), ("release", 2), ("release", 0), ("acquire", 0)]
    keys = {key for _, _, key in lease.client.posts}
    assert len(lease.client.posts) == 3 and len(keys) == 1  # the same request, resent under its key
    assert f.released == 2


@pytest.mark.parametrize("status", [404, 405])  # no route (a 404 that names no Session); others: test_prefetch_release_review
def test_a_refused_release_returns_the_jobs_to_the_loop_and_gives_back_none_again(clock: list[float], status: int) -> None:
    lease = Lease()
    f = fetcher(lease)
    lease.client.fail = [Refused(status)]
    f.give_back([(prepared(5), 3), (prepared(6), 4)])
    f._send_release()
    assert f.release_refused and not f.may_give_back and f.released == 0
    assert [p.id for p in f.take()] == [5, 6] and f.taken_generation == 4


def test_lean_until_the_floor_would_start_within_the_bound(clock: list[float]) -> None:
    lease = Lease()
    f = busy_fetcher(lease, given_back=range(3, 11))
    f._measure_rate()
    # Two long jobs end together (a high rate for one window) and their slots are filled again.
    clock[0] += 1.0
    f._taken += 2
    f._measure_rate()
    assert f.lean and f._ahead == 0
    clock[0] += 4.5  # a whole bound with 2 jobs ended: still lean
    f._measure_rate()
    assert f.lean
    # Then short jobs: 10 end (and are replaced) over the next bound, at least the floor: the lookahead is back.
    for _ in range(10):
        clock[0] += 0.5
        f._taken += 1
        f._measure_rate()
    assert not f.lean and f._ahead >= f.floor

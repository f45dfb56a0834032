"""Jobs acquired under a Session the lease has lost are never started (balsam.client.lease, "A
replaced Session"; balsam.launcher.prefetch, "Copies"), and the lease's freshness counts time the
machine was suspended ("Known alive").

- An acquire sent to Session 1 and answered only after the heartbeat thread found Session 1 gone
  and replaced it: the server released those jobs with the expiry, and the replacement's report of
  held jobs could not include them. Its rows used to be numbered above ``lost_generation`` and
  started under the new (fresh) Session: the job ran here and on the launcher that leased it next.
- The serial prefetcher's ready jobs mix acquires: those of the lost Session, handed to the loop in
  one batch with newer ones, used to be started with them (one number per batch).
- ``CLOCK_MONOTONIC`` stands still while the machine is suspended: the lease's clock is injected.

Fake clients and leases; bounded waits against hangs only, no timed assertion.
"""

from __future__ import annotations

import threading
import time
import types
from pathlib import Path
from typing import Any, Optional

import pytest
import balsam.client.lease as lease_module
from balsam.client.lease import JobLease
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.prefetch import Prefetcher
from balsam.launcher.runner import ProcessPool
from test_lease_fresh import FreshnessLease
from test_lease_races import make_master, turn_until
from test_serial_master import FakeJob

WAIT_SEC = 30.0


class Gone404(Exception):
    status_code = 404


class LateClient:
    """Sessions 1, 2, ...; the first acquire of Session 1 waits for ``answer`` (its answer in
    transit while the heartbeat finds the Session gone); heartbeats of ``lost`` Sessions are 404."""

    def __init__(self) -> None:
        self.sessions = 0
        self.lost: set[int] = set()
        self.sent = threading.Event()
        self.answer = threading.Event()
        self.acquires: list[tuple[str, Optional[str]]] = []

    def request(self) -> None:  # a client, not a factory
        pass

    def post(self, path: str, json: Any = None, idempotency_key: Optional[str] = None, **kw: Any) -> Any:
        if path == "/sessions/":
            self.sessions += 1
            return {"id": self.sessions}
        self.acquires.append((path, idempotency_key))
        if path == "/sessions/1" and len(self.acquires) == 1:
            self.sent.set()
            assert self.answer.wait(WAIT_SEC)
            return [{"id": 7}]
        return [{"id": 8}]

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        if int(path.rsplit("/", 1)[1]) in self.lost:
            raise Gone404("Session not found")
        return {"gone": []}

    def delete(self, path: str, **kw: Any) -> None:
        pass


def test_an_acquire_answered_after_its_session_was_replaced_returns_no_job() -> None:
    client = LateClient()
    lease = JobLease(client, 1, tick_period=1000, heartbeat_thread=False)
    reported: list[tuple[list[int], int]] = []
    lease.watch(list, lambda ids, as_of: reported.append((ids, as_of)), generation=True)
    out: dict[str, Any] = {}
    acquiring = threading.Thread(target=lambda: out.setdefault("rows", lease.acquire(5)), daemon=True)
    acquiring.start()
    assert client.sent.wait(WAIT_SEC)
    client.lost.add(1)
    assert lease.tick() == [] and lease.session_id == 2  # replaced while the answer is on its way
    client.answer.set()
    acquiring.join(WAIT_SEC)
    assert not acquiring.is_alive()
    assert out["rows"] == [], "jobs the expiry released were returned as the new Session's"
    assert lease.generation == lease.lost_generation == 0 and lease.pending is None
    # The next acquire is the new Session's own, with a new key (nothing of Session 1 is resent).
    assert lease.acquire(5) == [{"id": 8}] and lease.generation == 1
    assert client.acquires[-1][0] == "/sessions/2" and client.acquires[-1][1] != client.acquires[0][1]
    assert reported == []


def test_an_unanswered_acquire_of_a_replaced_session_is_not_resent_to_the_new_one() -> None:
    client = LateClient()
    lease = JobLease(client, 1, tick_period=1000, heartbeat_thread=False)
    lease.pending = ("k1", {"max_num_jobs": 5})  # an acquire of Session 1 that got no answer
    lease._pending_session = 1
    client.lost.add(1)
    lease.tick()
    assert lease.session_id == 2 and lease.pending is None
    lease.pending, lease._pending_session = ("k1", {"max_num_jobs": 5}), 1  # however it came back
    assert lease.acquire(5) == [{"id": 8}]
    assert client.acquires[-1][0] == "/sessions/2" and client.acquires[-1][1] != "k1"


def _prepare(tmp_path: Path) -> Any:
    def prepare(job: Any) -> PreparedJob:
        return PreparedJob(job=job, id=int(job.id), workdir=tmp_path, cmdline="true", env={})
    return prepare


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_SEC
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_the_prefetcher_drops_the_ready_jobs_of_a_lost_session_and_hands_over_the_newer_ones(tmp_path: Path) -> None:
    lease = FreshnessLease()
    prefetcher = Prefetcher(lambda: lease, _prepare(tmp_path), lambda demand: None, updater=None, depth=64,
                            remaining_min=lambda: 10, retry_sec=0.01).start()
    try:
        lease.batches.append([FakeJob(1), FakeJob(2)])
        _wait(lambda: prefetcher.backlog == 2, "jobs 1 and 2 were not prefetched")
        lease.lost_generation = lease.generation  # Session 1 found gone: its copies are void
        lease.batches.append([FakeJob(3)])  # the new Session's
        _wait(lambda: prefetcher.backlog == 3, "job 3 was not prefetched")
        taken = prefetcher.take()
    finally:
        prefetcher.join()
    assert [p.id for p in taken] == [3], "jobs of the lost Session were handed to the loop"
    assert prefetcher.taken_generation == 2
    prefetcher.note_held(0)
    assert prefetcher._held == 0


def test_the_serial_master_never_starts_the_lost_sessions_jobs_taken_together_with_newer_ones(tmp_path: Path) -> None:
    lease = FreshnessLease()
    master, updater = make_master(tmp_path, lease, ProcessPool)
    master.gone.attach(lease)
    try:
        lease.batches.append([FakeJob(1), FakeJob(2)])
        _wait(lambda: master.prefetcher.backlog == 2, "jobs 1 and 2 were not prefetched")
        # The Session is found gone while its jobs wait in the prefetcher (the master's held ids
        # do not include them: nothing is reported), then the new Session leases job 3.
        assert lease.session_lost() == []
        lease.batches.append([FakeJob(3)])
        _wait(lambda: master.prefetcher.backlog == 3, "job 3 was not prefetched")
        turn_until(master, lambda: "RUN_DONE" in updater.states(3), "job 3 did not run")
    finally:
        master.shutdown("test over")
    assert updater.states(1) == [] and updater.states(2) == [], "a job of the lost Session was started"


class StoppedClient:
    def request(self) -> None:
        pass

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return {"id": 1}

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        return {}

    def delete(self, path: str, **kw: Any) -> None:
        pass


def test_time_the_machine_was_suspended_makes_the_lease_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease reads an injected clock (by default CLOCK_BOOTTIME, which counts a suspend;
    time.monotonic, still here, does not)."""
    boot = types.SimpleNamespace(now=50.0)
    lease = JobLease(StoppedClient(), 1, tick_period=10, heartbeat_thread=False, clock=lambda: boot.now)
    assert lease.fresh()
    boot.now += lease.expiry_sec  # suspended that long: CLOCK_MONOTONIC did not move
    assert not lease.fresh()
    assert lease.fresh_until() < time.monotonic(), "the spawner's deadline (monotonic) is past too"
    if hasattr(time, "CLOCK_BOOTTIME"):  # Linux: the default clock is CLOCK_BOOTTIME
        read = {time.CLOCK_BOOTTIME: 123.0}
        monkeypatch.setattr(lease_module, "time", types.SimpleNamespace(CLOCK_BOOTTIME=time.CLOCK_BOOTTIME,
                                                                        clock_gettime=read.__getitem__))
        assert lease_module.session_clock() == 123.0

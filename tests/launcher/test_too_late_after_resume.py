"""The serial master's too-late jobs set aside while giving back was given up (balsam.launcher.prefetch,
"Giving back") are given back once it resumes.

The master sets aside the jobs that waited for a slot until the time left ran short
(``TooLateJobs.set_aside``) and gives them back (``POST /sessions/{id}/release``) so that the elastic
queue and launchers with time left see them. Before: only those set aside in the current turn, and
only if giving back was on then; one set aside while a release was given up stayed leased by this
launcher, never started (too long for its time left), until the Session's deletion, also after
giving back resumed (the prefetcher resumed with its own too-late jobs only). Now every set-aside
job not given back yet goes once giving back is on again, each once, with its acquire number: one
from a Session lost since is not sent (the server freed it with that Session). One leased again
meanwhile (a newer copy, which the master may start) is not given back under its id either.

Real master and prefetcher (the prefetcher's thread not started: the test runs its release steps and
holds its clock, test_prefetch_release_units' harness), a fake transport (rank 1's tasks recorded,
test_serial_master's), the time left injected. No sleep, no timed assertion.
"""

from __future__ import annotations

import os
import threading
import time
import types
from pathlib import Path
from typing import Any

from balsam.builtin.default_platform import DefaultPlatform
from balsam.launcher import prefetch
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.job_mode import StopConditions
from balsam.launcher.modes.serial_worker import Master
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.launcher.prefetch import Prefetcher
from balsam.launcher.runner import ProcessPool
from balsam.platform import NodeInfo

from test_prefetch_release_units import Lease, Refused, clock, prepared  # noqa: F401
from test_serial_master import FakeTransport, RecordingUpdater


class ClosableLease(Lease):
    def close(self, **kw: Any) -> None:
        pass


def _job(job_id: int, wall_time_min: int, workdir: Path) -> PreparedJob:
    return PreparedJob(job=types.SimpleNamespace(id=job_id, wall_time_min=wall_time_min), id=job_id, workdir=workdir,
                       cmdline="true", env={"PATH": os.environ["PATH"]}, demand=Demand(node_packing_count=2))


def _master(left: list[float]) -> tuple[Master, Prefetcher, ClosableLease, FakeTransport]:
    """Two nodes of two slots, node 0 (the master's own) out: every task goes to rank 1. The
    prefetcher gives back (a release bound) through ``Lease``'s recording client."""
    node_manager = NodeManager([NodeInfo(str(i), f"node{i}", [0, 1]) for i in range(2)])
    assert node_manager.disable_node(0)
    wake = threading.Event()
    stop = StopConditions.for_launcher(10, time.time(), 0, wake)
    stop.countdown.remaining_sec = lambda: left[0]  # type: ignore[method-assign]
    lease = ClosableLease()
    prefetcher = Prefetcher(lambda: lease, lambda job: job, node_manager.check_satisfiable, RecordingUpdater(),
                            depth=64, remaining_min=stop.countdown.remaining_min, release_after_sec=5.0, retry_sec=0.0)
    prefetcher.lease = lease
    transport = FakeTransport(2)
    master = Master(node_manager=node_manager, rank_of_node=[0, 1], transport=transport, stop=stop, wake=wake,
                    pool=ProcessPool(5, wake=wake), prefetcher=prefetcher, updater=RecordingUpdater(),
                    platform=DefaultPlatform(), launch_hook=lambda **kw: None, clock=lambda: 0.0)
    return master, prefetcher, lease, transport


def _hand_over(f: Prefetcher, jobs: list[PreparedJob], generation: int) -> None:
    """As the prefetch thread hands an acquire's jobs to the loop (acquire number ``generation``)."""
    with f._lock:
        f._ready.extend(jobs)
        f._ready_generations.extend([generation] * len(jobs))


def _give_up(f: Prefetcher, lease: Lease) -> None:
    """A release (of job 5, which the loop gave back) fails MAX_RELEASE_TRIES times: given up."""
    lease.client.fail = [Refused(None) for _ in range(prefetch.MAX_RELEASE_TRIES)]
    f.give_back([(prepared(5), 1)])
    while f._releasing:
        f._send_release()
    assert f.release_given_up and not f.may_release and not lease.client.fail


def _resume(f: Prefetcher, clock: list[float]) -> None:
    """The given-up release is resent and answered (settled), the back-off passes: it resumes."""
    clock[0] += max(prefetch.RELEASE_RESUME_SEC, prefetch.RELEASE_RESEND_FIRST_SEC)
    f._resend_unsettled()
    f._resume_release()
    assert f.may_release


def _released(lease: Lease) -> list[list[int]]:
    return [json["job_ids"] for path, json, _key in lease.client.posts if path.endswith("/release")]


def test_too_late_jobs_set_aside_while_given_up_are_given_back_once_it_resumes_but_not_a_lost_sessions(
        tmp_path: Path, clock: list[float]) -> None:
    left = [3600.0]  # 60 whole minutes
    master, f, lease, transport = _master(left)
    # Acquire 1 (a Session lost later): two jobs run on rank 1's two slots, job 41 (30 min) waits.
    _hand_over(f, [_job(1, 0, tmp_path), _job(2, 0, tmp_path), _job(41, 30, tmp_path)], 1)
    master.step()
    # Acquire 2 (the Session that replaced it): job 42 (30 min) waits too.
    _hand_over(f, [_job(42, 30, tmp_path)], 2)
    master.step()
    assert [t["id"] for t in transport.sent[1]] == [1, 2] and [p.id for p in master.pending] == [41, 42]

    _give_up(f, lease)
    posts = len(lease.client.posts)
    left[0] = 1200.0  # 20 whole minutes: 41 and 42 can no longer finish
    master.step()
    assert sorted(master.too_late) == [41, 42] and not master.pending
    assert len(lease.client.posts) == posts and not f._releasing  # giving back is off: kept

    lease.lost_generation = 1  # acquire 1's Session was lost: the server freed job 41 with it
    _resume(f, clock)
    master.step()
    # Before: both stayed set aside (leased, hidden, never started) until the Session's deletion.
    assert not master.too_late, "the too-late jobs set aside while giving back was given up were kept"
    while f._releasing:
        f._send_release()
    assert _released(lease)[-1] == [42] and 41 not in {i for ids in _released(lease) for i in ids}
    # Each once: later turns give back nothing more.
    posts = len(lease.client.posts)
    master.step()
    while f._releasing:
        f._send_release()
    assert len(lease.client.posts) == posts and [t["id"] for t in transport.sent[1]] == [1, 2]
    master.shutdown("test over")


def test_a_set_aside_job_leased_again_before_giving_back_resumes_is_not_given_back(
        tmp_path: Path, clock: list[float]) -> None:
    """A job set aside while giving back was given up, then leased again by this Session (its user
    re-queued it with a shorter wall time): given back under its id once giving back resumed, the
    release would free the new copy, which this master may start meanwhile (run twice)."""
    left = [3600.0]
    master, f, lease, transport = _master(left)
    _hand_over(f, [_job(1, 0, tmp_path), _job(2, 0, tmp_path), _job(43, 30, tmp_path)], 1)
    master.step()
    _give_up(f, lease)
    left[0] = 1200.0
    master.step()
    assert sorted(master.too_late) == [43]

    _hand_over(f, [_job(43, 10, tmp_path)], 2)  # the new copy: 10 min, fits
    master.step()
    assert [p.id for p in master.pending] == [43]
    _resume(f, clock)
    master.step()
    while f._releasing:
        f._send_release()
    assert all(43 not in ids for ids in _released(lease)), "the new copy's id was given back"
    transport.inbox.append((1, {"done": [(1, 0, "", time.time())]}))  # a slot frees: the new copy starts
    master.step()
    assert [t["id"] for t in transport.sent[1]] == [1, 2, 43]
    assert not master.too_late  # the stale copy is no longer counted as held back
    master.shutdown("test over")

"""Exits at a launcher's stop (serial master and worker, without MPI).

A batch system ending the allocation (scancel, a requeue, a node set down) signals every process
of the job at once: a task can die, or its wrapper exit 0, before the launcher's own stop ends it.
Rule (module docstring of balsam.launcher.modes.serial_worker): (a) an exit reaped after the stop
is RUN_TIMEOUT whatever its code; (b) an exit by a stop signal that the stop follows within
STOP_WINDOW_SEC is RUN_TIMEOUT; with no stop in that window it stays the job's RUN_ERROR.
Found by a real-Slurm audit: 4 of 11 running jobs went RUN_ERROR -> FAILED, or RUN_DONE.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import pytest

from balsam.launcher.job_mode import StopConditions
from balsam.launcher.modes.serial_worker import Worker
from balsam.launcher.runner import ProcessPool, SpawnerPool
from test_serial_master import FakeJob, FakeTransport, make_master, run_in_thread

#: Exits 0 on SIGTERM (as a bash wrapper that goes on after its payload was killed).
EXITS_0_ON_TERM = "touch running; trap 'exit 0' TERM; sleep 30 & wait"


def _wait_for(predicate: Any, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _data(updater: Any, job_id: int) -> list[tuple[str, dict[str, Any]]]:
    return [(s, d) for j, s, d in updater.updates if j == job_id]


def _batch_system_signals_first(base: Any) -> Any:
    """A pool whose task gets the batch system's SIGTERM, and has exited, between the launcher's
    stop request and the pool's own stop (as when Slurm signals every process of the job)."""

    class Pool(base):
        def terminate_all(self, grace_sec: float) -> Any:
            for pid_file in Path(self.workdir_root).glob("*/pid"):
                pid = int(pid_file.read_text())
                os.killpg(pid, signal.SIGTERM)
                _wait_for(lambda: not Path(f"/proc/{pid}").exists(), what="the wrapper's exit and reap")
            return super().terminate_all(grace_sec)

    return Pool


@pytest.mark.parametrize("pool", [ProcessPool, SpawnerPool])
def test_an_exit_0_reaped_after_the_stop_is_a_timeout_not_done(tmp_path: Path, pool: Any) -> None:
    """Rule (a): the wrapper exits 0 after its payload got the allocation's SIGTERM, and that exit
    is reaped after the stop: it did not finish, it runs again (the audit: RUN_DONE after 14 s of a
    200 s sleep)."""
    cls = _batch_system_signals_first(pool)
    cls.workdir_root = tmp_path
    master, _, updater, _ = make_master(tmp_path, [FakeJob(1, "echo $$ > pid; " + EXITS_0_ON_TERM)], idle_ttl=60, pool=cls)
    thread, result = run_in_thread(master)
    _wait_for(lambda: (tmp_path / "1" / "running").exists(), what="the task to start")
    master.stop.request("signal 15")
    thread.join(30)
    assert result["reason"] == "signal 15"
    states = _data(updater, 1)
    assert [s for s, _ in states] == ["RUNNING", "RUN_TIMEOUT"], states
    assert states[-1][1]["reason"].startswith("launcher stopped (signal 15)") and "exit code 0" in states[-1][1]["reason"]


@pytest.mark.parametrize("pool", [ProcessPool, SpawnerPool])
def test_a_task_killed_by_the_allocations_sigterm_1_5_s_before_the_stop_is_a_timeout(tmp_path: Path, pool: Any) -> None:
    """Rule (b): the audit saw the serial master's stop come 1.4-1.5 s after Slurm's SIGTERM had
    killed its task (the old 1 s hold let the RUN_ERROR out first: FAILED)."""
    master, _, updater, _ = make_master(tmp_path, [FakeJob(1, "touch dying; kill -TERM $$")], idle_ttl=60, pool=pool)
    thread, result = run_in_thread(master)
    _wait_for(lambda: (tmp_path / "1" / "dying").exists(), what="the task to die")
    time.sleep(1.5)
    assert master.stop.request("signal 15") is None
    thread.join(30)
    states = _data(updater, 1)
    assert [s for s, _ in states] == ["RUNNING", "RUN_TIMEOUT"], states
    assert states[-1][1]["reason"].startswith("launcher stopped (signal 15)")


def test_a_task_killed_by_sigterm_with_no_stop_after_it_stays_run_error(tmp_path: Path) -> None:
    """A user's own kill (no stop comes in the window): today's RUN_ERROR, with its code."""
    from balsam.launcher.runner import STOP_WINDOW_SEC

    master, _, updater, _ = make_master(tmp_path, [FakeJob(1, "touch dying; kill -TERM $$")], idle_ttl=60)
    thread, _ = run_in_thread(master)
    _wait_for(lambda: (tmp_path / "1" / "dying").exists(), what="the task to die")
    died = time.monotonic()
    _wait_for(lambda: "RUN_ERROR" in updater.states(1), timeout=STOP_WINDOW_SEC + 10, what="RUN_ERROR")
    assert time.monotonic() - died >= STOP_WINDOW_SEC - 0.2  # held the whole window first
    master.stop.request("signal 15")
    thread.join(30)
    states = _data(updater, 1)
    assert [s for s, _ in states] == ["RUNNING", "RUN_ERROR"], states
    assert states[-1][1]["returncode"] == -signal.SIGTERM


class LateReportTransport(FakeTransport):
    """Ranks whose reports of exits around the stop reach the master after it (in flight)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.late: dict[int, list[tuple[int, int, str, float]]] = {}
        self.stop_time: Optional[float] = None

    def stop_workers(self, reason: str, grace: float) -> None:
        for rank, done in self.late.items():
            self.inbox.append((rank, {"done": done}))
            self.running[rank].difference_update(r[0] for r in done)
        super().stop_workers(reason, grace)


def test_remote_exits_reported_after_the_stop_follow_the_same_rule(tmp_path: Path) -> None:
    jobs = [FakeJob(i, "sleep 30") for i in range(1, 7)]
    master, _, updater, _ = make_master(tmp_path, jobs, nodes=3, cpus=2, idle_ttl=60)
    transport = LateReportTransport(3)
    master.transport = transport
    master._heard = {1: time.monotonic(), 2: time.monotonic()}
    thread, _ = run_in_thread(master)
    _wait_for(lambda: len(transport.sent[1]) == 2 and len(transport.sent[2]) == 2, what="remote starts")
    (a, b), (c, d) = [t["id"] for t in transport.sent[1]], [t["id"] for t in transport.sent[2]]
    now = time.time()
    transport.late = {
        1: [(a, -15, "", now - 1.0),         # killed by the allocation's SIGTERM 1 s before the stop: timeout
            (b, 3, "boom", now - 1.0)],      # its own error before the stop: RUN_ERROR
        2: [(c, 0, "", now + 0.5),           # exited 0 after the stop (the stop's doing): timeout
            (d, 143, "", now - 30.0)],       # a shell's 128+15, long before any stop: RUN_ERROR
    }
    master.stop.request("signal 15")
    thread.join(30)
    assert updater.states(a)[-1] == "RUN_TIMEOUT"
    assert updater.states(b)[-1] == "RUN_ERROR"
    assert updater.states(c)[-1] == "RUN_TIMEOUT"
    assert updater.states(d)[-1] == "RUN_ERROR"
    for job in jobs:
        assert len(updater.states(job.id)) == 2, (job.id, updater.states(job.id))


class WorkerTransport:
    """The master's side of a worker rank, driven by the test."""

    def __init__(self) -> None:
        self.inbox: deque[dict[str, Any]] = deque()
        self.reports: list[dict[str, Any]] = []

    def receive(self) -> Optional[dict[str, Any]]:
        return self.inbox.popleft() if self.inbox else None

    def report(self, msg: dict[str, Any]) -> None:
        self.reports.append(msg)

    def flush(self) -> None:
        pass


def test_a_worker_reports_exits_after_its_own_stop_signal_and_the_stop_message_as_killed(tmp_path: Path) -> None:
    """Rule (a) on a worker rank: a wrapper exits 0 after the rank got the allocation's SIGTERM,
    another on the stop's own SIGTERM: neither is reported ``done`` (RUN_DONE at the master)."""
    wake = threading.Event()
    stop = StopConditions.for_launcher(10, time.time(), 60, wake)
    pool = ProcessPool(5, wake=wake)
    transport = WorkerTransport()
    worker = Worker(transport, wake, stop, pool)  # type: ignore[arg-type]
    for job_id in (1, 2):
        (tmp_path / str(job_id)).mkdir()
        transport.inbox.append({"launch": [{"id": job_id, "cmd": EXITS_0_ON_TERM, "workdir": str(tmp_path / str(job_id)),
                                            "env": {}, "cpu_ids": []}]})
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", worker.run()), daemon=True)
    thread.start()
    _wait_for(lambda: all((tmp_path / str(j) / "running").exists() for j in (1, 2)), what="the tasks to start")
    stop.request("signal 15")  # the rank's own SIGTERM...
    os.killpg(pool.running[1].pid, signal.SIGTERM)  # ...and task 1's, from the batch system
    _wait_for(lambda: any(1 in r.get("killed", ()) for r in transport.reports), what="task 1's report")
    transport.inbox.append({"stop": "signal 15", "grace": 5})
    thread.join(30)
    assert result["rc"] == 0
    done = [r[0] for msg in transport.reports for r in msg.get("done", [])]
    killed = [j for msg in transport.reports for j in msg.get("killed", [])]
    assert done == [] and sorted(killed) == [1, 2], transport.reports
    assert transport.reports[-1].get("final")


def _unreaped_until_the_stop(base: Any) -> Any:
    """A pool whose loop turns do not reap (a slow turn): an exit waits for terminate_all's reap."""

    class Pool(base):
        hold = True

        def reap(self) -> Any:
            return [] if self.hold else super().reap()

        def terminate_all(self, grace_sec: float) -> Any:
            self.hold = False
            return super().terminate_all(grace_sec)

    return Pool


@pytest.mark.parametrize("pool", [ProcessPool, SpawnerPool])
def test_an_exit_0_before_a_wall_time_stop_not_yet_reaped_is_done(tmp_path: Path, pool: Any) -> None:
    """A job that finished (exit 0) before the launcher's own wall-time stop, with no signal from
    outside, but that the loop had not reaped yet: RUN_DONE, not RUN_TIMEOUT (it must not run
    again, its postprocess not be skipped). One that exits 0 on the stop's SIGTERM stays a timeout."""
    from balsam.launcher.job_mode import Countdown

    class Expiring(Countdown):
        now = False

        @property
        def expired(self) -> bool:  # type: ignore[override]
            return self.now

    jobs = [FakeJob(1, "touch finished"), FakeJob(2, EXITS_0_ON_TERM)]
    master, _, updater, _ = make_master(tmp_path, jobs, idle_ttl=60, pool=_unreaped_until_the_stop(pool))
    master.stop.countdown = countdown = Expiring(10, time.time())
    thread, result = run_in_thread(master)
    _wait_for(lambda: (tmp_path / "1" / "finished").exists() and (tmp_path / "2" / "running").exists(), what="the tasks")
    time.sleep(0.5)  # job 1 has exited; nothing reaped it
    countdown.now = True
    master.wake.set()
    thread.join(30)
    assert result["reason"] == "wall time"
    assert [s for s, _ in _data(updater, 1)] == ["RUNNING", "RUN_DONE"], _data(updater, 1)
    assert [s for s, _ in _data(updater, 2)] == ["RUNNING", "RUN_TIMEOUT"], _data(updater, 2)

"""The serial mode's pieces without MPI or a server: the master over a fake transport (recording the
messages a worker would get, delivering the reports a worker would send), the start check, the
prefetcher's hand-over, the placement loop and the child reaper. Tasks are real processes."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.launcher.app_run import AppProcess, JobBuildError, PreparedJob
from balsam.launcher.job_mode import StopConditions
from balsam.config import SettingsError, SiteConfig
from balsam.launcher.entry import LauncherError
from balsam.launcher.job_mode import LauncherContext
from balsam.launcher.modes import serial_worker
from balsam.launcher.modes.serial import SerialMode
from balsam.launcher.modes.serial_worker import Master, StartError, prefetch_depth, rank_for_node
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.launcher.placement import place_pending
from balsam.launcher.prefetch import Prefetcher
from balsam.launcher.runner import ChildReaper, ProcessPool, SpawnerPool
from balsam.platform import NodeInfo
from balsam.util import PeriodicMemoryHandler


class FakeJob:
    def __init__(self, job_id: int, command: str = "true", postprocess: bool = False) -> None:
        self.id = job_id
        self.command = command
        self.postprocess = postprocess  # its app keeps the default postprocess (and the setting is on)


class FakeLease:
    """A lease that hands out the given jobs in acquire-sized batches."""

    def __init__(self, jobs: list[FakeJob]) -> None:
        self.jobs = deque(jobs)
        self.calls: list[tuple[int, dict[str, Any]]] = []
        self.closed: Optional[dict[str, Any]] = None

    def acquire(self, count: int, **kwargs: Any) -> list[FakeJob]:
        self.calls.append((count, kwargs))
        return [self.jobs.popleft() for _ in range(min(count, len(self.jobs)))]

    def close(self, **kwargs: Any) -> None:
        self.closed = kwargs


class RecordingUpdater:
    def __init__(self) -> None:
        self.updates: list[tuple[int, str, dict[str, Any]]] = []
        self.stamps: list[tuple[int, str, Any]] = []  # (job, state, the state_timestamp given)
        self.lock = threading.Lock()
        self.closed = False
        self.gave_up = False
        self.flushes = 0

    def put(self, job_id: int, state: Any = None, state_timestamp: Any = None, state_data: Any = None, **fields: Any) -> None:
        with self.lock:
            self.updates.append((job_id, str(getattr(state, "value", state)), state_data or {}))
            self.stamps.append((job_id, str(getattr(state, "value", state)), state_timestamp))

    def put_updates(self, updates: list[dict[str, Any]]) -> None:
        with self.lock:  # one group, as BulkStatusUpdater keeps it in one call
            self.updates.extend((u["id"], u["state"], u.get("state_data") or {}) for u in updates)

    def flush(self, timeout: Optional[float] = None) -> bool:
        self.flushes += 1
        return True

    def send_soon(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def states(self, job_id: int) -> list[str]:
        return [s for j, s, _ in self.updates if j == job_id]


class FakeTransport:
    """Ranks 1.. are simulated by the test: ``sent[rank]`` holds the tasks they were given."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent: dict[int, list[dict[str, Any]]] = {r: [] for r in range(1, size)}
        self.stops: list[tuple[str, float]] = []
        self.inbox: deque[tuple[int, dict[str, Any]]] = deque()
        self.running: dict[int, set[int]] = {r: set() for r in range(1, size)}

    def hosts(self) -> list[str]:
        return ["h"] * self.size

    def send_tasks(self, rank: int, tasks: list[dict[str, Any]]) -> None:
        self.sent[rank].extend(tasks)
        self.running[rank].update(t["id"] for t in tasks)

    def reports(self) -> list[tuple[int, dict[str, Any]]]:
        out = list(self.inbox)
        self.inbox.clear()
        for rank, msg in out:
            self.running[rank].difference_update(r[0] for r in msg.get("done", []))
        return out

    def stop_workers(self, reason: str, grace: float) -> None:
        self.stops.append((reason, grace))
        # Each simulated worker ends what it still runs and confirms.
        for rank, ids in self.running.items():
            self.inbox.append((rank, {"done": [], "killed": sorted(ids), "final": True}))

    def flush(self) -> None:
        pass


def _prepare(tmp_path: Path):
    def prepare(job: FakeJob) -> PreparedJob:
        if job.command == "unbuildable":
            raise JobBuildError("missing parameter 'x'")
        workdir = tmp_path / str(job.id)
        workdir.mkdir(parents=True, exist_ok=True)
        return PreparedJob(job=job, id=job.id, workdir=workdir, cmdline=job.command, env={"PATH": os.environ["PATH"]},
                           demand=Demand(node_packing_count=2), postprocess_on_exit=job.postprocess)

    return prepare


def make_master(tmp_path: Path, jobs: list[FakeJob], *, nodes: int = 1, cpus: int = 2, idle_ttl: float = 0.3,
                size: Optional[int] = None, lease: Optional[FakeLease] = None,
                pool: Any = ProcessPool) -> tuple[Master, FakeLease, RecordingUpdater, FakeTransport]:
    infos = [NodeInfo(str(i), f"node{i}", list(range(cpus))) for i in range(nodes)]
    node_manager = NodeManager(infos)
    lease = lease or FakeLease(jobs)
    updater = RecordingUpdater()
    wake = threading.Event()
    stop = StopConditions.for_launcher(10, time.time(), idle_ttl, wake)
    transport = FakeTransport(size or nodes)
    prefetcher = Prefetcher(lambda: lease, _prepare(tmp_path), node_manager.check_satisfiable, updater, depth=64,
                            remaining_min=stop.countdown.remaining_min, retry_sec=0.05, on_ready=wake.set,
                            acquire_kwargs={"serial_only": True}).start()
    master = Master(node_manager=node_manager, rank_of_node=list(range(nodes)), transport=transport, stop=stop, wake=wake,
                    pool=pool(5, wake=wake), prefetcher=prefetcher, updater=updater, platform=DefaultPlatform(),
                    launch_hook=lambda **kw: None)
    return master, lease, updater, transport


def local_count(updater: RecordingUpdater, remote: set[int]) -> int:
    return len({j for j, s, _ in updater.updates if s == "RUNNING"} - remote)


def run_in_thread(master: Master) -> tuple[threading.Thread, dict[str, str]]:
    result: dict[str, str] = {}
    thread = threading.Thread(target=lambda: result.setdefault("reason", master.run()), daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("pool", [ProcessPool, SpawnerPool])
def test_master_runs_local_tasks_reports_each_once_and_stops_when_idle(tmp_path: Path, pool: Any) -> None:
    jobs = [FakeJob(i, "true" if i % 3 else "echo boom; exit 3") for i in range(1, 13)]
    master, lease, updater, _ = make_master(tmp_path, jobs, pool=pool)
    assert master.run() == "idle"
    for job in jobs:
        expected = ["RUNNING", "RUN_DONE"] if job.id % 3 else ["RUNNING", "RUN_ERROR"]
        assert updater.states(job.id) == expected, job.id
    errors = [d for j, s, d in updater.updates if s == "RUN_ERROR"]
    assert all(d["returncode"] == 3 and "boom" in d["error"] for d in errors)
    assert lease.calls[0][1]["serial_only"] is True
    assert updater.closed and lease.closed == {}  # updates flushed before the session is deleted
    assert master.started == master.finished == 12
    assert updater.flushes == 1  # the first RUNNING is sent at once, the rest in batches
    assert not master.node_manager.placements and not master.handover.deferred and not master.handover.queued


class SlowToReturnPool(ProcessPool):
    """A pool whose start returns late, as when the master loses the CPU just after a spawn."""

    def start(self, *args: Any, **kwargs: Any) -> None:
        super().start(*args, **kwargs)
        time.sleep(0.05)


def test_running_is_stamped_before_a_task_that_ends_at_once_is_stamped_done(tmp_path: Path) -> None:
    jobs = [FakeJob(i, "true") for i in range(1, 5)]
    master, _lease, updater, _ = make_master(tmp_path, jobs, pool=SlowToReturnPool)
    assert master.run() == "idle"
    for job in jobs:
        stamps = {state: ts for j, state, ts in updater.stamps if j == job.id}
        assert set(stamps) == {"RUNNING", "RUN_DONE"}
        assert stamps["RUNNING"] is not None and stamps["RUN_DONE"] is not None
        assert stamps["RUNNING"] <= stamps["RUN_DONE"], job.id  # events sort RUNNING first


@pytest.mark.parametrize("round_", range(3))
def test_many_short_tasks_by_hand_over_leave_no_resources_held(tmp_path: Path, round_: int) -> None:
    jobs = [FakeJob(i, "true") for i in range(1, 121)]
    master, _, updater, _ = make_master(tmp_path, jobs, pool=SpawnerPool)
    assert master.run() == "idle"
    for job in jobs:
        assert updater.states(job.id) == ["RUNNING", "RUN_DONE"], job.id
    assert master.started == master.finished == 120
    assert not master.node_manager.placements and not master.handover.deferred and not master.handover.handed_to
    node = master.node_manager.nodes[0]
    assert node.is_empty and node.idle_cpus == [0, 1]


def test_the_master_postprocesses_successful_exits_of_default_hook_apps_local_handed_over_and_remote(tmp_path: Path) -> None:
    """A job whose app keeps the default postprocess gets POSTPROCESSED right after its RUN_DONE (in
    one group); a failed run and the other apps' jobs do not. Local tasks (most started by
    hand-over, behind another task) and the tasks of a worker rank alike."""
    jobs = [FakeJob(i, "true" if i % 5 else "exit 3", postprocess=bool(i % 2)) for i in range(1, 81)]
    master, _, updater, transport = make_master(tmp_path, jobs, nodes=2, cpus=2, idle_ttl=0.5, pool=SpawnerPool)
    thread, result = run_in_thread(master)
    deadline = time.monotonic() + 30
    remote: set[int] = set()
    while thread.is_alive() and time.monotonic() < deadline:
        batch = [t for t in transport.sent[1] if t["id"] not in remote]
        remote.update(t["id"] for t in batch)
        if batch:
            transport.inbox.append((1, {"done": [(t["id"], 0 if t["id"] % 5 else 3, "", time.time()) for t in batch]}))
        time.sleep(0.02)
    thread.join(5)
    assert result["reason"] == "idle" and remote and master.handover.handed_over
    for job in jobs:
        expected = ["RUNNING", "RUN_ERROR"] if job.id % 5 == 0 else ["RUNNING", "RUN_DONE"] + ["POSTPROCESSED"] * job.postprocess
        assert updater.states(job.id) == expected, (job.id, job.id in remote)
    assert not master.postprocess_on_exit  # nothing left behind


def test_master_sends_other_nodes_tasks_to_their_rank_and_frees_them_on_report(tmp_path: Path) -> None:
    jobs = [FakeJob(i, "sleep 0.2") for i in range(1, 9)]
    master, _, updater, transport = make_master(tmp_path, jobs, nodes=2, cpus=2, idle_ttl=0.5)
    thread, result = run_in_thread(master)
    deadline = time.monotonic() + 30
    reported: set[int] = set()
    while thread.is_alive() and time.monotonic() < deadline:
        batch = [t for t in transport.sent[1] if t["id"] not in reported]
        for task in batch:
            assert task["cpu_ids"] in ([0], [1]) and "PATH" not in task["env"]  # only the difference is sent
            reported.add(task["id"])
        if batch:  # the worker reports them done: the master frees node 1 for the next ones
            transport.inbox.append((1, {"done": [(t["id"], 0, "", time.time()) for t in batch]}))
        time.sleep(0.05)
    thread.join(5)
    assert result["reason"] == "idle"
    assert reported and len(reported) + local_count(updater, reported) == 8  # each task on one node, once
    for job in jobs:
        assert updater.states(job.id) == ["RUNNING", "RUN_DONE"], job.id
    assert transport.stops and transport.stops[0][0] == "idle"


@pytest.mark.parametrize("pool", [ProcessPool, SpawnerPool])
def test_a_stop_request_ends_local_and_remote_tasks_as_run_timeout(tmp_path: Path, pool: Any) -> None:
    jobs = [FakeJob(i, "sleep 30") for i in range(1, 5)]
    master, _, updater, transport = make_master(tmp_path, jobs, nodes=2, cpus=2, idle_ttl=60, pool=pool)
    thread, result = run_in_thread(master)
    deadline = time.monotonic() + 20
    while master.started < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    master.stop.request("signal 15")
    thread.join(30)
    assert result["reason"] == "signal 15"
    for job in jobs:
        states = updater.states(job.id)
        assert states == ["RUNNING", "RUN_TIMEOUT"], (job.id, states)
    assert not master.pool.running and not master.remote


def test_unbuildable_jobs_fail_in_the_prefetcher_and_the_rest_run(tmp_path: Path) -> None:
    jobs = [FakeJob(1), FakeJob(2, "unbuildable"), FakeJob(3)]
    master, _, updater, _ = make_master(tmp_path, jobs)
    assert master.run() == "idle"
    assert updater.states(2) == ["FAILED"]
    assert updater.states(1) == updater.states(3) == ["RUNNING", "RUN_DONE"]


def test_no_session_stops_the_master_with_the_reason(tmp_path: Path) -> None:
    class NoSession(FakeLease):
        pass

    def refuse() -> Any:
        raise RuntimeError("401: credential revoked")

    infos = [NodeInfo("0", "node0", [0])]
    node_manager = NodeManager(infos)
    updater = RecordingUpdater()
    wake = threading.Event()
    stop = StopConditions.for_launcher(10, time.time(), 60, wake)
    prefetcher = Prefetcher(refuse, _prepare(tmp_path), node_manager.check_satisfiable, updater, depth=8,
                            remaining_min=lambda: 10, on_ready=wake.set).start()
    master = Master(node_manager=node_manager, rank_of_node=[0], transport=FakeTransport(1), stop=stop, wake=wake,
                    pool=ProcessPool(5, wake=wake), prefetcher=prefetcher, updater=updater, platform=DefaultPlatform(),
                    launch_hook=lambda **kw: None)
    assert master.run() == "no session: 401: credential revoked"


def test_the_prefetcher_keeps_depth_jobs_ahead_and_tops_up_at_half() -> None:
    lease = FakeLease([FakeJob(i) for i in range(1, 200)])
    ready = threading.Event()
    prepared = lambda job: PreparedJob(job=job, id=job.id, workdir=Path("."), cmdline="true", env={})  # noqa: E731
    prefetcher = Prefetcher(lambda: lease, prepared, lambda demand: None, RecordingUpdater(), depth=20,
                            remaining_min=lambda: 7, on_ready=ready.set, retry_sec=0.05).start()
    try:
        assert ready.wait(10)
        deadline = time.monotonic() + 10
        while prefetcher.backlog < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        taken = prefetcher.take()
        assert [p.id for p in taken] == list(range(1, 21))
        assert sum(c for c, _ in lease.calls) == 20 and lease.calls[0][1]["max_wall_time_min"] == 7
        prefetcher.note_held(15)  # 15 of them still unstarted: more than half the depth, no top-up
        time.sleep(0.2)
        assert prefetcher.backlog == 0
        prefetcher.note_held(4)
        deadline = time.monotonic() + 10
        while prefetcher.backlog < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [p.id for p in prefetcher.take()] == list(range(21, 37))  # topped up to 4 + 16 = depth
    finally:
        prefetcher.join()
        prefetcher.close_lease()
    assert lease.closed == {}


def test_the_prefetch_depth_follows_the_rate_jobs_are_used_at(monkeypatch: Any) -> None:
    """With a lookahead, the prefetcher keeps that much work leased at the rate the loop has been
    using jobs (fewer, larger acquires for short tasks), never below ``depth`` nor above
    ``max_depth``. The clock is the test's: no timing."""
    from balsam.launcher import prefetch

    clock = [100.0]
    monkeypatch.setattr(prefetch.time, "monotonic", lambda: clock[0])
    lease = FakeLease([FakeJob(i) for i in range(1, 2000)])
    prepared = lambda job: PreparedJob(job=job, id=job.id, workdir=Path("."), cmdline="true", env={})  # noqa: E731
    fetcher = Prefetcher(lambda: lease, prepared, lambda demand: None, RecordingUpdater(), depth=20,
                         remaining_min=lambda: 7, lookahead_sec=0.25, max_depth=100)
    fixed = Prefetcher(lambda: lease, prepared, lambda demand: None, RecordingUpdater(), depth=20, remaining_min=lambda: 7)

    def used(prefetcher: Prefetcher, count: int, held: int, after_sec: float) -> int:
        prefetcher._taken += count
        prefetcher._held = held
        clock[0] += after_sec
        prefetcher._measure_rate()
        return prefetcher.depth_now

    assert used(fetcher, 30, 10, 0.125) == 20 and fetcher.rate is None  # shorter than RATE_WINDOW_SEC
    assert used(fetcher, 0, 10, 0.125) == 20 and fetcher.rate == 80  # 20 used in 0.25 s: 20 jobs' work
    assert used(fetcher, 300, 10, 0.5) == 85  # 600/s in this window, (80 + 600) / 2 = 340/s: 85 jobs
    assert used(fetcher, 2000, 0, 0.5) == 100  # 4,020/s: capped at max_depth
    # Idle: the estimate halves every window, back to the floor.
    assert [used(fetcher, 0, 0, 1.0) for _ in range(5)] == [100, 100, 68, 34, 20]
    assert used(fixed, 5000, 0, 1.0) == 20 and fixed.rate is None  # no lookahead: the depth as given
    # The depth in force is what the acquires top up to (and half of it what wakes the top-up).
    fetcher.depth_now = 80
    fetcher._rate_since = clock[0]  # the test's clock stands still: no window ends, the depth stays
    fetcher._thread.start()
    try:
        deadline = time.time() + 10
        while fetcher.backlog < 80 and time.time() < deadline:
            time.sleep(0.01)
        assert fetcher.backlog == 80 and lease.calls[-1][0] == 80
    finally:
        fetcher.join()


def test_prefetch_depth_follows_the_slots_within_bounds() -> None:
    node = NodeInfo("0", "n", list(range(64)))
    assert prefetch_depth([node], 1) == 64
    assert prefetch_depth([node, node], 8) == 1024
    assert prefetch_depth([node] * 4, 64) == 2048


# -- start check -------------------------------------------------------------------------------
def nodes_named(*names: str) -> list[NodeInfo]:
    return [NodeInfo(str(i), name, [0]) for i, name in enumerate(names)]


def test_start_check_maps_each_node_to_the_rank_on_it() -> None:
    nodes = nodes_named("nid001.hsn.example.org", "nid002.hsn.example.org", "nid003.hsn.example.org")
    assert rank_for_node(nodes, ["nid001", "nid003", "nid002"]) == [0, 2, 1]


def test_start_check_refuses_a_lone_master_on_several_nodes() -> None:
    with pytest.raises(StartError, match=r"started 1 worker rank\(s\) for the 2 node\(s\)"):
        rank_for_node(nodes_named("nid001", "nid002"), ["nid001"])


def test_start_check_refuses_two_workers_on_one_node() -> None:
    with pytest.raises(StartError, match="several on nid001; none on nid002"):
        rank_for_node(nodes_named("nid001", "nid002"), ["nid001", "nid001"])


def test_start_check_accepts_nodes_it_cannot_compare() -> None:
    # One host standing in for two nodes (tests), or node names the ranks do not see (aliases).
    assert rank_for_node(nodes_named("h", "h"), ["h", "h"]) == [0, 1]
    assert rank_for_node(nodes_named("12", "13"), ["nid00012", "nid00013"]) == [0, 1]


def test_start_check_reads_loopback_names_as_this_host() -> None:
    # A test allocation that names this machine three ways (as the fake PBS/Cobalt e2e tests do).
    here = socket.gethostname()
    assert rank_for_node(nodes_named("localhost", "127.0.0.1", here), [here, here, here]) == [0, 1, 2]
    # IP addresses are compared whole, not cut at their first dot.
    with pytest.raises(StartError):
        rank_for_node(nodes_named("10.0.0.1", "10.0.0.2"), ["10.0.0.1", "10.0.0.1"])


# -- placement loop ----------------------------------------------------------------------------
def _prepared(job_id: int, **demand: Any) -> PreparedJob:
    return PreparedJob(job=None, id=job_id, workdir=Path("."), cmdline="true", env={}, demand=Demand(**demand))


def test_the_placement_loop_starts_what_fits_and_keeps_the_rest_in_order() -> None:
    nm = NodeManager([NodeInfo("0", "n", [0, 1])])
    two = {"node_packing_count": 2}
    pending = deque([_prepared(1, **two), _prepared(2, threads_per_rank=2, **two), _prepared(3, **two), _prepared(4, **two)])
    started: list[int] = []
    n = place_pending(pending, nm, lambda p, pl: started.append(p.id), lambda *a: None)
    assert started == [1, 3] and n == 2
    assert [p.id for p in pending] == [2, 4]


def test_the_placement_loop_gives_up_after_max_misses() -> None:
    nm = NodeManager([NodeInfo("0", "n", [0])])
    nm.assign(99, Demand())
    pending = deque(_prepared(i) for i in range(1000))
    calls: list[int] = []
    original = nm.assign

    def counting_assign(job_id: int, demand: Demand) -> Any:
        calls.append(job_id)
        return original(job_id, demand)

    nm.assign = counting_assign  # type: ignore[method-assign]
    assert place_pending(pending, nm, lambda p, pl: None, lambda *a: None, max_misses=8) == 0
    assert len(calls) == 1  # the same demand is not tried twice in a pass
    assert len(pending) == 1000


def test_a_launch_that_raises_fails_the_job_and_frees_its_place() -> None:
    nm = NodeManager([NodeInfo("0", "n", [0])])
    failed: list[tuple[int, str]] = []

    def start(prepared: PreparedJob, placement: Any) -> None:
        if prepared.id == 1:
            raise OSError("no such file")

    pending = deque([_prepared(1), _prepared(2)])
    assert place_pending(pending, nm, start, lambda j, r: failed.append((j, r))) == 1
    assert failed[0][0] == 1 and "OSError: no such file" in failed[0][1]
    assert 2 in nm.placements and 1 not in nm.placements


# -- reaper ------------------------------------------------------------------------------------
def test_the_reaper_leaves_other_children_alone_and_sees_an_exit_that_came_first(tmp_path: Path) -> None:
    wake = threading.Event()
    reaper = ChildReaper(wake)
    foreign = subprocess.Popen(["true"])  # someone else's child, exiting first: a zombie not ours
    time.sleep(0.2)
    proc = AppProcess(1, "exit 7", tmp_path, dict(os.environ))
    time.sleep(0.3)  # it has exited before it is watched
    reaper.watch(proc)
    assert wake.wait(5)
    assert reaper.exited.popleft() is proc and proc.returncode == 7
    assert foreign.wait(5) == 0  # still ours to reap: the reaper did not take it
    reaper.stop()


def test_hand_over_starts_queued_jobs_where_the_job_ahead_ran_and_reports_each_once(tmp_path: Path) -> None:
    jobs = [FakeJob(i, "sleep 0.3") for i in range(1, 11)]
    master, _, updater, _ = make_master(tmp_path, jobs, pool=SpawnerPool)
    assert master.run() == "idle"
    for job in jobs:
        assert updater.states(job.id) == ["RUNNING", "RUN_DONE"], job.id
    assert master.started == master.finished == 10
    assert master.handover.handed_over >= 1  # two slots, ten jobs: the others wait in the spawner's queues
    assert not master.node_manager.placements and not master.handover.queued and not master.handover.local


def test_a_stop_ends_running_jobs_and_queued_jobs_never_show_as_started(tmp_path: Path) -> None:
    jobs = [FakeJob(i, "sleep 30") for i in range(1, 9)]
    master, lease, updater, _ = make_master(tmp_path, jobs, idle_ttl=60, pool=SpawnerPool)
    thread, result = run_in_thread(master)
    deadline = time.monotonic() + 20
    while (master.started < 2 or not master.handover.queued) and time.monotonic() < deadline:
        time.sleep(0.02)
    queued = set(master.handover.queued)
    assert queued
    master.stop.request("signal 15")
    thread.join(30)
    assert result["reason"] == "signal 15"
    started = {j for j, s, _ in updater.updates if s == "RUNNING"}
    assert len(started) == 2 and not started & queued
    for job_id in started:
        assert updater.states(job_id) == ["RUNNING", "RUN_TIMEOUT"]
    assert all(updater.states(j) == [] for j in queued)  # given back with the lease, never run
    assert lease.closed == {} and not master.node_manager.placements


def test_a_long_job_gives_back_the_jobs_queued_behind_it(tmp_path: Path) -> None:
    jobs = [FakeJob(1, "sleep 3")] + [FakeJob(i, "sleep 0.05") for i in range(2, 12)]
    master, _, updater, _ = make_master(tmp_path, jobs, pool=SpawnerPool)
    assert master.run() == "idle"
    for job in jobs:
        assert updater.states(job.id) == ["RUNNING", "RUN_DONE"], job.id
    ends = [j for j, s, _ in updater.updates if s == "RUN_DONE"]
    assert ends[-1] == 1  # the others ran on the other CPU meanwhile, not behind job 1


# -- the worker configuration ------------------------------------------------------------------
def _serial_worker_config(tmp_path: Path, settings_yml: str) -> tuple[SiteConfig, dict[str, Any]]:
    """The configuration a serial-mode launcher writes for its ranks, as JSON carries it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / ".balsam-site").write_text("1\n")
    (site / "settings.yml").write_text(settings_yml)
    site_config = SiteConfig(site)
    context = LauncherContext(site_config=site_config, settings=site_config.launcher_settings, site_id=1,
                              data_path=site / "data", log_path=site / "log", platform=DefaultPlatform(),
                              nodes=[NodeInfo("0", socket.gethostname(), [0])], wall_time_min=1, job_mode="serial")
    return site_config, json.loads(json.dumps(SerialMode(context).worker_config()))


def test_the_master_builds_the_launchers_platform_even_with_a_broken_agent_module_section(tmp_path: Path) -> None:
    """Launchers read only the core sections of settings.yml: a mistake in an agent module's
    section (the agent's to report) must not stop a serial-mode start."""
    site_config, config = _serial_worker_config(
        tmp_path, "launcher:\n  platform: default\nscheduler:\n  sync_period: soon\n")
    with pytest.raises(SettingsError, match="scheduler.sync_period"):
        site_config.settings  # all sections: the broken one is refused there
    assert config["launcher"]["platform"] == "default" and config["launcher"]["platform_options"] == {}
    assert isinstance(serial_worker._load_platform(config), DefaultPlatform)
    # The options come from the config too (the default platform takes none: a stray one is refused).
    config["launcher"]["platform_options"] = {"bogus": 1}
    with pytest.raises(LauncherError, match="launcher.platform_options.bogus: unknown option"):
        serial_worker._load_platform(config)


def test_serial_ranks_log_with_the_sites_buffering_settings(tmp_path: Path) -> None:
    _site_config, config = _serial_worker_config(
        tmp_path, "logging:\n  buffer_num_records: 50\n  flush_period: 7\n")
    assert config["logging"]["buffer_num_records"] == 50 and config["logging"]["flush_period"] == 7
    balsam_logger = logging.getLogger("balsam")
    before, level = list(balsam_logger.handlers), balsam_logger.level
    serial_worker._setup_logging(tmp_path / "rank.log", config["logging"])
    added = [h for h in balsam_logger.handlers if h not in before]
    try:
        (handler,) = [h for h in added if isinstance(h, PeriodicMemoryHandler)]
        assert handler.capacity == 50
    finally:
        for h in added:
            balsam_logger.removeHandler(h)
            h.close()
        balsam_logger.setLevel(level)

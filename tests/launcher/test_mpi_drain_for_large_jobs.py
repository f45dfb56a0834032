"""mpi mode drains nodes for a job larger than the idle nodes (launcher.mpi_drain_for_large_jobs_sec).

Placing greedily, each node a short job frees is taken at once by another short job, so several
nodes are never idle together and a multi-node job waited until no smaller job was left (audit: a
3-node job created first on 4 nodes started 25th of 25). The pure parts (the acquire's size limits,
the drain decision, the placement pass while draining) are tested on frozen values; one short run of
a real launcher with real mpiexec on four fake nodes checks the whole.
"""

from __future__ import annotations

import json
import socket
import textwrap
from collections import deque
from pathlib import Path

import pytest

from balsam.config import SettingsError, loads_settings
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.launcher.placement import DrainForLarge, acquire_size_limits, place_pending
from balsam.platform import NodeInfo
from launcher_harness import finish, start_launcher
from launcher_helpers import events_of, make_runnable, wait_for_states


def _job(job_id: int, num_nodes: int = 1, node_packing_count: int = 1) -> PreparedJob:
    return PreparedJob(job=None, id=job_id, workdir=Path(f"w/{job_id}"), cmdline="true", env={},
                       demand=Demand(num_nodes=num_nodes, node_packing_count=node_packing_count))


def _nodes(n: int) -> NodeManager:
    return NodeManager([NodeInfo(node_id=str(i), hostname=f"n{i}", cpu_ids=[0, 1]) for i in range(n)])


def _placer(nm: NodeManager) -> tuple[list[int], object]:
    started: list[int] = []
    return started, lambda prepared, placement: started.append(prepared.id)


# -- the acquire's size limits ----------------------------------------------------------------------
def test_acquire_offers_one_job_up_to_the_partition_while_none_larger_than_the_idle_nodes_waits() -> None:
    # 1 idle node of 4, only 1-node jobs waiting: a job of up to 4 nodes, with room for it.
    assert acquire_size_limits(1, 4, [1, 1], 1.0) == (4, 4.0)
    # More room than the partition already: kept as it is.
    assert acquire_size_limits(0, 4, [], 6.5) == (4, 6.5)


def test_acquire_keeps_the_idle_node_cap_once_a_larger_job_waits_or_nothing_larger_exists() -> None:
    assert acquire_size_limits(1, 4, [1, 3], 1.0) == (1, 1.0)  # the head of the line is leased already
    assert acquire_size_limits(4, 4, [], 8.0) == (4, 8.0)  # all idle: the cap is the partition anyway
    assert acquire_size_limits(0, 1, [], 0.5) == (1, 0.5)  # one node: no larger job (room not raised)
    assert acquire_size_limits(2, 3, [3], 2.0) == (2, 2.0)


# -- the drain decision -----------------------------------------------------------------------------
def test_drain_begins_only_once_the_oldest_unfit_job_has_waited_the_delay() -> None:
    big, small = _job(1, 3), _job(2)
    drain = DrainForLarge(30)
    drain.note_unfit(big, 100.0)
    assert drain.choose([small, big], 110.0, 4) is None  # before the delay: smaller jobs backfill
    drain.note_unfit(big, 120.0)  # noted again: its wait counts from the first time
    assert drain.choose([small, big], 130.0, 4) == 1
    assert drain.target == 1
    drain.started(1, 131.0)
    assert drain.target is None and drain.choose([small], 132.0, 4) is None


def test_drain_delay_zero_drains_at_once_and_none_or_negative_never() -> None:
    big = _job(1, 3)
    at_once = DrainForLarge(0)
    at_once.note_unfit(big, 5.0)
    assert at_once.choose([big], 5.0, 4) == 1
    for never in (None, -1):
        drain = DrainForLarge(never)
        assert not drain.enabled
        drain.note_unfit(big, 5.0)
        assert drain.choose([big], 1e9, 4) is None


def test_drain_picks_the_oldest_unfit_job_and_forgets_jobs_no_longer_pending() -> None:
    first, second = _job(1, 2), _job(2, 3)
    drain = DrainForLarge(10)
    drain.note_unfit(first, 0.0)
    drain.note_unfit(second, 5.0)
    assert drain.choose([second, first], 20.0, 4) == 1
    # The first left pending (started elsewhere, failed, set aside as too late): the next one.
    assert drain.choose([second], 20.0, 4) == 2
    assert list(drain.unfit_since) == [2]


def test_no_drain_for_a_job_larger_than_the_nodes_in_service() -> None:
    too_big, big = _job(1, 4), _job(2, 2)
    drain = DrainForLarge(0)
    drain.note_unfit(too_big, 0.0)
    drain.note_unfit(big, 1.0)
    assert drain.choose([too_big, big], 2.0, 3) == 2  # a node is out: 4 nodes can never be idle


# -- placement while draining ---------------------------------------------------------------------
def test_while_draining_nothing_else_starts_until_the_job_fits_then_the_rest_backfill() -> None:
    nm = _nodes(4)
    running = [nm.assign(100 + i, Demand()) for i in range(3)]  # 3 of 4 nodes busy
    pending = deque([_job(1, 3), _job(2), _job(3)])
    started, start = _placer(nm)
    unfit: list[int] = []
    # Greedy (no drain): the small job takes the free node, and the big one, which smaller jobs
    # pass, is noted; job 3 waits for a node like the others: not noted (it starts in its turn).
    assert place_pending(pending, nm, start, lambda *_: None, unfit=lambda p: unfit.append(p.id)) == 1
    assert started == [2] and unfit == [1] and [p.id for p in pending] == [1, 3]
    nm.free(2)
    nm.free(100)
    # Draining for job 1: two nodes free, it needs three; job 3 would fit but must not start.
    assert place_pending(pending, nm, start, lambda *_: None, drain_for=1) == 0
    assert started == [2] and [p.id for p in pending] == [1, 3]
    nm.free(101)
    nm.free(102)
    # All four free: job 1 starts first, then job 3 takes the node left.
    assert place_pending(pending, nm, start, lambda *_: None, drain_for=1) == 2
    assert started == [2, 1, 3] and not pending
    assert len(nm.placements[1].node_indexes) == 3 and len(running) == 3


def test_while_draining_only_the_targets_nodes_are_held_the_others_keep_taking_jobs() -> None:
    """A whole-node job among packed ones: the least occupied node is held for it, and the other
    nodes still take packed jobs (stopping every start left all four nodes partly idle)."""
    nm = NodeManager([NodeInfo(node_id=str(i), hostname=f"n{i}", cpu_ids=range(8)) for i in range(4)])
    for i in range(16):  # 4 nodes x 4 packed jobs: full
        nm.assign(100 + i, Demand(node_packing_count=4))
    for done in (100, 101, 104, 108, 112):  # node 0 drains most: 2 left on it, 3 on the others
        nm.free(done)
    pending = deque([_job(1), *(_job(10 + i, node_packing_count=4) for i in range(6))])
    started, start = _placer(nm)
    assert place_pending(pending, nm, start, lambda *_: None, drain_for=1) == 3
    assert 1 not in started and all(nm.placements[j].node_indexes != (0,) for j in started)
    for done in (102, 103):  # node 0 empties: the whole-node job starts there
        nm.free(done)
    assert place_pending(pending, nm, start, lambda *_: None, drain_for=1) == 1
    assert started[-1] == 1 and nm.placements[1].node_indexes == (0,)


def test_a_multi_node_job_counts_its_whole_nodes_whatever_its_packing() -> None:
    """A 2-node job packing 2 reads as 1.0 by footprint (num_nodes / node_packing_count), the same
    as a whole 1-node job, and was never noted while 1-node jobs took every node that freed."""
    nm = _nodes(4)
    for i in range(4):
        nm.assign(100 + i, Demand())
    nm.free(100)
    pending = deque([_job(1, 2, node_packing_count=2), *(_job(10 + i) for i in range(5))])
    started, start = _placer(nm)
    unfit: list[int] = []
    assert place_pending(pending, nm, start, lambda *_: None, unfit=lambda p: unfit.append(p.id)) == 1
    assert started == [10] and unfit == [1]


def test_jobs_waiting_for_the_same_resources_as_the_rest_are_not_noted() -> None:
    nm = _nodes(1)
    nm.assign(100, Demand())
    pending = deque([_job(1), _job(2)])
    started, start = _placer(nm)
    unfit: list[int] = []
    assert place_pending(pending, nm, start, lambda *_: None, unfit=lambda p: unfit.append(p.id)) == 0
    nm.free(100)
    assert place_pending(pending, nm, start, lambda *_: None, unfit=lambda p: unfit.append(p.id)) == 1
    assert started == [1] and unfit == []  # job 2 waits its turn: no smaller job can pass it
    pending = deque([_job(4, 2), _job(3)])
    nm2 = _nodes(2)
    nm2.assign(101, Demand())
    assert place_pending(pending, nm2, start, lambda *_: None, unfit=lambda p: unfit.append(p.id)) == 1
    assert unfit == [4]  # a 2-node job while a 1-node one takes the node left: noted
    # Nothing smaller pending, but 1-node jobs queued behind running ones (hand-over) would take the
    # nodes as they free up: noted too.
    assert place_pending(deque([_job(5, 2)]), nm2, start, lambda *_: None, unfit=lambda p: unfit.append(p.id),
                         queued=[_job(6)]) == 0
    assert unfit == [4, 5]


def test_a_drain_target_that_fails_to_start_does_not_block_the_rest() -> None:
    nm = _nodes(4)
    pending = deque([_job(2), _job(1, 3)])
    failed: list[int] = []

    def start(prepared: PreparedJob, placement: object) -> None:
        if prepared.id == 1:
            raise RuntimeError("no command line")

    assert place_pending(pending, nm, start, lambda job_id, reason: failed.append(job_id), drain_for=1) == 1
    assert failed == [1] and 1 not in nm.placements and not pending


# -- the setting ------------------------------------------------------------------------------------
def test_the_setting_is_read_with_its_default_and_bad_values_are_one_line_errors_naming_it() -> None:
    assert loads_settings("launcher: {}\n").launcher.mpi_drain_for_large_jobs_sec == 30.0
    assert loads_settings("launcher:\n  mpi_drain_for_large_jobs_sec: 0\n").launcher.mpi_drain_for_large_jobs_sec == 0
    assert loads_settings("launcher:\n  mpi_drain_for_large_jobs_sec: null\n").launcher.mpi_drain_for_large_jobs_sec is None
    for bad in ("soon", ".nan", "[1]", "true"):
        with pytest.raises(SettingsError) as info:
            loads_settings(textwrap.dedent(f"launcher:\n  mpi_drain_for_large_jobs_sec: {bad}\n"))
        message = str(info.value)
        assert "launcher.mpi_drain_for_large_jobs_sec" in message and "\n" not in message, message


# -- a real launcher ----------------------------------------------------------------------------------
def _run_big_among_small(new_site, *, big_after_start: bool, **settings) -> None:
    """4 fake nodes, a 3-node job and 16 one-node 1-s jobs, drain delay 0: the 3-node job is not
    the last to start (before, it started only after every small job had), and the drain is logged."""
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2, mpi_drain_for_large_jobs_sec=0, **settings)

    class Sleep(ApplicationDefinition):
        site = name
        command_template = "sleep {{ secs }}"

    Sleep.sync()
    host = socket.gethostname()
    nodes = [{"node_id": str(i), "hostname": host, "cpu_ids": [0, 1], "gpu_ids": []} for i in range(4)]

    def submit_big() -> int:
        return make_runnable([Sleep.submit(workdir="big", num_nodes=3, secs=1, save=False)])[0]

    big = None if big_after_start else submit_big()
    small = make_runnable(Sleep.submit(workdir=f"s{i}", secs=1, save=False) for i in range(16))
    proc = start_launcher(path, "mpi", 1, env={"BALSAM_LAUNCHER_NODELIST": json.dumps(nodes)})
    if big is None:
        wait_for_states(small[:2], {"RUNNING", "RUN_DONE"})  # the nodes are busy with small jobs
        big = submit_big()
    wait_for_states([big, *small], {"RUN_DONE"}, timeout=90)
    assert finish(proc) == 0
    history = events_of([big, *small])
    began = {j: next(e.timestamp for e in rows if e.to_state == "RUNNING") for j, rows in history.items()}
    ended = {j: next(e.timestamp for e in rows if e.to_state == "RUN_DONE") for j, rows in history.items()}
    later = [j for j in small if began[j] > began[big]]
    assert later, sorted(began.items(), key=lambda item: item[1])
    assert began[big] < max(ended[j] for j in small)
    if big_after_start:  # created first, it is leased and started first (all nodes idle): no drain
        log = "".join(p.read_text() for p in (path / "log").glob("mpi_mode_*.log"))
        assert f"draining nodes for job {big}" in log and f"job {big} started on the drained nodes" in log, log[-3000:]


def test_mpi_mode_starts_a_large_job_created_first_before_the_small_jobs_all_start(new_site) -> None:
    # long_large_first, as docs/launcher.md advises for mixed sizes: the 3-node job is leased first
    # and drained for (in the default order, fewest nodes first as in 0.7, it comes after the
    # small jobs of the backlog).
    _run_big_among_small(new_site, big_after_start=False, sort_by="long_large_first")


def test_mpi_mode_leases_and_starts_a_large_job_that_arrives_while_small_jobs_run(new_site) -> None:
    # long_large_first: the 3-node job, created while small jobs hold every node, is leased at the
    # next acquire (before, only jobs up to the idle nodes were asked for) and drained for.
    _run_big_among_small(new_site, big_after_start=True, sort_by="long_large_first")

"""mpi mode never drains nodes for a job that could not start even on the empty nodes in service.

Audit: on MIG-split nodes with the one node of whole GPUs left taken out (``NodeFaults``), a 2-node
job asking 2 whole GPUs per rank passed the check against the whole partition (the node taken out
still counted), was chosen as the drain target, and the one node of whole GPUs still in service was
held for it: no other job went there until the wall time, while the job could never start. Now the
drain decision asks the node manager whether the job fits the nodes in service (pure accounting,
``NodeManager.check_satisfiable(in_service=True)``); such a job is logged once with the reason and
stays leased, unstarted (the Session returns it), and the nodes keep taking the jobs behind it.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest

from balsam.launcher.app_run import PreparedJob
from balsam.launcher.node_manager import Demand, NodeManager, UnsatisfiableJob
from balsam.launcher.placement import DrainForLarge
from balsam.platform import NodeInfo
from launcher_helpers import FakePool
from test_lease_races import FakeUpdater

MIG = [f"MIG-{i}0b6f2d9e-8a13-5c47-b2e0-94d1c7a3f568" for i in range(4)]


def _nodes() -> list[NodeInfo]:
    """n0, n1: two whole GPUs each; n2: GPUs split into MIG instances only."""
    return [NodeInfo("0", "n0", range(8), ["0", "1"]), NodeInfo("1", "n1", range(8), ["0", "1"]),
            NodeInfo("2", "n2", range(8), MIG)]


BIG = Demand(num_nodes=2, gpus_per_rank=2)  # 2 nodes of 2 whole GPUs: n0 and n1 only


def _job(job_id: int, demand: Demand = Demand()) -> PreparedJob:
    return PreparedJob(job=None, id=job_id, workdir=Path("."), cmdline="true", env={}, demand=demand)


def test_check_satisfiable_in_service_counts_only_the_nodes_not_taken_out() -> None:
    nm = NodeManager(_nodes())
    nm.check_satisfiable(BIG)
    nm.check_satisfiable(BIG, in_service=True)
    assert nm.disable_node(1)
    nm.check_satisfiable(BIG)  # the partition could hold it: not a job to fail
    with pytest.raises(UnsatisfiableJob, match=r"in service \(1 taken out\)"):
        nm.check_satisfiable(BIG, in_service=True)
    with pytest.raises(UnsatisfiableJob, match=r"this launcher has 2 in service \(1 taken out\)"):
        nm.check_satisfiable(Demand(num_nodes=3), in_service=True)
    nm.check_satisfiable(Demand(num_nodes=2), in_service=True)


def test_the_drain_decision_skips_a_job_that_cannot_fit_the_nodes_in_service_and_says_why(caplog) -> None:
    nm = NodeManager(_nodes())
    assert nm.disable_node(1)
    big, other = _job(1, BIG), _job(2, Demand(num_nodes=2))

    def cannot_fit(demand: Demand):
        try:
            nm.check_satisfiable(demand, in_service=True)
        except UnsatisfiableJob as exc:
            return str(exc)
        return None

    drain = DrainForLarge(0)
    drain.note_unfit(big, 0.0)
    drain.note_unfit(other, 1.0)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.placement"):
        assert drain.choose([big, other], 2.0, nm.enabled_count(), cannot_fit) == 2
        assert drain.choose([big, other], 3.0, nm.enabled_count(), cannot_fit) == 2
    lines = [r.getMessage() for r in caplog.records if "job 1 cannot start" in r.getMessage()]
    assert len(lines) == 1 and "GPUs" in lines[0] and "taken out" in lines[0], lines


def _mode(tmp_path: Path):
    from balsam.builtin.default_platform import DefaultPlatform
    from balsam.config.schema import LauncherSettings
    from balsam.launcher.job_mode import LauncherContext
    from balsam.launcher.modes.mpi import MPIMode

    launcher = LauncherSettings(mpi_drain_for_large_jobs_sec=0)
    context = LauncherContext(site_config=None, settings=types.SimpleNamespace(launcher=launcher), site_id=1,
                              data_path=tmp_path, log_path=tmp_path, platform=DefaultPlatform(),
                              nodes=_nodes(), wall_time_min=10)
    mode = MPIMode(context)
    mode.pool = FakePool(mode.wake)
    mode.handover.pool = mode.pool
    return mode


def test_mpi_mode_holds_no_node_for_a_job_that_cannot_fit_the_nodes_in_service(tmp_path: Path) -> None:
    """The whole-GPU node still in service (n0) keeps taking small jobs: it was held idle for the
    2-node job, which could never start once n1 was taken out."""
    mode = _mode(tmp_path)
    nm = mode.node_manager
    assert nm.disable_node(1)  # what NodeFaults does to a node where launches keep failing
    updater = FakeUpdater()
    mode._take([_job(1, BIG), *(_job(10 + i) for i in range(6))], updater)
    assert [p.id for p in mode.pending][0] == 1, "the job was failed: the partition (n1 included) could hold it"
    for _turn in range(4):
        mode._try_start = True
        mode._start_pending(updater)
        for job_id in list(nm.placements):  # every started job ends before the next turn
            nm.free(job_id)
            mode.pool.running.pop(job_id, None)
    assert 1 not in mode.pool.starts
    assert mode.drain.target is None, "n0 is held for a job that can never start"
    assert len(mode.pool.starts) == 6, f"small jobs left waiting behind a held node: started {mode.pool.starts}"
    assert [p.id for p in mode.pending] == [1]

"""The NodeManager's running totals (:meth:`NodeManager.usage`, :meth:`NodeManager.open_nodes`),
which the serial master's free_room reads on every turn instead of summing every node, stay equal
to the sums over the nodes through placements, frees, hand-overs and nodes taken out."""

from __future__ import annotations

import random

import pytest

from balsam.launcher.node_manager import Demand, InsufficientResources, NodeManager, Usage
from balsam.platform import NodeInfo


def summed(manager: NodeManager) -> Usage:
    nodes = [n for n in manager.nodes if not n.disabled]
    return Usage(
        sum(n.num_jobs for n in nodes),
        sum(n.occupancy for n in nodes),
        sum(len(n.info.cpu_ids) - len(n.idle_cpus) for n in nodes),
        sum(len(n.info.gpu_ids) - sum(n.gpu_free.values()) for n in nodes),
    )


def open_by_scan(manager: NodeManager, gpus: bool) -> set[int]:
    return {i for i, n in enumerate(manager.nodes)
            if not n.disabled and n.occupancy < 1.0 - 1e-3 and n.idle_cpus
            and (not gpus or sum(n.gpu_free.values()) > 1e-3)}


def check(manager: NodeManager) -> None:
    usage, expected = manager.usage(), summed(manager)
    assert usage.jobs == expected.jobs and usage.busy_cpus == expected.busy_cpus
    assert usage.occupancy == pytest.approx(expected.occupancy, abs=1e-6)
    assert usage.busy_gpus == pytest.approx(expected.busy_gpus, abs=1e-6)
    for gpus in (False, True):
        assert set(manager.open_nodes(gpus=gpus)) == open_by_scan(manager, gpus)
    assert manager.enabled_count() == sum(1 for n in manager.nodes if not n.disabled)


def test_totals_follow_every_change() -> None:
    rng = random.Random(7)
    nodes = [NodeInfo(str(i), f"n{i}", list(range(16)), [str(g) for g in range(4)]) for i in range(6)]
    manager = NodeManager(nodes, cpu_ids_are_cores=False)
    demands = [Demand(node_packing_count=8, threads_per_rank=2), Demand(node_packing_count=4, gpus_per_rank=1),
               Demand(node_packing_count=16, gpus_per_rank=0.5), Demand(num_nodes=2, ranks_per_node=4),
               Demand(node_packing_count=2, ranks_per_node=2, gpus_per_rank=1)]
    check(manager)
    placed: list[int] = []
    next_id = 1
    for step in range(400):
        action = rng.random()
        if action < 0.55:
            try:
                manager.assign(next_id, rng.choice(demands))
                placed.append(next_id)
            except InsufficientResources:
                pass
            next_id += 1
        elif action < 0.9 and placed:
            manager.free(placed.pop(rng.randrange(len(placed))))
        elif action < 0.97 and placed:
            old = placed.pop(rng.randrange(len(placed)))
            manager.hand_over(old, next_id)
            placed.append(next_id)
            next_id += 1
        elif step > 100:
            manager.disable_node(rng.randrange(len(nodes)))
        check(manager)
    for job_id in placed:
        manager.free(job_id)
    check(manager)
    assert manager.usage() == Usage()


def test_no_gpu_nodes_are_never_gpu_open() -> None:
    manager = NodeManager([NodeInfo("0", "n0", [0, 1])])
    assert list(manager.open_nodes(gpus=True)) == [] and list(manager.open_nodes()) == [0]
    manager.assign(1, Demand(node_packing_count=1))
    assert list(manager.open_nodes()) == []
    check(manager)

"""NodeManager placement: the documented packing examples and the resource limits."""

from __future__ import annotations

import pytest

from balsam.launcher.node_manager import Demand, InsufficientResources, NodeManager, UnsatisfiableJob
from balsam.platform import NodeInfo


def gpu_nodes(count: int = 2, cpus: int = 64, gpus: int = 8) -> list[NodeInfo]:
    return [NodeInfo(f"n{i}", f"host{i}", range(cpus), [str(g) for g in range(gpus)]) for i in range(count)]


def fill(nm: NodeManager, demand: Demand, count: int) -> int:
    placed = 0
    for job_id in range(count):
        try:
            nm.assign(job_id, demand)
        except InsufficientResources:
            continue
        placed += 1
    return placed


@pytest.mark.parametrize(
    "demand, expected",
    [
        (Demand(node_packing_count=8, gpus_per_rank=1), 16),  # docs: all 16 run
        (Demand(node_packing_count=4, gpus_per_rank=1), 8),  # docs: 8 at a time
        (Demand(node_packing_count=8, gpus_per_rank=8), 2),  # docs: 2 at a time (GPU bound)
    ],
)
def test_documented_placement_examples(demand: Demand, expected: int) -> None:
    nm = NodeManager(gpu_nodes())
    assert fill(nm, demand, 16) == expected


def test_free_makes_room_again_and_restores_resources() -> None:
    nm = NodeManager(gpu_nodes(count=1))
    demand = Demand(node_packing_count=4, gpus_per_rank=2)
    for job_id in range(4):
        nm.assign(job_id, demand)
    with pytest.raises(InsufficientResources):
        nm.assign(99, demand)
    nm.free(2)
    placement = nm.assign(99, demand)
    assert len(placement.gpu_ids[0]) == 2
    for job_id in (0, 1, 3, 99):
        nm.free(job_id)
    node = nm.nodes[0]
    assert node.occupancy == 0 and len(node.idle_cpus) == 64 and all(v == 1.0 for v in node.gpu_free.values())


def test_cpu_ids_are_distinct_and_count_threads() -> None:
    nm = NodeManager(gpu_nodes(count=1, cpus=8, gpus=0))
    demand = Demand(ranks_per_node=2, threads_per_rank=4, threads_per_core=2, node_packing_count=8)  # 4 CPUs
    a = nm.assign(1, demand)
    b = nm.assign(2, demand)
    assert len(a.cpu_ids[0]) == 4 and set(a.cpu_ids[0]).isdisjoint(b.cpu_ids[0])
    with pytest.raises(InsufficientResources):
        nm.assign(3, demand)  # occupancy allows 8 but CPUs are gone


def test_fractional_gpus_share_one_gpu() -> None:
    nm = NodeManager(gpu_nodes(count=1, cpus=8, gpus=1))
    half = Demand(gpus_per_rank=0.5, node_packing_count=8)
    a, b = nm.assign(1, half), nm.assign(2, half)
    assert a.gpu_ids == b.gpu_ids == (("0",),)
    with pytest.raises(InsufficientResources):
        nm.assign(3, half)
    nm.free(1)
    assert nm.assign(3, half).gpu_ids == (("0",),)


def test_multi_node_jobs_take_whole_empty_nodes() -> None:
    nm = NodeManager(gpu_nodes(count=3))
    small = nm.assign(1, Demand(node_packing_count=2))
    big = nm.assign(2, Demand(num_nodes=2))
    assert small.node_indexes == (0,) and big.node_indexes == (1, 2) and big.hostnames == ("host1", "host2")
    with pytest.raises(InsufficientResources):
        nm.assign(3, Demand(num_nodes=2))
    assert nm.count_empty_nodes() == 0
    nm.free(2)
    assert nm.count_empty_nodes() == 2 and nm.aggregate_free_nodes() == pytest.approx(2.5)


def test_no_node_packing_gives_each_job_a_whole_node() -> None:
    nm = NodeManager(gpu_nodes(count=2), allow_node_packing=False)
    assert fill(nm, Demand(node_packing_count=8), 8) == 2


def test_unsatisfiable_jobs_are_recognised() -> None:
    nm = NodeManager(gpu_nodes(count=1, cpus=4, gpus=0))
    with pytest.raises(UnsatisfiableJob, match="2 nodes"):
        nm.check_satisfiable(Demand(num_nodes=2))
    with pytest.raises(UnsatisfiableJob, match="GPUs"):
        nm.check_satisfiable(Demand(gpus_per_rank=1))
    with pytest.raises(UnsatisfiableJob, match="CPUs"):
        nm.check_satisfiable(Demand(ranks_per_node=8))
    nm.check_satisfiable(Demand(ranks_per_node=4))


def test_hand_over_passes_a_placement_to_the_job_started_on_it() -> None:
    manager = NodeManager([NodeInfo("0", "n0", [0, 1])])
    demand = Demand(node_packing_count=2)
    first = manager.assign(1, demand)
    moved = manager.hand_over(1, 2)
    assert moved is not None and moved.job_id == 2 and moved.cpu_ids == first.cpu_ids
    assert set(manager.placements) == {2}
    manager.assign(3, demand)  # the other CPU is still free; the handed-over one is not
    with pytest.raises(InsufficientResources):
        manager.assign(4, demand)
    assert manager.hand_over(1, 5) is None  # nothing to pass on
    manager.free(2)
    manager.free(3)
    assert manager.nodes[0].is_empty and manager.nodes[0].idle_cpus == [0, 1]

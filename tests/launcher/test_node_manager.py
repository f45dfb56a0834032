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


def test_cores_for_threads_round_up() -> None:
    """3 ranks x 1 thread at 2 threads per core need 2 cores: the count rounded down to 1 core."""
    assert Demand(ranks_per_node=3, threads_per_rank=1, threads_per_core=2).cpu_ids_per_node(True) == 2
    assert Demand(ranks_per_node=1, threads_per_rank=3, threads_per_core=2).cpu_ids_per_node(True) == 2
    assert Demand(ranks_per_node=2, threads_per_rank=4, threads_per_core=2).cpu_ids_per_node(True) == 4
    nm = NodeManager(gpu_nodes(count=1, cpus=4, gpus=0))
    assert nm.assign(1, Demand(ranks_per_node=3, threads_per_core=2, node_packing_count=2)).cpu_ids == ((0, 1),)


def test_threads_per_core_counts_only_where_cpu_ids_are_cores() -> None:
    """On the default platform the CPU ids are hardware threads already: a 2-thread rank at 2
    threads per core needs 2 of them (dividing by threads_per_core gave it 1)."""
    demand = Demand(ranks_per_node=1, threads_per_rank=2, threads_per_core=2, node_packing_count=2)
    assert demand.cpu_ids_per_node(cpu_ids_are_cores=True) == 1 and demand.cpu_ids_per_node(cpu_ids_are_cores=False) == 2
    assert Demand(ranks_per_node=3, threads_per_core=2).cpu_ids_per_node(cpu_ids_are_cores=False) == 3
    threads = NodeManager(gpu_nodes(count=1, cpus=4, gpus=0), cpu_ids_are_cores=False)
    assert threads.assign(1, demand).cpu_ids == ((0, 1),)
    cores = NodeManager(gpu_nodes(count=1, cpus=4, gpus=0))
    assert cores.assign(1, demand).cpu_ids == ((0,),)  # the platform's binding adds core 0's sibling
    with pytest.raises(UnsatisfiableJob):
        NodeManager(gpu_nodes(count=1, cpus=4, gpus=0), cpu_ids_are_cores=False).check_satisfiable(
            Demand(ranks_per_node=3, threads_per_rank=2, threads_per_core=2))  # 6 threads, 4 ids


def test_multi_node_jobs_need_nodes_that_each_hold_the_per_node_demand() -> None:
    """8 one-GPU ranks per node fail on one 4-GPU node; on two such nodes they were accepted and
    oversubscribed every GPU twice. Nodes may differ (MIG on some): a multi-node job takes nodes that fit."""
    nm = NodeManager(gpu_nodes(count=2, cpus=32, gpus=4))
    for nodes in (1, 2):
        with pytest.raises(UnsatisfiableJob, match="8 GPUs on (one node|each of 2 nodes)"):
            nm.check_satisfiable(Demand(num_nodes=nodes, ranks_per_node=8, gpus_per_rank=1))
        with pytest.raises(UnsatisfiableJob, match="128 CPUs"):
            nm.check_satisfiable(Demand(num_nodes=nodes, ranks_per_node=64, threads_per_rank=2))
    nm.check_satisfiable(Demand(num_nodes=2, ranks_per_node=4, gpus_per_rank=1))

    mixed = NodeManager([*gpu_nodes(count=1, cpus=32, gpus=4), *gpu_nodes(count=2, cpus=32, gpus=8)])
    eight = Demand(num_nodes=2, ranks_per_node=8, gpus_per_rank=1)
    mixed.check_satisfiable(eight)
    assert mixed.assign(1, eight).node_indexes == (1, 2)  # not the 4-GPU node 0, though it is empty too
    with pytest.raises(UnsatisfiableJob, match="2 of them hold that much"):
        mixed.check_satisfiable(Demand(num_nodes=3, ranks_per_node=8, gpus_per_rank=1))


def grouped_node(cpus: int = 8) -> NodeInfo:
    """Three devices of two parts each (Aurora's GPU tiles)."""
    ids = [f"{g}.{t}" for g in range(3) for t in range(2)]
    return NodeInfo("n0", "host0", range(cpus), ids, gpu_groups=[ids[0:2], ids[2:4], ids[4:6]])


def test_gpu_groups_keep_whole_devices_for_whole_device_requests() -> None:
    nm = NodeManager([grouped_node()])
    assert nm.assign(1, Demand(gpus_per_rank=1, node_packing_count=8)).gpu_ids == (("0.0",),)
    # two parts: both of one free device, not the free half of device 0 and half of device 1
    assert nm.assign(2, Demand(gpus_per_rank=2, node_packing_count=8)).gpu_ids == (("1.0", "1.1"),)
    # one part: the free half of the half-used device 0 before splitting device 2
    assert nm.assign(3, Demand(gpus_per_rank=1, node_packing_count=8)).gpu_ids == (("0.1",),)
    assert nm.assign(4, Demand(gpus_per_rank=2, node_packing_count=8)).gpu_ids == (("2.0", "2.1"),)
    nm.free(2)
    nm.free(3)
    # three parts: one whole device, then the free half of a half-used one (device 0's 0.1)
    assert nm.assign(5, Demand(ranks_per_node=3, gpus_per_rank=1, node_packing_count=8)).gpu_ids == (("1.0", "1.1", "0.1"),)


def test_gpu_groups_fall_back_to_parts_of_several_devices() -> None:
    nm = NodeManager([grouped_node()])
    one, two = Demand(gpus_per_rank=1, node_packing_count=8), Demand(gpus_per_rank=2, node_packing_count=8)
    assert [nm.assign(i, one).gpu_ids[0][0] for i in range(4)] == ["0.0", "0.1", "1.0", "1.1"]
    nm.free(1)
    nm.free(3)  # free: 0.1, 1.1 and device 2
    assert nm.assign(5, two).gpu_ids == (("2.0", "2.1"),)
    # no whole device left: the request still runs, on free parts of two devices
    assert nm.assign(6, two).gpu_ids == (("0.1", "1.1"),)


def test_gpu_groups_are_checked_and_survive_json() -> None:
    import json

    import attrs

    with pytest.raises(ValueError, match="host0: gpu_groups names '9', which is not one of its gpu_ids"):
        NodeInfo("n0", "host0", [0], ["0", "1"], gpu_groups=[["0", "9"]])
    with pytest.raises(ValueError, match="gpu_groups names '0' twice"):
        NodeInfo("n0", "host0", [0], ["0", "1"], gpu_groups=[["0"], ["0", "1"]])
    node = grouped_node()
    # The serial workers' config and BALSAM_LAUNCHER_NODELIST carry nodes as JSON (groups as lists).
    assert NodeInfo(**json.loads(json.dumps(attrs.asdict(node)))) == node


def numa_node(cpus: int = 16) -> NodeInfo:
    """Four GPUs, each near a quarter of the CPUs, GPU 3 near the first (Polaris' layout)."""
    quarter = cpus // 4
    near = {str(3 - d): range(d * quarter, (d + 1) * quarter) for d in range(4)}
    return NodeInfo("n0", "host0", range(cpus), ["3", "2", "1", "0"], gpu_cpus=near)


def test_gpu_cpus_put_cpus_near_their_gpus_and_keep_them_for_gpu_jobs() -> None:
    nm = NodeManager([numa_node()])
    one_gpu = Demand(gpus_per_rank=1, node_packing_count=16)
    # one-GPU jobs: a CPU of each GPU's quarter, not CPUs 0, 1, 2, 3
    assert [nm.assign(i, one_gpu).cpu_ids[0] for i in range(2)] == [(0,), (4,)]
    # a CPU-only job takes CPUs near the busy GPUs (3's and 2's quarters), not near idle GPUs 1 and 0
    assert nm.assign(2, Demand(threads_per_rank=4, node_packing_count=16)).cpu_ids == ((1, 2, 3, 5),)
    assert nm.assign(3, one_gpu).cpu_ids == ((8,),)
    nm.free(0)
    # GPU 3 is free again but its CPUs are not all idle; a 4-CPU GPU job takes GPU 0 (CPUs 12-15 idle)
    placed = nm.assign(4, Demand(threads_per_rank=4, gpus_per_rank=1, node_packing_count=16))
    assert placed.gpu_ids == (("0",),) and placed.cpu_ids == ((12, 13, 14, 15),)
    # a fraction of a GPU goes near idle CPUs too: GPU 3 (CPU 0 idle again)
    assert nm.assign(5, Demand(gpus_per_rank=0.5, node_packing_count=16)).cpu_ids == ((0,),)
    for job in range(6):
        nm.free(job)
    assert sorted(nm.nodes[0].idle_cpus) == nm.nodes[0].idle_cpus == list(range(16))


def test_gpu_cpus_are_checked_and_survive_json() -> None:
    import json

    import attrs

    with pytest.raises(ValueError, match="host0: gpu_cpus names '9', which is not one of its gpu_ids"):
        NodeInfo("n0", "host0", [0], ["0"], gpu_cpus={"9": [0]})
    node = numa_node()
    assert dict(node.gpu_cpus)["3"] == (0, 1, 2, 3)
    assert NodeInfo(**json.loads(json.dumps(attrs.asdict(node)))) == node

"""NodeManager: a GPU job's CPUs are shared out per rank, near each rank's first GPU, in rank order.

With one core per rank and several GPU ids per rank, shares per GPU id put all of a job's cores near
its first GPUs: 6 Aurora ranks of 2 tiles were bound to cores 1-6 (socket 0), ranks 3-5 with their
tiles on socket 1; 2 Polaris ranks of 2 GPUs to cores 0 and 8, rank 1 (GPUs 1 and 0, NUMA domains 2
and 3) in domain 1. The ``--cpu-bind list:`` is the launcher's cut of the picked CPUs in their order
(``cpu_bind_list``), so the checks go through it. Pure: the node layouts as ALCF documents them.
"""

from __future__ import annotations

import pytest

from balsam.launcher.node_manager import Demand, NodeManager
from balsam.platform import LaunchSpec, NodeInfo, cpu_bind_list, cpu_domains_of, parse_id_ranges

#: ALCF's Aurora guide: tiles of GPUs 0-2 near cores 1-51 (socket 0), of GPUs 3-5 near 53-103
#: (socket 1); cores 0 and 52 left to the system; hardware thread c + 104 is core c's sibling.
AURORA_CORES = tuple(parse_id_ranges("1-51,53-103"))
AURORA_TILES = [f"{g}.{t}" for g in range(6) for t in range(2)]
AURORA_OFFSET = 104
#: ALCF's Aurora "Running jobs" binding for 12 ranks of 8 cores.
ALCF_12_BY_8 = "list:1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100"
#: ALCF's Polaris guide: GPU 3 <-> cores 0-7, GPU 2 <-> 8-15, GPU 1 <-> 16-23, GPU 0 <-> 24-31
#: (the platform lists the GPUs in that order, 3 first).
POLARIS_NEAR = {"3": range(0, 8), "2": range(8, 16), "1": range(16, 24), "0": range(24, 32)}


def aurora_node() -> NodeInfo:
    near = {tile: range(1, 52) if int(tile[0]) < 3 else range(53, 104) for tile in AURORA_TILES}
    groups = [tuple(AURORA_TILES[2 * g : 2 * g + 2]) for g in range(6)]
    return NodeInfo("n0", "aurora0", AURORA_CORES, AURORA_TILES, gpu_groups=groups, gpu_cpus=near)


def polaris_node() -> NodeInfo:
    return NodeInfo("n0", "polaris0", range(32), list(POLARIS_NEAR), gpu_cpus=POLARIS_NEAR)


def socket_of(cpu: int) -> int:
    return 0 if cpu < 52 else 1


def numa_of(cpu: int) -> int:
    return cpu // 8


def binding(node: NodeInfo, placement, demand: Demand, offset: int = 0) -> str:
    spec = LaunchSpec(cmdline="./app", hostnames=placement.hostnames, ranks_per_node=demand.ranks_per_node,
                      threads_per_rank=demand.threads_per_rank, threads_per_core=demand.threads_per_core,
                      gpus_per_rank=demand.gpus_per_rank, cpu_ids=placement.cpu_ids, gpu_ids=placement.gpu_ids)
    return cpu_bind_list(spec, node.cpu_ids, hyperthread_offset=offset,
                         cpu_domains=cpu_domains_of(node.cpu_ids, node.gpu_cpus), max_threads_per_core=2)


def rank_cpus(bind: str) -> list[tuple[int, ...]]:
    return [parse_id_ranges(part) for part in bind.split(":", 1)[1].split(":")]


def assert_rank_near_first_gpu(placement, demand: Demand, bind: str, domain_of) -> None:
    """Rank r's CPUs lie in the domain of its first GPU (it uses ``gpus[r*k : (r+1)*k]``)."""
    gpus = placement.gpu_ids[0]
    per_rank = len(gpus) // demand.ranks_per_node
    near = dict(NEAR_OF[domain_of])
    for rank, cpus in enumerate(rank_cpus(bind)):
        first = gpus[rank * per_rank]
        assert {domain_of(c) for c in cpus} == {domain_of(near[first][0])}, (rank, first, cpus, bind)


NEAR_OF = {socket_of: aurora_node().gpu_cpus, numa_of: polaris_node().gpu_cpus}


@pytest.mark.parametrize(
    "make, demand, expected, domain_of",
    [
        # ranks 0-2 on socket 0 with GPUs 0-2, ranks 3-5 on socket 1 with GPUs 3-5
        (aurora_node, Demand(ranks_per_node=6, gpus_per_rank=2), "list:1:2:3:53:54:55", socket_of),
        # rank 1's six tiles are GPUs 3-5: its core on socket 1
        (aurora_node, Demand(ranks_per_node=2, gpus_per_rank=6), "list:1:53", socket_of),
        # rank 1 uses GPUs 1 and 0 (domains 2 and 3): its core near GPU 1, not core 8 (domain 1)
        (polaris_node, Demand(ranks_per_node=2, gpus_per_rank=2), "list:0:16", numa_of),
    ],
    ids=["aurora-6x2", "aurora-2x6", "polaris-2x2"],
)
def test_one_core_per_rank_sits_near_the_ranks_first_gpu(make, demand: Demand, expected: str, domain_of) -> None:
    node = make()
    nm = NodeManager([node], hardware_threads_per_core=2)
    placement = nm.assign(1, demand)
    assert len(placement.cpu_ids[0]) == demand.cpu_ids_per_node(True, 2)
    bind = binding(node, placement, demand)
    assert bind == expected
    assert_rank_near_first_gpu(placement, demand, bind, domain_of)


@pytest.mark.parametrize(
    "make, demand, expected",
    [
        (aurora_node, Demand(ranks_per_node=12, gpus_per_rank=1, threads_per_rank=8), ALCF_12_BY_8),
        (polaris_node, Demand(ranks_per_node=4, gpus_per_rank=1), "list:0:8:16:24"),
        (polaris_node, Demand(ranks_per_node=4, gpus_per_rank=1, threads_per_rank=8), "list:0-7:8-15:16-23:24-31"),
    ],
    ids=["aurora-12x1x8", "polaris-4x1", "polaris-4x1x8"],
)
def test_one_gpu_per_rank_shapes_are_unchanged(make, demand: Demand, expected: str) -> None:
    node = make()
    placement = NodeManager([node], hardware_threads_per_core=2).assign(1, demand)
    assert binding(node, placement, demand) == expected


def test_hyperthread_siblings_follow_the_cores_picked() -> None:
    """6 one-thread ranks at 2 threads per core need 3 cores; each core goes near the first rank
    bound to it (ranks 0, 2, 4), and the binding uses only their siblings (c + 104)."""
    node = aurora_node()
    demand = Demand(ranks_per_node=6, gpus_per_rank=2, threads_per_core=2)
    placement = NodeManager([node], hardware_threads_per_core=2).assign(1, demand)
    assert placement.cpu_ids[0] == (1, 2, 53)
    assert binding(node, placement, demand, AURORA_OFFSET) == "list:1:105:2:106:53:157"


def test_packed_jobs_stay_disjoint_off_reserved_cores_and_near_their_ranks_gpus() -> None:
    node = aurora_node()
    nm = NodeManager([node], hardware_threads_per_core=2)
    demand = Demand(ranks_per_node=3, gpus_per_rank=2, threads_per_rank=4, node_packing_count=2)
    first, second = nm.assign(1, demand), nm.assign(2, demand)
    a, b = set(first.cpu_ids[0]), set(second.cpu_ids[0])
    assert len(a) == len(b) == 12 and not a & b and not (a | b) & {0, 52}
    for placement in (first, second):
        assert_rank_near_first_gpu(placement, demand, binding(node, placement, demand), socket_of)
    nm.free(1)
    nm.free(2)
    assert sorted(nm.nodes[0].idle_cpus) == list(AURORA_CORES)


def test_cpus_beyond_a_ranks_domain_stay_in_that_ranks_group() -> None:
    """2 ranks of 12 cores on Polaris: each rank takes all 8 cores of its GPU's domain and 4 more.
    The 8 extra cores appended after both ranks' shares shifted the cut: rank 1 got 12-23, only 4
    cores near its GPU."""
    node = polaris_node()
    demand = Demand(ranks_per_node=2, gpus_per_rank=1, threads_per_rank=12)
    placement = NodeManager([node], hardware_threads_per_core=2).assign(1, demand)
    assert len(set(placement.cpu_ids[0])) == 24
    rank0, rank1 = rank_cpus(binding(node, placement, demand))
    gpu0, gpu1 = placement.gpu_ids[0]
    assert set(POLARIS_NEAR[gpu0]) <= set(rank0) and set(POLARIS_NEAR[gpu1]) <= set(rank1)
    assert len(rank0) == len(rank1) == 12 and not set(rank0) & set(rank1)

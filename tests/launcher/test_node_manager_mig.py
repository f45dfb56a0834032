"""NodeManager on nodes with MIG instances: a rank that needs more than one GPU id gets whole GPUs.

CUDA enumerates one MIG instance per process (NVIDIA MIG user guide, "CUDA Device Enumeration"), so
a rank given two MIG UUIDs, or a MIG UUID and a whole GPU, in its CUDA_VISIBLE_DEVICES sees one
device of them. Pure accounting over NodeInfo values.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.launcher.node_manager import Demand, InsufficientResources, NodeManager, UnsatisfiableJob
from balsam.platform import NodeInfo, parse_nvidia_smi_list

RECORDED = Path(__file__).resolve().parents[1] / "platforms" / "recorded"

MIG = [f"MIG-{i}0b6f2d9e-8a13-5c47-b2e0-94d1c7a3f568" for i in range(5)]


def mixed_node(name: str = "n0", whole: tuple[str, ...] = ("3", "2")) -> NodeInfo:
    """A Polaris-like node: GPUs 3 and 2 whole, GPUs 1 and 0 split into MIG instances."""
    return NodeInfo(name, f"{name}.host", range(32), [*whole, *MIG])


def test_a_rank_needing_two_gpus_gets_whole_gpus_only() -> None:
    nm = NodeManager([mixed_node()])
    assert nm.assign(1, Demand(gpus_per_rank=1, node_packing_count=8)).gpu_ids == (("3",),)
    # Only GPU 2 is whole and free: two ids for one rank must not be GPU 2 and a MIG instance.
    two = Demand(gpus_per_rank=2, node_packing_count=8)
    nm.check_satisfiable(two)  # the node has two whole GPUs: it can run once GPU 3 is free
    with pytest.raises(InsufficientResources):
        nm.assign(2, two)
    nm.free(1)
    assert nm.assign(2, two).gpu_ids == (("3", "2"),)


def test_one_and_a_half_gpus_per_rank_is_more_than_one_id() -> None:
    nm = NodeManager([mixed_node()])
    placed = nm.assign(1, Demand(gpus_per_rank=1.5, node_packing_count=8))
    assert not any(g.startswith("MIG-") for g in placed.gpu_ids[0]) and len(placed.gpu_ids[0]) == 2


def test_no_node_with_enough_whole_gpus_fails_the_job_with_the_reason() -> None:
    all_mig = parse_nvidia_smi_list((RECORDED / "polaris-mig-3g.20gb-nvidia-smi-L.txt").read_text())
    node = NodeInfo("n0", "n0.host", range(32), all_mig.mig_ids())
    nm = NodeManager([node, mixed_node("n1", whole=("3",))])
    with pytest.raises(UnsatisfiableJob) as caught:
        nm.check_satisfiable(Demand(gpus_per_rank=2))
    message = str(caught.value)
    assert "\n" not in message and "MIG instance" in message and "at most 1 GPUs not split by MIG" in message
    # A multi-node job: each node needs the whole GPUs.
    with pytest.raises(UnsatisfiableJob, match="whole GPUs only"):
        NodeManager([mixed_node("a", whole=("3",)), mixed_node("b", whole=("3",))]).check_satisfiable(
            Demand(num_nodes=2, gpus_per_rank=2))


def test_the_job_goes_to_a_node_with_whole_gpus() -> None:
    nm = NodeManager([mixed_node("a", whole=()), mixed_node("b")])
    placed = nm.assign(1, Demand(gpus_per_rank=2, node_packing_count=8))
    assert placed.hostnames == ("b.host",) and placed.gpu_ids == (("3", "2"),)
    two_nodes = NodeManager([mixed_node("a", whole=()), mixed_node("b"), mixed_node("c")])
    assert two_nodes.assign(2, Demand(num_nodes=2, gpus_per_rank=2)).hostnames == ("b.host", "c.host")


def test_one_id_per_rank_may_still_be_a_mig_instance() -> None:
    nm = NodeManager([mixed_node(whole=())])
    # one id per rank: each rank narrows to its own (see docs/platforms/polaris.md)
    assert nm.assign(1, Demand(ranks_per_node=2, gpus_per_rank=1, node_packing_count=8)).gpu_ids == ((MIG[0], MIG[1]),)
    assert nm.assign(2, Demand(gpus_per_rank=0.5, node_packing_count=8)).gpu_ids[0][0] in MIG


def test_nodes_without_mig_are_unchanged() -> None:
    nm = NodeManager([NodeInfo("n0", "h", range(32), ["0", "1", "2", "3"])])
    assert nm.assign(1, Demand(gpus_per_rank=2, ranks_per_node=2)).gpu_ids == (("0", "1", "2", "3"),)

"""Perlmutter allocations of part of a node (``-x exclusive=no``, the shared QOS: ``--gpus=1`` is
about a quarter of a node): the platform counted every core of the node, so balsam packed steps
on cores the allocation does not have and Slurm refused them ("More processors requested than
permitted": a real-Slurm audit, job with AllocCPUS=1). The cores of each node come from
``SLURM_JOB_CPUS_PER_NODE`` (logical CPUs, 2 per core)."""

from __future__ import annotations

import logging

import pytest

from balsam.platform import LaunchSpec, NodeInfo
from balsam_platform_perlmutter import PerlmutterCPUPlatform, PerlmutterGPUPlatform
from balsam_platform_perlmutter.platform import allocated_cores, parse_cpus_per_node

NODES = "nid[001-002]"


def _cores(platform, **env: str) -> list[tuple[int, ...]]:
    return [n.cpu_ids for n in platform.discover_nodes({"SLURM_JOB_NODELIST": NODES, **env})]


def test_cpus_per_node_are_read_in_node_list_order() -> None:
    assert parse_cpus_per_node("32(x2),16") == [32, 32, 16]
    assert parse_cpus_per_node("128") == [128]
    with pytest.raises(ValueError):
        parse_cpus_per_node("32(2)")


def test_a_partial_allocation_gives_each_node_only_its_cores(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="balsam.platform"):  # by name: a test before may have set "balsam" to WARNING
        assert _cores(PerlmutterGPUPlatform(), SLURM_JOB_CPUS_PER_NODE="32(x2)") == [tuple(range(16))] * 2
    assert "SLURM_JOB_CPUS_PER_NODE=32(x2)" in caplog.text and "16 of 64 cores" in caplog.text
    assert _cores(PerlmutterGPUPlatform(), SLURM_JOB_CPUS_PER_NODE="64,32") == [tuple(range(32)), tuple(range(16))]
    assert _cores(PerlmutterCPUPlatform(), SLURM_JOB_CPUS_PER_NODE="128,256") == [tuple(range(64)), tuple(range(128))]
    # One logical CPU (a test cluster's AllocCPUS=1): one core, never none.
    assert _cores(PerlmutterGPUPlatform(), SLURM_JOB_CPUS_PER_NODE="1(x2)") == [(0,)] * 2


def test_whole_nodes_and_no_count_leave_every_core(caplog) -> None:
    whole = [tuple(range(64))] * 2
    with caplog.at_level(logging.INFO, logger="balsam.platform"):  # by name: a test before may have set "balsam" to WARNING
        assert _cores(PerlmutterGPUPlatform()) == whole
        assert _cores(PerlmutterGPUPlatform(), SLURM_JOB_CPUS_PER_NODE="128(x2)") == whole
    assert "SLURM_JOB_CPUS_PER_NODE" not in caplog.text
    assert _cores(PerlmutterCPUPlatform(), SLURM_JOB_CPUS_PER_NODE="256(x2)") == [tuple(range(128))] * 2
    # A count for another number of nodes, or another form: said, and nothing narrowed.
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        assert _cores(PerlmutterGPUPlatform(), SLURM_JOB_CPUS_PER_NODE="32") == whole
        assert _cores(PerlmutterGPUPlatform(), SLURM_JOB_CPUS_PER_NODE="lots") == whole
    assert "for 2 nodes" in caplog.text and "'lots'" in caplog.text


def test_the_launchers_node_keeps_the_cores_of_its_affinity() -> None:
    nodes = [NodeInfo(h, h, tuple(range(64))) for h in ("nid001", "nid002")]
    env = {"SLURM_JOB_CPUS_PER_NODE": "16(x2)", "SLURMD_NODENAME": "nid001"}
    # Cores 8-15 and their second hardware threads (core + 64).
    own = set(range(8, 16)) | set(range(72, 80))
    narrowed = allocated_cores(nodes, env, 2, 64, own)
    assert [n.cpu_ids for n in narrowed] == [tuple(range(8, 16)), tuple(range(8))]


def test_serial_workers_ask_srun_for_the_allocations_cpus_not_the_whole_node() -> None:
    platform = PerlmutterGPUPlatform()
    nodes = platform.discover_nodes({"SLURM_JOB_NODELIST": NODES, "SLURM_JOB_CPUS_PER_NODE": "32(x2)"})
    spec = LaunchSpec(cmdline="worker", hostnames=[n.hostname for n in nodes], ranks_per_node=1, threads_per_rank=1,
                      launch_params={"cpus-per-task": "128"})
    args = platform.mpi_launch_args(spec)
    assert args[args.index("--cpus-per-task") + 1] == "32", args
    whole = PerlmutterGPUPlatform()
    whole.discover_nodes({"SLURM_JOB_NODELIST": NODES})
    args = whole.mpi_launch_args(spec)
    assert args[args.index("--cpus-per-task") + 1] == "128", args

"""Perlmutter: a job that owns whole nodes spreads its ranks over the node's cores.

NERSC's Perlmutter affinity guide: ``-c`` is ``2 * floor(64 / tasks_per_node)`` on GPU nodes (64
cores, 128 hardware threads), ``2 * floor(128 / tasks_per_node)`` on CPU nodes. srun lays a step's
tasks out from core 0, ``-c`` logical CPUs each: 2 nodes of 4 one-thread GPU ranks got ``-c 2``,
and all four ranks sat on cores 0-3 (one NUMA domain) while their GPUs spread over the node.
Packed steps on part of a node keep their own count (they share the node with other steps).
"""

from __future__ import annotations

import pytest

from balsam.launcher.node_manager import Demand, NodeManager
from balsam.platform import LaunchSpec
from balsam_platform_perlmutter import PerlmutterCPUPlatform, PerlmutterGPUPlatform

NODES = "nid[001000-001001]"


def _c(platform, spec: LaunchSpec) -> int:
    args = platform.mpi_launch_args(spec)
    return int(args[args.index("--cpus-per-task") + 1])


def _placed_spec(platform, demand: Demand, **env: str) -> LaunchSpec:
    """The spec of ``demand`` as the mpi mode builds it from the node manager's placement."""
    nodes = platform.discover_nodes({"SLURM_JOB_NODELIST": NODES, **env})
    nm = NodeManager(nodes, cpu_ids_are_cores=True, hardware_threads_per_core=platform.hardware_threads_per_core)
    placement = nm.assign(1, demand)
    return LaunchSpec(cmdline="./app", hostnames=placement.hostnames, ranks_per_node=demand.ranks_per_node,
                      threads_per_rank=demand.threads_per_rank, threads_per_core=demand.threads_per_core,
                      gpus_per_rank=demand.gpus_per_rank, cpu_ids=placement.cpu_ids, gpu_ids=placement.gpu_ids)


@pytest.mark.parametrize("ranks, expected", [(4, 32), (1, 128), (8, 16), (64, 2)])
def test_multi_node_gpu_jobs_get_nersc_cpus_per_task(ranks: int, expected: int) -> None:
    platform = PerlmutterGPUPlatform()
    spec = _placed_spec(platform, Demand(num_nodes=2, ranks_per_node=ranks, gpus_per_rank=4 / ranks if ranks <= 4 else 0))
    assert _c(platform, spec) == expected


def test_the_audited_line_spreads_the_ranks() -> None:
    platform = PerlmutterGPUPlatform()
    spec = _placed_spec(platform, Demand(num_nodes=2, ranks_per_node=4, gpus_per_rank=1))
    line = platform.mpi_command_line(spec)
    assert ("srun -n 8 --ntasks-per-node 4 --gpus-per-task 1 --nodelist nid001000,nid001001 --nodes 2 "
            "--cpus-per-task 32 --cpu-bind=cores --overlap ./app") == line


def test_more_threads_than_the_node_share_keep_the_computed_count() -> None:
    # 4 ranks of 32 threads at 2 per core: 16 cores each, 32 logical CPUs: max() keeps it
    platform = PerlmutterGPUPlatform()
    spec = LaunchSpec(cmdline="./app", hostnames=["nid001000", "nid001001"], ranks_per_node=4, threads_per_rank=32,
                      threads_per_core=2, gpus_per_rank=1)
    assert _c(platform, spec) == 32


def test_cpu_nodes_count_their_own_cores() -> None:
    # 128 cores a node, not the GPU node's 64: 4 ranks get 64 logical CPUs each
    platform = PerlmutterCPUPlatform()
    spec = _placed_spec(platform, Demand(num_nodes=2, ranks_per_node=4))
    assert _c(platform, spec) == 64


def test_the_site_cores_option_is_the_core_count() -> None:
    platform = PerlmutterGPUPlatform(options={"cpu_ids": "0-31"})
    spec = _placed_spec(platform, Demand(num_nodes=2, ranks_per_node=4, gpus_per_rank=1))
    assert _c(platform, spec) == 16


def test_a_partial_node_allocation_counts_only_its_cores() -> None:
    # 32 logical CPUs a node (16 cores): srun refuses more than the allocation has
    platform = PerlmutterGPUPlatform()
    spec = _placed_spec(platform, Demand(num_nodes=2, ranks_per_node=4), SLURM_JOB_CPUS_PER_NODE="32(x2)")
    assert _c(platform, spec) == 8


def test_a_single_node_job_with_every_core_is_whole() -> None:
    platform = PerlmutterGPUPlatform()
    spec = LaunchSpec(cmdline="./app", hostnames=["nid001000"], ranks_per_node=3, gpus_per_rank=1,
                      cpu_ids=[tuple(range(64))])
    assert _c(platform, spec) == 42  # 2 * floor(64 / 3); the computed count was 2


def test_packed_steps_on_part_of_a_node_are_unchanged() -> None:
    platform = PerlmutterGPUPlatform()
    nodes = platform.discover_nodes({"SLURM_JOB_NODELIST": "nid001000"})
    nm = NodeManager(nodes, cpu_ids_are_cores=True, hardware_threads_per_core=2)
    for job_id in range(4):
        demand = Demand(gpus_per_rank=1, threads_per_rank=8, node_packing_count=4)
        p = nm.assign(job_id, demand)
        spec = LaunchSpec(cmdline="./app", hostnames=p.hostnames, threads_per_rank=8, gpus_per_rank=1,
                          cpu_ids=p.cpu_ids, gpu_ids=p.gpu_ids)
        line = platform.mpi_command_line(spec)
        # The job's GPU is balsam's, given to the program (Slurm would pick GPU 0 for every step).
        # Changed deliberately: the step was -c 16 --cpu-bind=cores, which real Slurm bound to the
        # node's first cores for every packed step; it is now bound to balsam's 8 cores (and their
        # second threads) by mask, its -c the node's CPUs so the mask lies in the step, and the app
        # gets the job's 16 back (test_perlmutter_packed_cpus_recorded.py).
        cores = sum(1 << c | 1 << (c + 64) for c in p.cpu_ids[0])
        assert f"--cpus-per-task 128 --cpu-bind=mask_cpu:{hex(cores)} " in line, line
        # (set by a /bin/sh wrapper that then runs the command as srun resolves it: env searched PATH only)
        assert line.endswith(" sh SLURM_CPUS_PER_TASK=16 SLURM_CPUS_ON_NODE=16 "
                             f"CUDA_VISIBLE_DEVICES={','.join(p.gpu_ids[0])} -- ./app"), line
        assert " --overlap /bin/sh -c " in line, line
        assert "--gpus-per-task" not in line
    # one node, 4 one-thread ranks on 4 of its cores, packed with others: the step does not own the
    # node, so its ranks count 2 CPUs each (the SLURM_CPUS_PER_TASK its app sees; the step's -c is the
    # node's 128 / 4, one mask per rank)
    spec = LaunchSpec(cmdline="./app", hostnames=["nid001000"], ranks_per_node=4, gpus_per_rank=1,
                      cpu_ids=[(0, 1, 2, 3)])
    assert platform.cpus_per_task(spec) == 2 and _c(platform, spec) == 32
    assert "mask_cpu:0x10000000000000001,0x20000000000000002,0x40000000000000004,0x80000000000000008 " in \
        platform.mpi_command_line(spec)


def test_a_one_node_job_that_occupies_its_node_whole_spreads_its_ranks() -> None:
    """node_packing_count 1 (the default): the job has the node to itself although the node
    manager gave it 4 CPU ids; mpi mode says so (whole_nodes) and the ranks get NERSC's -c 32."""
    platform = PerlmutterGPUPlatform()
    nodes = platform.discover_nodes({"SLURM_JOB_NODELIST": "nid001000"})
    nm = NodeManager(nodes, cpu_ids_are_cores=True, hardware_threads_per_core=2)
    p = nm.assign(1, Demand(ranks_per_node=4, gpus_per_rank=1))
    assert p.occupancy == 1.0 and len(p.cpu_ids[0]) == 4
    spec = LaunchSpec(cmdline="./app", hostnames=p.hostnames, ranks_per_node=4, gpus_per_rank=1,
                      cpu_ids=p.cpu_ids, gpu_ids=p.gpu_ids, whole_nodes=True)
    assert _c(platform, spec) == 32

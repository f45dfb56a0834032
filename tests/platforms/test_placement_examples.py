"""The placement examples of Balsam 0.7's docs (inventory §6.4) on every GPU platform's node layout.

0.7: "64-core/8-GPU nodes, 2 nodes: 16 jobs with node_packing_count=8, gpus_per_rank=1 -> all 16 run;
node_packing_count=4 -> 8 at a time; node_packing_count=8 with gpus_per_rank=8 -> 2 at a time". On a
node with G GPU ids the same rules read: npc=G, gpr=1 -> 2G at once; npc=G/2 -> G; gpr=G -> 2. The
launch line of the first placement is checked against the line 0.7's AppRun class builds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.launcher.node_manager import Demand, InsufficientResources, NodeManager
from balsam.platform import LaunchSpec
from balsam.plugins.manager import get_plugin_manager


def _nodes(platform, tmp_path: Path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n0\nn1\n")
    env = {"PBS_NODEFILE": str(nodefile), "COBALT_NODEFILE": str(nodefile), "SLURM_JOB_NODELIST": "n[0-1]"}
    return platform.discover_nodes(env)


def _fill(nm: NodeManager, demand: Demand, limit: int = 200) -> list:
    placed = []
    for job_id in range(limit):
        try:
            placed.append(nm.assign(job_id, demand))
        except InsufficientResources:
            break
    return placed


def _line(platform, placement, demand: Demand) -> str:
    spec = LaunchSpec(cmdline="./app", hostnames=placement.hostnames, ranks_per_node=demand.ranks_per_node,
                      threads_per_rank=demand.threads_per_rank, gpus_per_rank=demand.gpus_per_rank,
                      cpu_ids=placement.cpu_ids, gpu_ids=placement.gpu_ids)
    return platform.mpi_command_line(spec)


# platform, options, GPU ids per node, 0.7's line for the first npc=G gpr=1 job (one core, one GPU)
CASES = [
    # core 0 is left to the system on Aurora and Sunspot: the first job gets core 1
    ("aurora", None, 12, "mpiexec -n 1 --ppn 1 --hosts n0 --cpu-bind list:1 -d 1 --envall ./app"),
    ("sunspot", None, 12, "mpiexec -n 1 --ppn 1 --hosts n0 --cpu-bind list:1 -d 1 --envall ./app"),
    ("polaris", {"gpu_list_dir": "", "discover_mig": False}, 4, "mpiexec -n 1 --ppn 1 --hosts n0 --cpu-bind list:0 -d 1 ./app"),
    ("perlmutter-gpu", None, 4,
     # 0.7 passed --cpus-per-task 1 (threads_per_rank); srun counts hardware threads: one core is 2
     # a step packed on part of a node asks Slurm for no GPU and runs under balsam's (Slurm gives GPU 0
     # to every --overlap step: test_perlmutter_slurm_gres_recorded.py); changed deliberately: it was
     # -c 2 --cpu-bind=cores, which Slurm binds to the node's first core for every packed step; the
     # step now spans the node (-c 128) bound by mask to balsam's core 0 and its second thread 64,
     # and the app sees the job's -c 2 (test_perlmutter_packed_cpus_recorded.py), set by a /bin/sh
     # wrapper that runs the command as srun resolves it (env searched PATH only)
     "srun --gres=craynetwork:0 -n 1 --ntasks-per-node 1 --nodelist n0 --nodes 1 --cpus-per-task 128 "
     "--cpu-bind=mask_cpu:0x10000000000000001 --overlap /bin/sh -c 'while [ \"$1\" != -- ]; do case $1 in *=*) "
     "export \"$1\" ;; *) unset \"$1\" ;; esac; shift; done; shift; p=$1; shift; case $p in /*|*/*) ;; .*) "
     "p=./$p ;; *) f=; set -f; IFS=:; for d in $PATH; do [ -f \"${d:-.}/$p\" ] && [ -x \"${d:-.}/$p\" ] && f=1 "
     "&& break; done; unset IFS; set +f; [ -n \"$f\" ] || [ ! -e \"$p\" ] || p=./$p ;; esac; exec \"$p\" \"$@\"' "
     "sh SLURM_CPUS_PER_TASK=2 SLURM_CPUS_ON_NODE=2 CUDA_VISIBLE_DEVICES=0 -- ./app"),
    ("thetagpu", {"gpu_list_dir": ""}, 8,
     "mpirun --oversubscribe --bind-to none -n 1 -npernode 1 --host n0 ./app"),
]


@pytest.mark.parametrize("name,options,gpus,first_line", CASES, ids=[c[0] for c in CASES])
def test_placement_examples(name: str, options, gpus: int, first_line: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("COBALT_NODEFILE", raising=False)
    platform = get_plugin_manager().load_driver("platform", name)(options=options)
    nodes = _nodes(platform, tmp_path)
    assert [len(n.gpu_ids) for n in nodes] == [gpus, gpus]

    one_gpu = Demand(gpus_per_rank=1, node_packing_count=gpus)
    placed = _fill(NodeManager(nodes), one_gpu)
    assert len(placed) == 2 * gpus  # every job at once, one GPU each
    assert len({(p.hostnames, p.gpu_ids) for p in placed}) == 2 * gpus
    assert _line(platform, placed[0], one_gpu) == first_line

    assert len(_fill(NodeManager(nodes), Demand(gpus_per_rank=1, node_packing_count=max(1, gpus // 2)))) == gpus

    whole_node = Demand(gpus_per_rank=gpus, node_packing_count=gpus)
    placed = _fill(NodeManager(nodes), whole_node)
    assert len(placed) == 2 and all(len(p.gpu_ids[0]) == gpus for p in placed)


def test_inventory_example_verbatim_on_thetagpu(tmp_path: Path, monkeypatch) -> None:
    """The 0.7 docs' own numbers (8 GPUs per node, 2 nodes) on ThetaGPU's DGX nodes."""
    monkeypatch.delenv("COBALT_NODEFILE", raising=False)
    platform = get_plugin_manager().load_driver("platform", "thetagpu")(options={"gpu_list_dir": ""})
    nodes = _nodes(platform, tmp_path)
    assert len(_fill(NodeManager(nodes), Demand(gpus_per_rank=1, node_packing_count=8))) == 16
    assert len(_fill(NodeManager(nodes), Demand(gpus_per_rank=1, node_packing_count=4))) == 8
    assert len(_fill(NodeManager(nodes), Demand(gpus_per_rank=8, node_packing_count=8))) == 2

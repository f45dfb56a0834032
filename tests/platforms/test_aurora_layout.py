"""Aurora/Sunspot layout and launch lines (pure: the driver and the NodeManager over its nodes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.launcher.node_manager import Demand, InsufficientResources, NodeManager
from balsam.platform import LaunchSpec, cpu_bind_list, parse_id_ranges
from balsam_platform_aurora import AuroraPlatform, SunspotPlatform


@pytest.fixture(autouse=True)
def _no_hierarchy_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default device_hierarchy (inherit) reads the launcher's environment: FLAT when unset.
    monkeypatch.delenv("ZE_FLAT_DEVICE_HIERARCHY", raising=False)


def nodes(tmp_path: Path, n: int = 2, **options):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"x4000c0s{i}b0n0.hostmgmt2000.cm.aurora.alcf.anl.gov\n" for i in range(n)))
    platform = AuroraPlatform(options=options or None)
    return platform, platform.discover_nodes({"PBS_NODEFILE": str(nodefile)})


def test_node_layout_from_pbs_nodefile(tmp_path: Path) -> None:
    platform, found = nodes(tmp_path)
    assert [n.hostname for n in found] == [f"x4000c0s{i}b0n0.hostmgmt2000.cm.aurora.alcf.anl.gov" for i in range(2)]
    # cores 0 and 52 (the first of each socket) are left to the system services ALCF reserves them for
    assert found[0].cpu_ids == tuple(range(1, 52)) + tuple(range(53, 104))
    assert found[0].gpu_ids == ("0.0", "0.1", "1.0", "1.1", "2.0", "2.1", "3.0", "3.1", "4.0", "4.1", "5.0", "5.1")
    assert platform.scheduler_id({"PBS_JOBID": "123456.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"}) == 123456
    with pytest.raises(RuntimeError, match="PBS_NODEFILE"):
        platform.discover_nodes({})


def test_gpus_per_rank_one_is_a_tile_two_is_a_gpu(tmp_path: Path) -> None:
    _, found = nodes(tmp_path, 1)
    nm = NodeManager(found)
    tiles = [nm.assign(i, Demand(gpus_per_rank=1, node_packing_count=12)).gpu_ids[0] for i in range(12)]
    assert sorted(t for (t,) in tiles) == sorted(found[0].gpu_ids)
    with pytest.raises(InsufficientResources):
        nm.assign(99, Demand(gpus_per_rank=1, node_packing_count=12))
    nm = NodeManager(found)
    whole = [nm.assign(i, Demand(gpus_per_rank=2, node_packing_count=6)).gpu_ids[0] for i in range(6)]
    assert whole[0] == ("0.0", "0.1") and whole[5] == ("5.0", "5.1")  # both tiles of one GPU


def test_a_whole_gpu_after_a_single_tile_job_is_both_tiles_of_one_gpu(tmp_path: Path) -> None:
    """gpus_per_rank=2 is "one rank per whole GPU": after a one-tile job took 0.0 it got 0.1 and 1.0,
    tiles of two GPUs. Each GPU's tiles are one NodeInfo.gpu_groups entry: whole GPUs go to whole
    GPU requests, and a single tile fills the half-used GPU first."""
    platform, found = nodes(tmp_path, 1)
    assert found[0].gpu_groups == tuple((f"{g}.0", f"{g}.1") for g in range(6))
    nm = NodeManager(found)
    assert nm.assign(1, Demand(gpus_per_rank=1, node_packing_count=12)).gpu_ids == (("0.0",),)
    whole = nm.assign(2, Demand(gpus_per_rank=2, node_packing_count=6))
    assert whole.gpu_ids == (("1.0", "1.1"),)
    assert platform.gpu_environment(whole.gpu_ids[0])["ZE_AFFINITY_MASK"] == "2,3"  # FLAT: GPU 1's tiles
    assert nm.assign(3, Demand(gpus_per_rank=1, node_packing_count=12)).gpu_ids == (("0.1",),)
    # tiles_per_gpu=1: every id is a whole GPU already, no groups
    _, whole_gpus = nodes(tmp_path, 1, tiles_per_gpu=1)
    assert whole_gpus[0].gpu_groups == ()


def test_tiles_get_cores_of_their_gpus_socket(tmp_path: Path) -> None:
    """GPUs 0-2 sit on socket 0 (cores 1-51 for jobs), GPUs 3-5 on socket 1 (53-103): a tile's cores
    come from its socket, however earlier jobs left the node."""
    platform, found = nodes(tmp_path, 1)
    near = dict(found[0].gpu_cpus)
    assert near["0.0"] == near["2.1"] == tuple(range(1, 52)) and near["3.0"] == tuple(range(53, 104))
    nm = NodeManager(found)
    eight = Demand(threads_per_rank=8, gpus_per_rank=1, node_packing_count=12)
    placed = [nm.assign(i, eight) for i in range(12)]
    assert [p.gpu_ids[0][0][0] for p in placed] == ["0", "0", "1", "1", "2", "2", "3", "3", "4", "4", "5", "5"]
    assert all((p.cpu_ids[0][0] < 52) == (int(p.gpu_ids[0][0][0]) < 3) for p in placed)
    for i in (0, 1, 6):  # tiles 0.0, 0.1 and 3.0 free; cores 1-16 and 53-60
        nm.free(i)
    again = nm.assign(20, eight)  # tile 3.0 (half-used GPU 3 first) with cores of socket 1
    assert again.gpu_ids == (("3.0",),) and again.cpu_ids == (tuple(range(53, 61)),)
    spec = LaunchSpec(cmdline="a", hostnames=[found[0].hostname], threads_per_rank=8, gpus_per_rank=1,
                      cpu_ids=again.cpu_ids, gpu_ids=again.gpu_ids)
    assert platform.cpu_binding(spec) == "list:53-60"
    # a user's cpu_ids that give every core keep working; the map keeps only cores of cpu_ids
    _, found = nodes(tmp_path, 1, cpu_ids="0-103")
    assert found[0].cpu_ids == tuple(range(104)) and dict(found[0].gpu_cpus)["3.1"][0] == 53
    _, found = nodes(tmp_path, 1, gpu_cpus="")
    assert found[0].gpu_cpus == ()


def test_launch_lines_as_balsam_07_builds_them() -> None:
    platform = AuroraPlatform()
    hosts = ("x4000c0s0b0n0", "x4000c0s1b0n0")
    # A whole-node 2-node job, 12 ranks per node: 6 ranks per socket, each socket's cores split among them.
    line = platform.mpi_launch_args(LaunchSpec(cmdline="app", hostnames=hosts, ranks_per_node=12, gpus_per_rank=1))
    assert line[:8] == ["mpiexec", "-n", "24", "--ppn", "12", "--hosts", ",".join(hosts), "--cpu-bind"]
    assert line[8] == "list:" + ":".join([f"{1 + 8 * r}-{8 + 8 * r}" for r in range(6)]
                                         + [f"{53 + 8 * r}-{60 + 8 * r}" for r in range(6)])
    assert line[9:12] == ["-d", "1", "--envall"]
    # A multi-node GPU job: every node's tiles, the same on every node (the ranks' wrapper picks one each)
    assert line[12:] == ["--env", "ZE_ENABLE_PCI_ID_DEVICE_ORDER=1", "--env", "ZE_FLAT_DEVICE_HIERARCHY=FLAT",
                         "--env", "ZE_AFFINITY_MASK=0,1,2,3,4,5,6,7,8,9,10,11"]
    # A packed single-node job: the assigned cores, 2 per rank; hyperthreads with threads_per_core=2.
    spec = LaunchSpec(cmdline="app", hostnames=hosts[:1], ranks_per_node=2, threads_per_rank=4, threads_per_core=2,
                      cpu_ids=[[10, 11, 12, 13]], gpu_ids=[["1.0"]])
    assert platform.cpu_binding(spec) == "list:10-11,114-115:12-13,116-117"
    assert platform.mpi_launch_args(spec)[-3:] == ["-d", "4", "--envall"]
    # launch_params: cpu_bind and depth are the user's; anything else is passed on.
    spec = LaunchSpec(cmdline="app", hostnames=hosts[:1], launch_params={"cpu_bind": "depth", "depth": "8", "no-transfer": ""})
    assert platform.mpi_launch_args(spec)[7:] == ["--cpu-bind", "depth", "-d", "8", "--envall", "--no-transfer"]
    assert platform.mpi_command_line(LaunchSpec(cmdline="echo $X", hostnames=hosts[:1])).endswith("--envall echo $X")
    # Tiles become ZE_AFFINITY_MASK (flat device ids: Level Zero's default FLAT mode), with the mode
    # itself; never CUDA variables.
    assert platform.gpu_environment(["0.0", "0.1"]) == {
        "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1", "ZE_FLAT_DEVICE_HIERARCHY": "FLAT", "ZE_AFFINITY_MASK": "0,1"}
    assert platform.gpu_environment([]) == {}


def test_options_cpu_bind_and_limit() -> None:
    platform = AuroraPlatform(options={"cpu_bind": "none", "max_mpiexec_per_batch_job": 0, "cpu_ids": "0-103"})
    assert platform.cpu_binding(LaunchSpec(cmdline="a", hostnames=("h",))) == "none"
    assert platform.launch_limit() is None and 0 in platform.cpu_ids and 52 in platform.cpu_ids
    limit = AuroraPlatform().launch_limit()
    assert limit.max_launches == 1000 and "1000 mpiexec launches per batch job" in limit.reason
    # tiles_per_gpu=1: whole GPUs, plain ids (ZE_AFFINITY_MASK=0 is the whole GPU, 0.0 only its tile 0).
    assert SunspotPlatform(options={"tiles_per_gpu": 1}).gpu_ids == ("0", "1", "2", "3", "4", "5")


def test_id_ranges_and_bind_lists() -> None:
    assert parse_id_ranges("0-3,8") == (0, 1, 2, 3, 8)
    for bad in ("3-1", "a", "1,1", ""):
        with pytest.raises(ValueError):
            parse_id_ranges(bad)
    spec = LaunchSpec(cmdline="a", hostnames=("h",), ranks_per_node=3, cpu_ids=[[0, 1, 2, 5, 6, 7]])
    assert cpu_bind_list(spec, range(8)) == "list:0-1:2,5:6-7"

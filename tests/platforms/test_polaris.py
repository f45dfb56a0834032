"""Polaris: the conformance kit, the layout (reversed GPU order, MIG) and jobs through the real
launcher on a faked Polaris (PBS node file, recording PALS mpiexec, nvidia-smi stand-in)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from balsam.launcher.node_manager import Demand, NodeManager
from balsam.platform import LaunchSpec
from balsam.testing import PlatformContract
from balsam.testing.platform_contract import SERIAL_WORKER_CMDLINE
from balsam_platform_polaris import PolarisPlatform
from machine_jobs import balsam_client, done_site_id, job_out, run_jobs, site_for
from platform_harness import max_sharing, run_spans

RECORDED = Path(__file__).parent / "recorded"
MIG_LIST = (RECORDED / "polaris-mig-3g.20gb-nvidia-smi-L.txt").read_text()
PLAIN_LIST = (RECORDED / "polaris-nvidia-smi-L.txt").read_text()
# In GPU affinity order 3, 2, 1, 0: GPU 3's two instances first.
MIG_IDS = ["MIG-e27b9d54-1c0a-5f63-8d4b-6a91c3e0f5d2", "MIG-f4a06c38-9e5b-5a12-a7d0-2c6e8b3f914e",
           "MIG-9a3c6e12-4f8d-5b70-a1e9-d26c7f05b3a4", "MIG-c5f18b0d-7a2e-5e94-b3c6-08f4d1a9e27b",
           "MIG-52d9a7c3-0e6b-5f18-a4d2-7c3e90b1f846", "MIG-7e0a4f86-b2c9-5d31-9f7e-3b58a2c4d019",
           "MIG-0b6f2d9e-8a13-5c47-b2e0-94d1c7a3f568", "MIG-3c81e5a0-d7f2-5b96-8e4c-1a09b6d2c37f"]
HOSTS = ["x3004c0s1b0n0.hsn.cm.polaris.alcf.anl.gov", "x3004c0s7b1n0.hsn.cm.polaris.alcf.anl.gov"]


class TestPolaris(PlatformContract):
    platform_class = PolarisPlatform
    platform_options = {"gpu_list_dir": "", "discover_mig": False}
    allocation_env = {"PBS_NODEFILE": "{nodefile}", "PBS_JOBID": "1196243.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"}
    nodefile_text = f"{HOSTS[0]}\n{HOSTS[1]}\n"
    expected_hostnames = HOSTS
    expected_cpu_count = 32
    expected_gpu_ids = ["3", "2", "1", "0"]
    expected_scheduler_id = 1196243
    gpu_visibility = [(["3"], {"CUDA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}),
                      ([MIG_IDS[0]], {"CUDA_VISIBLE_DEVICES": MIG_IDS[0]})]
    launch_lines = [
        # 0.7's PolarisRun: 4 ranks x 8 threads on one node, list binding of the assigned cores
        (LaunchSpec(cmdline="./app", hostnames=HOSTS[:1], ranks_per_node=4, threads_per_rank=8, gpus_per_rank=1,
                    cpu_ids=[list(range(32))], gpu_ids=[["3", "2", "1", "0"]]),
         f"mpiexec -n 4 --ppn 4 --hosts {HOSTS[0]} --cpu-bind list:0-7:8-15:16-23:24-31 -d 8 ./app"),
        # hyperthreads: threads_per_core=2 adds the sibling threads (+32)
        (LaunchSpec(cmdline="./app", hostnames=HOSTS[:1], ranks_per_node=2, threads_per_rank=4, threads_per_core=2,
                    cpu_ids=[[0, 1, 2, 3]]),
         f"mpiexec -n 2 --ppn 2 --hosts {HOSTS[0]} --cpu-bind list:0-1,32-33:2-3,34-35 -d 4 ./app"),
        # --cpu-bind core: the depth is the cores per rank
        (LaunchSpec(cmdline="./app", hostnames=HOSTS, ranks_per_node=2, threads_per_rank=4,
                    launch_params={"cpu_bind": "core"}),
         f"mpiexec -n 4 --ppn 2 --hosts {','.join(HOSTS)} --cpu-bind core -d 4 ./app"),
    ]
    serial_worker_line = f"mpiexec -n 2 --ppn 1 --hosts {','.join(HOSTS)} --cpu-bind list:0-31 -d 1 {SERIAL_WORKER_CMDLINE}"
    unbound_serial_worker_line = f"mpiexec -n 2 --ppn 1 --hosts {','.join(HOSTS)} --cpu-bind none -d 1 {SERIAL_WORKER_CMDLINE}"
    task_cpu_cases = [((0,), 2, (0, 32)), ((4, 5), 2, (4, 5, 36, 37))]


def _polaris_node(tmp_path: Path, **options):
    nodefile = tmp_path / "nodes"
    nodefile.write_text(HOSTS[0] + "\n")
    platform = PolarisPlatform(options={"gpu_list_dir": "", "discover_mig": False, **options})
    return platform, platform.discover_nodes({"PBS_NODEFILE": str(nodefile)})


def test_gpu_jobs_get_the_cores_of_their_gpus_numa_domain(tmp_path: Path) -> None:
    """1-core one-GPU jobs got cores 0, 1, 2, 3 with GPUs 3, 2, 1, 0 (first-fit, whatever the GPU:
    three of four jobs on another NUMA domain than their GPU); now each gets a core of its GPU's
    domain, as 8-core jobs always did."""
    platform, found = _polaris_node(tmp_path)
    nm = NodeManager(found)
    placed = [nm.assign(i, Demand(threads_per_rank=8, gpus_per_rank=1, node_packing_count=4)) for i in range(4)]
    assert [(p.cpu_ids[0][0], p.gpu_ids[0]) for p in placed] == [(0, ("3",)), (8, ("2",)), (16, ("1",)), (24, ("0",))]
    nm = NodeManager(found)
    placed = [nm.assign(i, Demand(gpus_per_rank=1, node_packing_count=8)) for i in range(4)]
    assert [(p.cpu_ids[0], p.gpu_ids[0]) for p in placed] == [((0,), ("3",)), ((8,), ("2",)), ((16,), ("1",)), ((24,), ("0",))]
    # Two ranks on two GPUs: each rank's cores near its own GPU (rank i uses the job's GPU i).
    nm = NodeManager(found)
    placed = nm.assign(1, Demand(ranks_per_node=2, threads_per_rank=2, gpus_per_rank=1, node_packing_count=4))
    assert placed.gpu_ids == (("3", "2"),) and placed.cpu_ids == ((0, 1, 8, 9),)
    spec = LaunchSpec(cmdline="a", hostnames=HOSTS[:1], ranks_per_node=2, threads_per_rank=2, gpus_per_rank=1,
                      cpu_ids=placed.cpu_ids, gpu_ids=placed.gpu_ids)
    assert platform.cpu_binding(spec) == "list:0-1:8-9"


def test_gpus_with_idle_cores_first_and_cpu_jobs_near_busy_gpus(tmp_path: Path) -> None:
    _, found = _polaris_node(tmp_path)
    nm = NodeManager(found)
    # A CPU-only job on an idle node: cores 0-7 (GPU 3's domain)...
    assert nm.assign(1, Demand(threads_per_rank=8, node_packing_count=8)).cpu_ids == (tuple(range(8)),)
    # ...so a one-GPU job gets GPU 2 and a core of its domain, not GPU 3 with a core far from it.
    assert nm.assign(2, Demand(threads_per_rank=2, gpus_per_rank=1, node_packing_count=8)).gpu_ids == (("2",),)
    assert nm.placements[2].cpu_ids == ((8, 9),)
    # The next CPU-only job takes cores near the busy GPU 2 (10-13), not GPU 1's or GPU 0's.
    assert nm.assign(3, Demand(threads_per_rank=4, node_packing_count=8)).cpu_ids == ((10, 11, 12, 13),)
    assert nm.assign(4, Demand(gpus_per_rank=1, node_packing_count=8)).cpu_ids == ((16,),)
    # When no free GPU has idle cores near it, the job still runs (cores elsewhere).
    nm.free(1)
    for job in range(5, 12):
        nm.assign(job, Demand(threads_per_rank=1, node_packing_count=32))
    assert nm.assign(20, Demand(threads_per_rank=1, gpus_per_rank=1, node_packing_count=32)).gpu_ids == (("3",),)


def test_gpu_cpus_option_empty_is_first_fit_and_bad_values_are_named(tmp_path: Path) -> None:
    _, found = _polaris_node(tmp_path, gpu_cpus="")
    assert found[0].gpu_cpus == ()
    nm = NodeManager(found)
    placed = [nm.assign(i, Demand(gpus_per_rank=1, node_packing_count=8)) for i in range(4)]
    assert [p.cpu_ids[0] for p in placed] == [(0,), (1,), (2,), (3,)]
    assert PolarisPlatform.options_schema(gpu_cpus="3:0-7 2").validate() == {
        "gpu_cpus": "gpu_cpus: '2' is not GPU ids:CPU ranges (like 3:0-7 or 0,1,2:0-51)"}
    assert "named twice" in PolarisPlatform.options_schema(gpu_cpus="3:0-7 3:8-15").validate()["gpu_cpus"]
    with pytest.raises(ValueError, match="launcher.platform_options.gpu_cpus: 'x-1' is not a number"):
        PolarisPlatform(options={"gpu_cpus": "3:x-1"})


def test_mig_instances_get_the_cores_of_their_gpu(tmp_path: Path) -> None:
    nodefile = _nodefile(tmp_path, HOSTS[0], HOSTS[1])  # the allocation starts, then the record is written
    records = tmp_path / "gpulists"
    records.mkdir()
    (records / f"balsam-{HOSTS[0].split('.')[0]}-gpulist.txt").write_text(MIG_LIST)
    platform = PolarisPlatform(options={"gpu_list_dir": str(records), "discover_mig": False})
    node = platform.discover_nodes({"PBS_NODEFILE": str(nodefile)})[0]
    near = dict(node.gpu_cpus)
    assert near[MIG_IDS[0]] == near[MIG_IDS[1]] == tuple(range(0, 8))  # GPU 3's instances
    assert near[MIG_IDS[6]] == tuple(range(24, 32))  # GPU 0's
    nm = NodeManager([node])
    placed = [nm.assign(i, Demand(gpus_per_rank=1, node_packing_count=8)) for i in range(3)]
    assert [(p.gpu_ids[0], p.cpu_ids[0]) for p in placed] == [
        ((MIG_IDS[0],), (0,)), ((MIG_IDS[1],), (1,)), ((MIG_IDS[2],), (8,))]


def test_ranks_sharing_cores_get_their_own_hardware_threads(tmp_path: Path) -> None:
    """3 ranks x 1 thread at 2 threads per core: 2 cores (the count rounded down to 1), and each rank
    its own hardware thread of them (the third rank was bound to the first one's)."""
    platform = PolarisPlatform(options={"gpu_list_dir": "", "discover_mig": False})
    nodefile = tmp_path / "nodes"
    nodefile.write_text(HOSTS[0] + "\n")
    nm = NodeManager(platform.discover_nodes({"PBS_NODEFILE": str(nodefile)}))
    demand = Demand(ranks_per_node=3, threads_per_core=2, node_packing_count=2)
    placed = nm.assign(1, demand)
    assert placed.cpu_ids == ((0, 1),)
    spec = LaunchSpec(cmdline="a", hostnames=HOSTS[:1], ranks_per_node=3, threads_per_core=2, cpu_ids=placed.cpu_ids)
    assert platform.cpu_binding(spec) == "list:0:32:1"


def _nodefile(tmp_path: Path, *hosts: str) -> Path:
    """The allocation's node file, written (as PBS does) when the allocation starts."""
    nodefile = tmp_path / "PBS_NODEFILE"
    nodefile.write_text("".join(h + "\n" for h in hosts))
    return nodefile


def test_the_launchers_own_node_asks_nvidia_smi_before_its_record(tmp_path: Path, monkeypatch, fake_machine) -> None:
    """A MIG record left in /var/tmp by an earlier job named instances this node no longer has; the
    live `nvidia-smi -L` (MIG off) wins for the launcher's own node."""
    machine = fake_machine([socket.gethostname()])
    machine.nvidia_smi("polaris-nvidia-smi-L.txt")
    monkeypatch.setenv("PATH", machine.env()["PATH"])
    nodefile = _nodefile(tmp_path, socket.gethostname())
    records = tmp_path / "gpulists"
    records.mkdir()
    (records / f"balsam-{socket.gethostname().split('.')[0]}-gpulist.txt").write_text(MIG_LIST)
    [node] = PolarisPlatform(options={"gpu_list_dir": str(records)}).discover_nodes({"PBS_NODEFILE": str(nodefile)})
    assert list(node.gpu_ids) == ["3", "2", "1", "0"]
    # discover_mig off (no nvidia-smi run): the record, written after the allocation started, counts
    [node] = PolarisPlatform(options={"gpu_list_dir": str(records), "discover_mig": False}).discover_nodes(
        {"PBS_NODEFILE": str(nodefile)})
    assert list(node.gpu_ids) == MIG_IDS


def test_records_older_than_the_allocation_are_ignored(tmp_path: Path, caplog) -> None:
    records = tmp_path / "gpulists"
    records.mkdir()
    record = records / f"balsam-{HOSTS[1].split('.')[0]}-gpulist.txt"
    record.write_text(MIG_LIST)
    nodefile = _nodefile(tmp_path, *HOSTS)
    started = nodefile.stat().st_mtime
    os.utime(record, (started - 3600, started - 3600))  # an earlier job's record
    platform = PolarisPlatform(options={"gpu_list_dir": str(records), "discover_mig": False})
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        nodes = platform.discover_nodes({"PBS_NODEFILE": str(nodefile)})
    assert [list(n.gpu_ids) for n in nodes] == [["3", "2", "1", "0"]] * 2
    assert f"ignoring {record}: written before this allocation started" in caplog.text
    os.utime(record, (started, started))  # written at the allocation's start: this job's
    assert list(platform.discover_nodes({"PBS_NODEFILE": str(nodefile)})[1].gpu_ids) == MIG_IDS


def test_mig_instances_from_records_and_local_nvidia_smi(tmp_path: Path, monkeypatch, fake_machine) -> None:
    machine = fake_machine([socket.gethostname(), HOSTS[1]])
    machine.nvidia_smi("polaris-mig-3g.20gb-nvidia-smi-L.txt")
    monkeypatch.setenv("PATH", machine.env()["PATH"])
    records = tmp_path / "gpulists"
    records.mkdir()
    (records / f"balsam-{HOSTS[1].split('.')[0]}-gpulist.txt").write_text(PLAIN_LIST)
    nodes = PolarisPlatform(options={"gpu_list_dir": str(records)}).discover_nodes({"PBS_NODEFILE": str(machine.node_file)})
    assert list(nodes[0].gpu_ids) == MIG_IDS  # this node: nvidia-smi -L, GPU 3's instances first
    assert list(nodes[1].gpu_ids) == ["3", "2", "1", "0"]  # recorded list without MIG


def _mixed_list() -> str:
    """The recorded MIG listing with GPUs 2 and 3 left whole (their MIG lines dropped): GPUs 0-1
    split in two 3g.20gb instances each, 2-3 whole, as `nvidia-smi -L` prints such a node."""
    lines, gpu = [], None
    for line in MIG_LIST.splitlines(keepends=True):
        if line.startswith("GPU "):
            gpu = int(line.split()[1].rstrip(":"))
        elif gpu is not None and gpu >= 2:
            continue
        lines.append(line)
    return "".join(lines)


def test_gpus_left_whole_beside_mig_instances_are_still_gpu_ids(tmp_path: Path) -> None:
    """Only the MIG UUIDs used to come back from a node whose GPUs were partly split: its whole
    GPUs vanished. Each GPU gives its instances, or its index when whole, in affinity order."""
    text = _mixed_list()
    assert text.count("  MIG ") == 4 and text.count("GPU ") == 4
    nodefile = _nodefile(tmp_path, HOSTS[0])  # the allocation started before the record was written
    records = tmp_path / "gpulists"
    records.mkdir()
    (records / f"balsam-{HOSTS[0].split('.')[0]}-gpulist.txt").write_text(text)
    platform = PolarisPlatform(options={"gpu_list_dir": str(records), "discover_mig": False})
    [node] = platform.discover_nodes({"PBS_NODEFILE": str(nodefile)})
    # GPU 3, GPU 2 (whole), then GPU 1's and GPU 0's instances (MIG_IDS is in that order too)
    assert list(node.gpu_ids) == ["3", "2", *MIG_IDS[4:]]
    nm = NodeManager([node])
    placed = [nm.assign(i, Demand(threads_per_rank=1, gpus_per_rank=1, node_packing_count=6)) for i in range(6)]
    assert [p.gpu_ids[0][0] for p in placed] == ["3", "2", *MIG_IDS[4:]]
    assert platform.gpu_environment(["2"])["CUDA_VISIBLE_DEVICES"] == "2"
    assert platform.gpu_environment([MIG_IDS[4]])["CUDA_VISIBLE_DEVICES"] == MIG_IDS[4]


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_jobs_on_a_faked_polaris_with_mig(mode: str, balsam_env, fake_machine, tmp_path: Path) -> None:
    # Both nodes' `nvidia-smi -L` recorded (the launcher's own node is asked directly in the test
    # above; the serial mode's start check compares rank host names with the node names, so the
    # nodes here carry Polaris names, none of them this host's).
    machine = fake_machine(HOSTS)
    records = tmp_path / "gpulists"
    records.mkdir()
    (records / f"balsam-{HOSTS[0].split('.')[0]}-gpulist.txt").write_text(MIG_LIST)  # 8 MIG instances
    (records / f"balsam-{HOSTS[1].split('.')[0]}-gpulist.txt").write_text(PLAIN_LIST)  # 4 GPUs
    site = site_for(tmp_path, "polaris", platform_options={"gpu_list_dir": str(records), "discover_mig": False})
    env = machine.env(PBS_NODEFILE=str(machine.node_file), PBS_JOBID="1196243.polaris-pbs-01")
    done = run_jobs(site, mode, env, lambda App: [
        App.submit(workdir=f"gpu/{n}", n=n, gpus_per_rank=1, node_packing_count=8, save=False) for n in range(12)])
    seen = {}
    for n in range(12):
        out = job_out(site, f"gpu/{n}")
        assert f"job {n} " in out and "OMP_NUM_THREADS=1" in out, out
        seen[f"gpu/{n}"] = out.split("CUDA_VISIBLE_DEVICES=")[1].split()[0]
    # One MIG instance (first node) or one GPU (second node) each; no two jobs on one at the same time.
    assert set(seen.values()) <= set(MIG_IDS + ["3", "2", "1", "0"])
    assert max_sharing(run_spans(balsam_client(), done_site_id(done)), seen) == 1
    assert all(str(j.state) == "RUN_DONE" for j in done.values())
    records_ = machine.records("mpiexec")
    if mode == "mpi":
        assert len(records_) == 12
        for r in records_:
            opts = dict(r["options"])
            assert opts["-n"] == "1" and opts["--ppn"] == "1" and opts["--cpu-bind"].startswith("list:")
            assert r["env"]["CUDA_VISIBLE_DEVICES"] in MIG_IDS + ["3", "2", "1", "0"]
    else:
        (workers,) = records_
        assert dict(workers["options"])["--ppn"] == "1" and dict(workers["options"])["-n"] == "2"

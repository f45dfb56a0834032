"""Polaris and Perlmutter keep only the GPUs the allocation's ``CUDA_VISIBLE_DEVICES`` lists.

A shared-QOS or partial-node allocation (Perlmutter ``--gpus=2``) starts the launcher with
``CUDA_VISIBLE_DEVICES=0,1``; both platforms handed out their configured ``3,2,1,0`` / ``0,1,2,3``
anyway, so packed jobs got GPUs 2 and 3 outside the allocation and a multi-node job of 4 one-GPU
ranks per node ran on 2 GPUs. The default platform already took its GPU ids from the variable.
Discovery from a PBS node file / Slurm node list, MIG lists from the recorded ``nvidia-smi -L``,
then the real launcher on a faked Perlmutter (recording ``srun`` on PATH).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from balsam.launcher.node_manager import Demand, NodeManager, UnsatisfiableJob
from balsam.platform import NodeInfo, cuda_visible_only, parse_nvidia_smi_list
from balsam_platform_perlmutter import PerlmutterCPUPlatform, PerlmutterGPUPlatform
from balsam_platform_polaris import PolarisPlatform
from machine_jobs import job_out, run_jobs, site_for

RECORDED = Path(__file__).parent / "recorded"
MIG_LIST = (RECORDED / "polaris-mig-3g.20gb-nvidia-smi-L.txt").read_text()
POLARIS_HOSTS = ["x3004c0s1b0n0.hsn.cm.polaris.alcf.anl.gov", "x3004c0s7b1n0.hsn.cm.polaris.alcf.anl.gov"]
# GPU 1's and GPU 0's two 3g.20gb instances each, in the affinity order 1, 0 (see test_polaris.py).
MIG_OF_GPUS_1_AND_0 = ["MIG-52d9a7c3-0e6b-5f18-a4d2-7c3e90b1f846", "MIG-7e0a4f86-b2c9-5d31-9f7e-3b58a2c4d019",
                       "MIG-0b6f2d9e-8a13-5c47-b2e0-94d1c7a3f568", "MIG-3c81e5a0-d7f2-5b96-8e4c-1a09b6d2c37f"]
SLURM = {"SLURM_JOB_NODELIST": "nid[001234-001235]", "SLURM_JOB_ID": "31415926"}


def _nodefile(tmp_path: Path) -> Path:
    """The allocation's node file (PBS writes it when the allocation starts: records come after)."""
    nodefile = tmp_path / "PBS_NODEFILE"
    if not nodefile.exists():
        nodefile.write_text("".join(h + "\n" for h in POLARIS_HOSTS))
    return nodefile


def _polaris(tmp_path: Path, env: dict[str, str], **options: object) -> list[NodeInfo]:
    nodefile = _nodefile(tmp_path)
    platform = PolarisPlatform(options={"gpu_list_dir": "", "discover_mig": False, **options})
    return platform.discover_nodes({"PBS_NODEFILE": str(nodefile), **env})


def test_polaris_keeps_the_allocations_gpus_in_its_affinity_order(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="balsam.platform"):
        nodes = _polaris(tmp_path, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert [list(n.gpu_ids) for n in nodes] == [["1", "0"]] * 2
    # The cores near the GPUs left out are no GPU's any more (CPU-only jobs may take them first).
    assert [gpu for gpu, _ in nodes[0].gpu_cpus] == ["1", "0"]
    lines = [r.getMessage() for r in caplog.records if "CUDA_VISIBLE_DEVICES" in r.getMessage()]
    assert lines == ["CUDA_VISIBLE_DEVICES=0,1 in the launcher's environment: jobs get only the GPU ids it lists "
                     f"({POLARIS_HOSTS[0]}: 1,0 of 3,2,1,0)"]
    nm = NodeManager(nodes[:1])
    placed = [nm.assign(i, Demand(gpus_per_rank=1, node_packing_count=4)).gpu_ids[0] for i in range(2)]
    assert placed == [("1",), ("0",)]
    # Without the variable nothing changes.
    assert [list(n.gpu_ids) for n in _polaris(tmp_path, {})] == [["3", "2", "1", "0"]] * 2


def test_polaris_mig_instances_go_with_the_gpu_listed(tmp_path: Path) -> None:
    _nodefile(tmp_path)
    records = tmp_path / "gpulists"
    records.mkdir()
    for host in POLARIS_HOSTS:
        (records / f"balsam-{host.split('.')[0]}-gpulist.txt").write_text(MIG_LIST)
    nodes = _polaris(tmp_path, {"CUDA_VISIBLE_DEVICES": "0,1"}, gpu_list_dir=str(records))
    assert [list(n.gpu_ids) for n in nodes] == [MIG_OF_GPUS_1_AND_0] * 2
    # Listed by UUID, an instance is kept too.
    nodes = _polaris(tmp_path, {"CUDA_VISIBLE_DEVICES": MIG_OF_GPUS_1_AND_0[2]}, gpu_list_dir=str(records))
    assert [list(n.gpu_ids) for n in nodes] == [MIG_OF_GPUS_1_AND_0[2:3]] * 2


def test_perlmutter_shared_qos_jobs_get_only_the_allocations_gpus() -> None:
    nodes = PerlmutterGPUPlatform().discover_nodes({**SLURM, "CUDA_VISIBLE_DEVICES": "0,1"})
    assert [list(n.gpu_ids) for n in nodes] == [["0", "1"]] * 2
    nm = NodeManager(nodes)
    packed = [nm.assign(i, Demand(gpus_per_rank=1, threads_per_rank=8, node_packing_count=4)).gpu_ids[0][0]
              for i in range(4)]
    assert sorted(packed) == ["0", "0", "1", "1"]  # two per node, none outside the allocation
    with pytest.raises(UnsatisfiableJob, match="2 GPUs"):
        nm.check_satisfiable(Demand(num_nodes=2, ranks_per_node=4, gpus_per_rank=1))


@pytest.mark.parametrize(("visible", "expected"), [
    ("2", ["2"]), (" 3 , 1 ", ["1", "3"]), ("", []), ("-1", []), ("NoDevFiles", []),
    ("GPU-3a1b7c9d-0000-1111-2222-333344445555", ["0", "1", "2", "3"]),  # a form it cannot match: all, warned
])
def test_values_of_the_variable(visible: str, expected: list[str], caplog) -> None:
    with caplog.at_level(logging.INFO, logger="balsam.platform"):
        nodes = PerlmutterGPUPlatform().discover_nodes({**SLURM, "CUDA_VISIBLE_DEVICES": visible})
    assert [list(n.gpu_ids) for n in nodes] == [expected] * 2
    assert len([r for r in caplog.records if "CUDA_VISIBLE_DEVICES" in r.getMessage()]) == 1
    if visible.startswith("GPU-"):
        assert caplog.records[-1].levelno == logging.WARNING and "names none of the nodes' GPU ids" in caplog.text


def test_cpu_nodes_and_tiles(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="balsam.platform"):
        assert PerlmutterCPUPlatform().discover_nodes({**SLURM, "CUDA_VISIBLE_DEVICES": "0"})[0].gpu_ids == ()
    assert "CUDA_VISIBLE_DEVICES" not in caplog.text  # no GPUs to narrow: nothing said
    # The helper cuts a node's device groups (tiles) and near-CPU map down to what it keeps.
    node = NodeInfo("0", "h", range(8), ["0.0", "0.1", "1.0", "1.1"], gpu_groups=[["0.0", "0.1"], ["1.0", "1.1"]],
                    gpu_cpus={"0.0": [0, 1], "0.1": [0, 1], "1.0": [4, 5], "1.1": [4, 5]})
    [kept] = cuda_visible_only([node], {"CUDA_VISIBLE_DEVICES": "0.1,1.0,1.1"})
    assert kept.gpu_ids == ("0.1", "1.0", "1.1") and kept.gpu_groups == (("0.1",), ("1.0", "1.1"))
    assert [g for g, _ in kept.gpu_cpus] == ["0.1", "1.0", "1.1"]


@pytest.mark.slow
@pytest.mark.mpi
def test_jobs_on_a_faked_perlmutter_shared_allocation(balsam_env, fake_machine, tmp_path: Path) -> None:
    """Through the real launcher (mpi mode): the launcher inherits CUDA_VISIBLE_DEVICES=0,1."""
    machine = fake_machine([])
    site = site_for(tmp_path, "perlmutter-gpu")
    env = machine.env(**SLURM, CUDA_VISIBLE_DEVICES="0,1")
    done = run_jobs(site, "mpi", env, lambda App: [
        App.submit(workdir=f"gpu/{n}", n=n, gpus_per_rank=1, threads_per_rank=8, node_packing_count=4, save=False)
        for n in range(6)] + [
        App.submit(workdir="mn", n="mn", num_nodes=2, ranks_per_node=4, gpus_per_rank=1, save=False)],
        states=frozenset({"RUN_DONE", "FAILED"}))
    seen = {job_out(site, f"gpu/{n}").split("CUDA_VISIBLE_DEVICES=")[1].split()[0] for n in range(6)}
    assert seen == {"0", "1"}
    assert str(done["mn"].state) == "FAILED"  # 4 one-GPU ranks per node, 2 GPUs: refused, not run on 2
    srun_lines = machine.records("srun")
    assert len(srun_lines) == 6 and all(r["env"]["CUDA_VISIBLE_DEVICES"] in ("0", "1") for r in srun_lines)
    # The narrowing is logged while the nodes are discovered, before the log file is opened: it
    # must still reach the launcher's log (docs/platforms/perlmutter.md says it is there).
    (log_file,) = (site[1] / "log").glob("mpi_mode_*.log")
    assert "CUDA_VISIBLE_DEVICES=0,1 in the launcher's environment" in log_file.read_text()


@pytest.mark.slow
@pytest.mark.mpi
def test_a_multi_node_job_on_a_faked_polaris_with_mig(balsam_env, fake_machine, tmp_path: Path) -> None:
    """A 2-node job of 4 one-GPU ranks per node on MIG nodes owns whole nodes and gets no list (its
    ranks pick their node's instance as docs/platforms/polaris.md shows); a one-node job whose 4
    ranks share a list of instances gets one warning line in the launcher's log."""
    machine = fake_machine(POLARIS_HOSTS)
    records = tmp_path / "gpulists"
    records.mkdir()
    for host in POLARIS_HOSTS:
        (records / f"balsam-{host.split('.')[0]}-gpulist.txt").write_text(MIG_LIST)
    site = site_for(tmp_path, "polaris", platform_options={"gpu_list_dir": str(records), "discover_mig": False})
    env = machine.env(PBS_NODEFILE=str(machine.node_file), PBS_JOBID="1.polaris-pbs-01")
    done = run_jobs(site, "mpi", env, lambda App: [
        App.submit(workdir="mn", n="mn", num_nodes=2, ranks_per_node=4, gpus_per_rank=1, save=False),
        App.submit(workdir="r4", n="r4", ranks_per_node=4, gpus_per_rank=1, threads_per_rank=8, save=False)],
        command_template='echo "job {{ n }} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"')
    assert all(str(j.state) == "RUN_DONE" for j in done.values())
    mig_ids = parse_nvidia_smi_list(MIG_LIST).mig_ids(["3", "2", "1", "0"])
    lines = job_out(site, "mn").split()
    assert lines.count("CUDA_VISIBLE_DEVICES=unset") == 8
    assert f"CUDA_VISIBLE_DEVICES={','.join(mig_ids[:4])}" in job_out(site, "r4")
    (log_file,) = (site[1] / "log").glob("mpi_mode_*.log")
    warned = [line for line in log_file.read_text().splitlines() if "ranks per node get one" in line]
    assert len(warned) == 1 and "WARNING" in warned[0]
    assert f"job {done['r4'].id}: its 4 ranks per node get one CUDA_VISIBLE_DEVICES of 4 ids" in warned[0]

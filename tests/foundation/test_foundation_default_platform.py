"""The built-in `default` platform: nodes, CPU/GPU ids, scheduler ids and MPI command lines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from balsam.builtin import default_platform
from balsam.builtin.default_platform import DefaultPlatform, expand_hostlist
from balsam.platform import LaunchSpec


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("nid[0008-0010,0012]", ["nid0008", "nid0009", "nid0010", "nid0012"]),
        ("a[1-2],b7,c[09-10]", ["a1", "a2", "b7", "c09", "c10"]),
        ("rack[1-2]-n[3-4]", ["rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"]),
    ],
)
def test_slurm_host_lists(text, hosts):
    assert expand_hostlist(text) == hosts


def test_nodes_from_the_allocation_environment(tmp_path):
    platform = DefaultPlatform()
    nodes = platform.discover_nodes({"SLURM_JOB_NODELIST": "node[1-2]"})
    assert [n.hostname for n in nodes] == ["node1", "node2"]
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x1\nx1\nx2\n\n")
    assert [n.hostname for n in platform.discover_nodes({"PBS_NODEFILE": str(nodefile)})] == ["x1", "x2"]
    assert [n.hostname for n in platform.discover_nodes({"COBALT_NODEFILE": str(nodefile)})] == ["x1", "x2"]
    local = platform.discover_nodes({})
    assert [n.hostname for n in local] == [socket.gethostname()]


def test_cpu_ids_from_psutil_and_gpus_from_cuda_visible_devices():
    node = DefaultPlatform().discover_nodes({"CUDA_VISIBLE_DEVICES": "0,2"})[0]
    assert list(node.cpu_ids) == sorted(psutil.Process().cpu_affinity())
    assert node.gpu_ids == ("0", "2")
    assert DefaultPlatform().discover_nodes({"CUDA_VISIBLE_DEVICES": ""})[0].gpu_ids == ()


def test_gpus_from_nvidia_smi_when_present(tmp_path, monkeypatch):
    # No GPU here: a fake nvidia-smi on PATH prints what `nvidia-smi -L` prints on a 2-GPU node.
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-3b4c1f2e-0000-0000-0000-000000000000)'\n"
        "echo 'GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-3b4c1f2e-0000-0000-0000-000000000001)'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    node = DefaultPlatform().discover_nodes({})[0]
    assert node.gpu_ids == ("0", "1")
    assert DefaultPlatform().gpu_environment(["1"]) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"BALSAM_LOCAL_JOB_ID": "4"}, 4),
        ({"SLURM_JOB_ID": "123456"}, 123456),
        ({"PBS_JOBID": "8812.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"}, 8812),
        ({"COBALT_JOBID": "77"}, 77),
        ({}, None),
    ],
)
def test_scheduler_id(env, expected):
    assert DefaultPlatform().scheduler_id(env) == expected


def spec(**kw):
    values = dict(cmdline="./app --x 1", hostnames=["h1", "h2"], ranks_per_node=4)
    values.update(kw)
    return LaunchSpec(**values)


def test_mpich_command_line():
    platform = DefaultPlatform(mpi_flavor="mpich", mpiexec="mpiexec")
    assert platform.mpi_launch_args(spec(launch_params={"bind-to": "core"})) == [
        "mpiexec", "-n", "8", "-ppn", "4", "--hosts", "h1,h2", "--bind-to", "core",
    ]
    assert platform.mpi_command_line(spec()) == "mpiexec -n 8 -ppn 4 --hosts h1,h2 ./app --x 1"


def test_open_mpi_command_line_from_launch_param():
    platform = DefaultPlatform(mpiexec="mpiexec")
    args = platform.mpi_launch_args(spec(launch_params={"mpi_flavor": "openmpi", "-x": "OMP_NUM_THREADS"}))
    assert args == ["mpiexec", "-n", "8", "--npernode", "4", "--host", "h1:4,h2:4", "-x", "OMP_NUM_THREADS"]


def test_open_mpi_forwards_the_jobs_variables_with_x():
    """Open MPI's mpiexec does not pass the job's environment to remote ranks: each variable the
    launcher set for the job goes as ``-x NAME`` (LaunchSpec.env_names; Balsam 0.7's OpenMPIRun).
    MPICH's hydra passes the whole environment: no such arguments there."""
    platform = DefaultPlatform(mpi_flavor="openmpi", mpiexec="mpiexec")
    job = spec(env_names=["CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MY_SETTING"])
    assert platform.mpi_command_line(job) == (
        "mpiexec -n 8 --npernode 4 --host h1:4,h2:4 -x CUDA_VISIBLE_DEVICES -x OMP_NUM_THREADS -x MY_SETTING ./app --x 1")
    # a name the launch params forward already is not repeated
    args = platform.mpi_launch_args(spec(env_names=["OMP_NUM_THREADS", "A"], launch_params={"-x": "OMP_NUM_THREADS"}))
    assert args == ["mpiexec", "-n", "8", "--npernode", "4", "--host", "h1:4,h2:4", "-x", "A", "-x", "OMP_NUM_THREADS"]
    assert "-x" not in DefaultPlatform(mpi_flavor="mpich", mpiexec="mpiexec").mpi_launch_args(job)


def test_flavour_is_detected_from_mpiexec_version(tmp_path, monkeypatch):
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\necho 'mpiexec (OpenRTE) 4.1.2'\necho 'Report bugs to http://www.open-mpi.org/community/help/'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(default_platform, "_flavor_cache", {})
    platform = DefaultPlatform(mpiexec=str(fake))
    assert platform.mpi_flavor(spec()) == "openmpi"
    real = DefaultPlatform(mpiexec=str(Path(sys.executable).parent / "mpiexec"))
    assert real.mpi_flavor(spec()) == "mpich"
    with pytest.raises(ValueError, match="unknown MPI flavour 'lam'"):
        platform.mpi_flavor(spec(launch_params={"mpi_flavor": "lam"}))


def test_mpiexec_is_found_once_per_path_and_looked_for_again_until_found(tmp_path, monkeypatch):
    first, second, empty = tmp_path / "a", tmp_path / "b", tmp_path / "empty"
    for folder in (first, second, empty):
        folder.mkdir()
    for folder in (first, second):
        (folder / "mpiexec").write_text("#!/bin/sh\n")
        (folder / "mpiexec").chmod(0o755)
    monkeypatch.setattr(default_platform, "_mpiexec_found", {})
    monkeypatch.setattr(default_platform.sys, "executable", str(empty / "python"))
    monkeypatch.setenv("PATH", str(first))
    assert DefaultPlatform().mpiexec() == str(first / "mpiexec")
    (first / "mpiexec").unlink()  # found once for this PATH: not looked up again
    assert DefaultPlatform().mpiexec() == str(first / "mpiexec")
    monkeypatch.setenv("PATH", str(second))  # another PATH: looked up on it
    assert DefaultPlatform().mpiexec() == str(second / "mpiexec")
    monkeypatch.setenv("PATH", str(empty))  # none there: the bare name, and looked for again
    assert DefaultPlatform().mpiexec() == "mpiexec"
    (empty / "mpiexec").write_text("#!/bin/sh\n")
    (empty / "mpiexec").chmod(0o755)
    assert DefaultPlatform().mpiexec() == str(empty / "mpiexec")


@pytest.mark.mpi
def test_the_mpich_line_really_runs_mpi4py(tmp_path):
    program = tmp_path / "hello.py"
    # Each rank writes its own file (stdout lines of two ranks may interleave).
    program.write_text(
        "import sys\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
        "open(f'{sys.argv[1]}/rank{c.Get_rank()}', 'w').write(f'{c.Get_rank()} {c.Get_size()}')\n"
    )
    platform = DefaultPlatform()
    host = socket.gethostname()
    line = platform.mpi_command_line(LaunchSpec(cmdline=f"{sys.executable} {program} {tmp_path}", hostnames=[host], ranks_per_node=2))
    out = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(p.read_text() for p in tmp_path.glob("rank*")) == ["0 2", "1 2"]


def test_driver_attributes():
    assert DefaultPlatform.name == "default"
    assert DefaultPlatform.default_scheduler == "local"
    assert DefaultPlatform().settings_defaults() == {"launcher": {"platform": "default"}, "scheduler": {"name": "local"}}

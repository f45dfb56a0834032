"""What ``nvidia-smi -L`` says when it finds no GPU reaches the log, and the default platform binds
the ranks of mpi-mode jobs to the CPUs the launcher assigned them (checked with real MPICH ranks).

The ``nvidia-smi`` stand-ins print what the real one prints: ``No devices were found`` on stdout
with exit 6 on a node without GPUs, the driver's failure message (exit 9) when the driver does not
answer. Before: exit 6 was logged as ``nvidia-smi -L exited 6: `` (only stderr was logged, and the
message is on stdout), and an empty or garbled answer with exit 0 gave 0 GPUs without a word.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import balsam.platform
from balsam.builtin.default_platform import DefaultPlatform
from balsam.platform import LaunchSpec, nvidia_smi_list

RECORDED = Path(__file__).parent / "recorded"
DRIVER_FAILED = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                 "Make sure that the latest NVIDIA driver is installed and running.")


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``fake_nvidia_smi(body)``: an ``nvidia-smi`` running the bash ``body``, alone on PATH."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(balsam.platform, "_nvidia_smi_warned", set(), raising=False)  # "once" counts from each test

    def make(body: str) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        program = bin_dir / "nvidia-smi"
        program.write_text(f"#!/bin/bash\n{body}\n")
        program.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")

    return make


def smi_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "nvidia-smi" in r.getMessage()]


@pytest.mark.parametrize("body,expected", [
    ('echo "No devices were found"; exit 6', "nvidia-smi -L exited 6: No devices were found"),
    (f'echo "{DRIVER_FAILED}"; exit 9', f"nvidia-smi -L exited 9: {DRIVER_FAILED}"),
    (f'echo "{DRIVER_FAILED}" >&2; exit 9', f"nvidia-smi -L exited 9: {DRIVER_FAILED}"),
], ids=["no-devices-stdout", "driver-stdout", "driver-stderr"])
def test_a_failing_nvidia_smi_is_logged_with_its_message(body, expected, fake_nvidia_smi, caplog) -> None:
    fake_nvidia_smi(body)
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        [node] = DefaultPlatform().discover_nodes({"SLURM_JOB_NODELIST": "gpu5"})
    assert list(node.gpu_ids) == []
    assert smi_warnings(caplog) == [expected]
    assert balsam.platform.nvidia_smi_note() == expected.removeprefix("nvidia-smi -L ")


def test_a_long_message_is_cut_at_200_characters(fake_nvidia_smi, caplog) -> None:
    fake_nvidia_smi('printf "%0300d" 0; exit 9')
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        assert nvidia_smi_list() is None
    assert smi_warnings(caplog) == ["nvidia-smi -L exited 9: " + "0" * 200]


@pytest.mark.parametrize("body,shown", [
    ("exit 0", "''"),
    ('echo "Segmentation fault?? %%%"; echo "GPU X: junk"; exit 0', "'Segmentation fault?? %%%\\nGPU X: junk'"),
], ids=["empty", "garbled"])
def test_exit_0_without_a_gpu_line_is_warned_once(body, shown, fake_nvidia_smi, caplog) -> None:
    fake_nvidia_smi(body)
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        first = DefaultPlatform().discover_nodes({"SLURM_JOB_NODELIST": "gpu5"})
        DefaultPlatform().discover_nodes({"SLURM_JOB_NODELIST": "gpu5"})  # again: no second warning
    assert list(first[0].gpu_ids) == []
    assert smi_warnings(caplog) == [f"nvidia-smi -L exited 0 but listed no GPU (no 'GPU <n>:' line): {shown}"]
    assert balsam.platform.nvidia_smi_note().startswith("exited 0 but listed no GPU")


def test_a_good_listing_and_a_cpu_node_say_nothing(fake_nvidia_smi, caplog, monkeypatch) -> None:
    fake_nvidia_smi(f"cat {RECORDED / 'polaris-nvidia-smi-L.txt'}")
    with caplog.at_level(logging.WARNING, logger="balsam.platform"):
        [node] = DefaultPlatform().discover_nodes({"SLURM_JOB_NODELIST": "gpu5"})
        assert list(node.gpu_ids) == ["0", "1", "2", "3"]
        assert balsam.platform.nvidia_smi_note() == ""
        monkeypatch.setenv("PATH", "/nonexistent")  # a CPU node: no nvidia-smi at all
        assert nvidia_smi_list() is None
    assert smi_warnings(caplog) == []
    assert balsam.platform.nvidia_smi_note() == "not on PATH"


# -- the default platform binds mpi-mode ranks (MPICH's hydra: --bind-to user:...) ---------------------
def mpich() -> DefaultPlatform:
    return DefaultPlatform(mpi_flavor="mpich", mpiexec="mpiexec", bind_ranks=True)


@pytest.mark.parametrize("spec,expected", [
    (LaunchSpec(cmdline="./a", hostnames=["h"], ranks_per_node=2, cpu_ids=[(2, 3)]),
     "mpiexec -n 2 -ppn 2 --hosts h --bind-to user:2,3 ./a"),
    (LaunchSpec(cmdline="./a", hostnames=["h"], ranks_per_node=2, threads_per_rank=2, cpu_ids=[(4, 5, 0, 1)]),
     "mpiexec -n 2 -ppn 2 --hosts h --bind-to user:4+5,0+1 ./a"),
    # the job binds itself: its own option alone
    (LaunchSpec(cmdline="./a", hostnames=["h"], cpu_ids=[(1,)], launch_params={"bind-to": "core"}),
     "mpiexec -n 1 -ppn 1 --hosts h --bind-to core ./a"),
    # whole nodes (no CPUs assigned), and lines built without a placement: unchanged
    (LaunchSpec(cmdline="./a", hostnames=["h", "g"], ranks_per_node=2, cpu_ids=[(), ()]),
     "mpiexec -n 4 -ppn 2 --hosts h,g ./a"),
    (LaunchSpec(cmdline="./a", hostnames=["h"], ranks_per_node=2), "mpiexec -n 2 -ppn 2 --hosts h ./a"),
])
def test_mpich_line_binds_the_assigned_cpus(spec, expected) -> None:
    assert mpich().mpi_command_line(spec) == expected


def test_only_hydra_gets_the_binding(tmp_path, monkeypatch) -> None:
    """An mpiexec of the mpich flavour that is not hydra (Cray PALS here) has no ``--bind-to``: its
    lines stay as they were. MPICH's own mpiexec (hydra) is recognised by its ``--version``."""
    from balsam.builtin import default_platform

    monkeypatch.setattr(default_platform, "_hydra_cache", {}, raising=False)
    pals = tmp_path / "mpiexec"
    pals.write_text("#!/bin/sh\necho 'mpiexec version 1.2.12 (PALS)'\n")
    pals.chmod(0o755)
    spec = LaunchSpec(cmdline="./a", hostnames=["h"], ranks_per_node=2, cpu_ids=[(0, 1)])
    assert DefaultPlatform(mpi_flavor="mpich", mpiexec=str(pals)).mpi_launch_args(spec) == [
        str(pals), "-n", "2", "-ppn", "2", "--hosts", "h"]
    hydra = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    if hydra:
        assert DefaultPlatform(mpi_flavor="mpich", mpiexec=hydra).mpi_launch_args(spec)[-2:] == ["--bind-to", "user:0,1"]


def test_open_mpi_line_is_unchanged() -> None:
    spec = LaunchSpec(cmdline="./a", hostnames=["h"], ranks_per_node=2, cpu_ids=[(0, 1)])
    assert DefaultPlatform(mpi_flavor="openmpi", mpiexec="mpirun").mpi_launch_args(spec) == [
        "mpirun", "-n", "2", "--npernode", "2", "--host", "h:2"]


def test_real_mpich_ranks_run_on_the_assigned_cpus() -> None:
    """Two ranks given CPUs 1 and 0 (in that order) by the launcher: each rank's Cpus_allowed_list."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    if not (shutil.which("mpiexec") or (Path(sys.executable).parent / "mpiexec").exists()):
        pytest.skip("needs MPICH's mpiexec")
    platform = DefaultPlatform(mpi_flavor="mpich")
    cmd = "echo rank=$PMI_RANK $(grep Cpus_allowed_list /proc/self/status)"
    spec = LaunchSpec(cmdline=f"bash -c '{cmd}'", hostnames=[socket.gethostname()], ranks_per_node=2,
                      cpu_ids=[(cpus[1], cpus[0])])
    out = subprocess.run(platform.mpi_command_line(spec), shell=True, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    seen = dict(line.split(" ", 1) for line in out.stdout.split("\n") if line.startswith("rank="))
    assert seen == {"rank=0": f"Cpus_allowed_list: {cpus[1]}", "rank=1": f"Cpus_allowed_list: {cpus[0]}"}


@pytest.mark.slow
@pytest.mark.mpi
def test_packed_mpi_mode_jobs_run_on_their_own_cpus(balsam_env, tmp_path) -> None:
    """The real launcher, mpi mode, default platform, real MPICH: jobs packed two to the node each
    run on the CPU the launcher gave them (before: every rank could run on every CPU of the node)."""
    import uuid

    from balsam.api import ApplicationDefinition
    from launcher_harness import finish, make_site, start_launcher
    from launcher_helpers import make_runnable, wait_for_states

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    name = f"bind-{uuid.uuid4().hex[:6]}"
    path = make_site(tmp_path / name, name, {"idle_ttl_sec": 2})

    class Affinity(ApplicationDefinition):
        site = name
        command_template = "bash -c 'grep Cpus_allowed_list /proc/self/status; sleep 1'"

    Affinity.sync()
    ids = make_runnable(Affinity.submit(workdir=f"a{i}", node_packing_count=len(cpus), save=False) for i in range(4))
    proc = start_launcher(path, "mpi", 5)
    wait_for_states(ids, {"RUN_DONE"}, timeout=90)
    assert finish(proc, timeout=120) == 0, Path(proc.console_path).read_text()
    seen = {(path / "data" / f"a{i}" / "job.out").read_text().split(":", 1)[1].strip() for i in range(4)}
    assert seen <= {str(c) for c in cpus} and len(seen) > 1, seen  # one CPU each, not the whole node

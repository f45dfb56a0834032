"""Polaris, a multi-node allocation whose nodes are split into MIG instances (the recorded
``nvidia-smi -L`` of a 3g.20gb node): the launcher's own node is asked live, the others only
through records in ``gpu_list_dir``. With the default ``/var/tmp`` (each node's own disk) no other
node's record is there, and those nodes kept whole-GPU ids without a word: their jobs got the
index of a split GPU. The launcher now says so, once, naming the nodes and the option."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from balsam_platform_polaris import PolarisPlatform
from machine_jobs import run_jobs, site_for

RECORDED = Path(__file__).parent / "recorded"
OTHERS = ["x3004c0s7b1n0.hsn.cm.polaris.alcf.anl.gov", "x3004c0s13b0n0.hsn.cm.polaris.alcf.anl.gov"]


def _discover(tmp_path: Path, monkeypatch, fake_machine, caplog, records: dict[str, str]) -> list:
    machine = fake_machine([socket.gethostname(), *OTHERS])
    machine.nvidia_smi("polaris-mig-3g.20gb-nvidia-smi-L.txt")  # this node: MIG on
    monkeypatch.setenv("PATH", machine.env()["PATH"])
    gpu_lists = tmp_path / "gpulists"
    gpu_lists.mkdir()
    for host, recorded in records.items():  # written after the node file: this allocation's
        (gpu_lists / f"balsam-{host.split('.')[0]}-gpulist.txt").write_text((RECORDED / recorded).read_text())
    platform = PolarisPlatform(options={"gpu_list_dir": str(gpu_lists)})
    with caplog.at_level(logging.WARNING, logger="balsam.platform.polaris"):
        return platform.discover_nodes({"PBS_NODEFILE": str(machine.node_file)})


def test_nodes_without_a_record_beside_a_mig_node_are_named(tmp_path: Path, monkeypatch, fake_machine, caplog) -> None:
    nodes = _discover(tmp_path, monkeypatch, fake_machine, caplog, {OTHERS[0]: "polaris-mig-3g.20gb-nvidia-smi-L.txt"})
    assert len(nodes[0].gpu_ids) == len(nodes[1].gpu_ids) == 8  # MIG instances: live here, recorded there
    assert list(nodes[2].gpu_ids) == ["3", "2", "1", "0"]  # no record: its layout is not known
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "no nvidia-smi -L of 1 other nodes (x3004c0s13b0n0.hsn.cm.polaris.alcf.anl.gov)" in warnings[0]
    assert f"gpu_list_dir {tmp_path / 'gpulists'}" in warnings[0] and "whole GPUs 3,2,1,0" in warnings[0]


def test_nodes_recorded_without_mig_are_not_warned_about(tmp_path: Path, monkeypatch, fake_machine, caplog) -> None:
    # Every node's layout is known (one recorded with MIG off): nothing to say.
    nodes = _discover(tmp_path, monkeypatch, fake_machine, caplog,
                      {OTHERS[0]: "polaris-mig-3g.20gb-nvidia-smi-L.txt", OTHERS[1]: "polaris-nvidia-smi-L.txt"})
    assert list(nodes[2].gpu_ids) == ["3", "2", "1", "0"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.slow
@pytest.mark.mpi
def test_the_launchers_log_names_them(balsam_env, fake_machine, tmp_path: Path) -> None:
    """Through the real launcher (mpi mode, recording PALS mpiexec, nvidia-smi printing the recorded
    MIG listing): the warning, logged while the nodes are discovered, is in the launcher's log."""
    machine = fake_machine([socket.gethostname(), OTHERS[0]])
    machine.nvidia_smi("polaris-mig-3g.20gb-nvidia-smi-L.txt")
    gpu_lists = tmp_path / "var-tmp"  # as /var/tmp on the launcher's node: no other node's list
    gpu_lists.mkdir()
    site = site_for(tmp_path, "polaris", platform_options={"gpu_list_dir": str(gpu_lists)})
    env = machine.env(PBS_NODEFILE=str(machine.node_file), PBS_JOBID="2.polaris-pbs-01")
    done = run_jobs(site, "mpi", env, lambda App: [App.submit(workdir="one", n=1, gpus_per_rank=1, save=False)])
    assert str(done["one"].state) == "RUN_DONE"
    (log_file,) = (site[1] / "log").glob("mpi_mode_*.log")
    warned = [line for line in log_file.read_text().splitlines() if "but no nvidia-smi -L of 1 other nodes" in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and OTHERS[0] in warned[0], log_file.read_text()[-2000:]

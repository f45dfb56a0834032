"""Launch params as options (short keys, empty values) on every launcher, and MIG instances on the
default platform (a stand-in ``nvidia-smi`` on PATH printing a recorded Polaris MIG listing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.platform import LaunchSpec, launch_param_args, parse_nvidia_smi_list
from balsam.plugins.manager import get_plugin_manager

RECORDED = Path(__file__).parent / "recorded"


def test_short_keys_take_one_dash_and_empty_values_are_flags() -> None:
    # {"c": "8"} gave "--c 8", an option no launcher has
    assert launch_param_args({"c": "8"}) == ["-c", "8"]
    assert launch_param_args({"cpu-bind": "cores", "l": ""}) == ["--cpu-bind", "cores", "-l"]
    assert launch_param_args({"--exclusive": "", "-x": "A"}) == ["--exclusive", "-x", "A"]
    assert launch_param_args({"e": "FOO=1", "cc": "none"}, prefix="-") == ["-e", "FOO=1", "-cc", "none"]  # aprun
    assert "" not in launch_param_args({"gpu-bind": "", "label": None})


@pytest.mark.parametrize("name,options", [("aurora", None), ("polaris", {"gpu_list_dir": "", "discover_mig": False}),
                                          ("thetagpu", {"gpu_list_dir": ""})])
def test_short_keys_on_the_machines(name, options, monkeypatch) -> None:
    monkeypatch.delenv("COBALT_NODEFILE", raising=False)
    platform = get_plugin_manager().load_driver("platform", name)(options=options)
    args = platform.mpi_launch_args(LaunchSpec(cmdline="app", hostnames=["h"], launch_params={"l": "", "x": "FOO"}))
    assert args[-3:] == ["-l", "-x", "FOO"] and "--l" not in args and "--x" not in args


def test_default_platform_short_keys() -> None:
    platform = DefaultPlatform(mpi_flavor="mpich", mpiexec="mpiexec")
    assert platform.mpi_launch_args(LaunchSpec(cmdline="a", hostnames=["h"], launch_params={"l": "", "genv": "A 1"})) == [
        "mpiexec", "-n", "1", "-ppn", "1", "--hosts", "h", "-l", "--genv", "A 1"]


def test_default_platform_hands_out_mig_instances(tmp_path: Path, monkeypatch) -> None:
    """The MIG lines of `nvidia-smi -L` were ignored: jobs got the split GPUs' indexes."""
    listing = RECORDED / "polaris-mig-3g.20gb-nvidia-smi-L.txt"
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 2\ncat {listing}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    [node] = DefaultPlatform().discover_nodes({"SLURM_JOB_NODELIST": "gpu5"})
    expected = parse_nvidia_smi_list(listing.read_text()).mig_ids()
    assert len(expected) == 8 and list(node.gpu_ids) == expected and all(g.startswith("MIG-") for g in node.gpu_ids)
    assert DefaultPlatform().gpu_environment([expected[2]])["CUDA_VISIBLE_DEVICES"] == expected[2]

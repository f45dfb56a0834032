"""What ``nvidia-smi -L`` says when it finds no GPU reaches the log.

The ``nvidia-smi`` stand-ins print what the real one prints: ``No devices were found`` on stdout
with exit 6 on a node without GPUs, the driver's failure message (exit 9) when the driver does not
answer. Before: exit 6 was logged as ``nvidia-smi -L exited 6: `` (only stderr was logged, and the
message is on stdout), and an empty or garbled answer with exit 0 gave 0 GPUs without a word.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import balsam.platform
from balsam.builtin.default_platform import DefaultPlatform
from balsam.platform import nvidia_smi_list

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

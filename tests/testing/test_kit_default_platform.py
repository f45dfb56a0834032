"""The built-in default platform runs balsam.testing's PlatformContract, as platform plugins do."""

from __future__ import annotations

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.platform import LaunchSpec
from balsam.testing import PlatformContract
from balsam.testing.platform_contract import SERIAL_WORKER_CMDLINE


class TestDefaultPlatformOnPBS(PlatformContract):
    platform_class = DefaultPlatform
    allocation_env = {"PBS_NODEFILE": "{nodefile}", "PBS_JOBID": "1196243.polaris-pbs-01", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    # PBS repeats a host once per chunk/cpu: discovery keeps each host once, in order
    nodefile_text = "x3004c0s1b0n0\nx3004c0s1b0n0\nx3004c0s7b1n0\n"
    expected_hostnames = ["x3004c0s1b0n0", "x3004c0s7b1n0"]
    expected_gpu_ids = ["0", "1", "2", "3"]
    expected_scheduler_id = 1196243
    gpu_visibility = [(["1", "3"], {"CUDA_VISIBLE_DEVICES": "1,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})]
    launch_lines = [
        (LaunchSpec(cmdline="./app --x 1", hostnames=["h1", "h2"], ranks_per_node=4),
         "mpiexec -n 8 -ppn 4 --hosts h1,h2 ./app --x 1"),
        (LaunchSpec(cmdline="./app", hostnames=["h1"], ranks_per_node=2, launch_params={"bind-to": "core"}),
         "mpiexec -n 2 -ppn 2 --hosts h1 --bind-to core ./app"),
    ]
    serial_worker_line = f"mpiexec -n 2 -ppn 1 --hosts x3004c0s1b0n0,x3004c0s7b1n0 {SERIAL_WORKER_CMDLINE}"

    @pytest.fixture
    def platform(self):
        # a fixed mpiexec and flavour: the lines must not depend on this host's MPI
        return DefaultPlatform(mpi_flavor="mpich", mpiexec="mpiexec")


class TestDefaultPlatformOnSlurm(TestDefaultPlatformOnPBS):
    allocation_env = {"SLURM_JOB_NODELIST": "nid[001-002,010]", "SLURM_JOB_ID": "6", "CUDA_VISIBLE_DEVICES": ""}
    nodefile_text = None
    expected_hostnames = ["nid001", "nid002", "nid010"]
    expected_gpu_ids = []
    expected_scheduler_id = 6
    serial_worker_line = None  # checked loosely: every host named


class TestDefaultPlatformWithNvidiaSmi(TestDefaultPlatformOnSlurm):
    """GPUs found by running nvidia-smi (a fake on PATH printing recorded output)."""

    allocation_env = {"SLURM_JOB_NODELIST": "gpu5", "SLURM_JOB_ID": "6"}
    expected_hostnames = ["gpu5"]
    fake_programs = {"nvidia-smi": "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-3a1b)\n"
                                   "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-77c2)\n"}
    expected_gpu_ids = ["0", "1"]

    @pytest.fixture(autouse=True)
    def _no_inherited_gpus(self, monkeypatch):
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

"""Aurora and Sunspot run balsam.testing's PlatformContract (the conformance kit every platform runs)."""

from __future__ import annotations

import pytest

from balsam.platform import LaunchSpec
from balsam.testing import PlatformContract
from balsam.testing.platform_contract import SERIAL_WORKER_CMDLINE
from balsam_platform_aurora import AuroraPlatform, SunspotPlatform

TILES = ["0.0", "0.1", "1.0", "1.1", "2.0", "2.1", "3.0", "3.1", "4.0", "4.1", "5.0", "5.1"]
HOSTS = ["x4102c5s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", "x4102c5s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov"]


@pytest.fixture(autouse=True)
def _no_hierarchy_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default device_hierarchy (inherit) reads the launcher's environment: FLAT when unset.
    monkeypatch.delenv("ZE_FLAT_DEVICE_HIERARCHY", raising=False)


class TestAurora(PlatformContract):
    platform_class = AuroraPlatform
    allocation_env = {"PBS_NODEFILE": "{nodefile}", "PBS_JOBID": "1234567.aurora-pbs-0001.hostmgmt.cm.aurora.alcf.anl.gov"}
    # PBS lists a host once per chunk; discovery keeps each once, in order
    nodefile_text = f"{HOSTS[0]}\n{HOSTS[0]}\n{HOSTS[1]}\n"
    expected_hostnames = HOSTS
    expected_cpu_count = 102  # cores 0 and 52 are left to the system
    expected_gpu_ids = TILES
    expected_scheduler_id = 1234567
    # FLAT (Level Zero's default): tiles are devices 0 ... 11, and the mode is set with the mask
    gpu_visibility = [(["0.0", "0.1"], {"ZE_AFFINITY_MASK": "0,1", "ZE_FLAT_DEVICE_HIERARCHY": "FLAT",
                                        "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1"}),
                      (["3.1", "5.0"], {"ZE_AFFINITY_MASK": "7,10", "ZE_FLAT_DEVICE_HIERARCHY": "FLAT"})]
    launch_lines = [
        # the guide's HelloAffinity: 12 ranks, one per tile, on one node (cores 1-12 assigned)
        (LaunchSpec(cmdline="./hello_affinity", hostnames=HOSTS[:1], ranks_per_node=12, gpus_per_rank=1,
                    cpu_ids=[list(range(1, 13))], gpu_ids=[TILES]),
         f"mpiexec -n 12 --ppn 12 --hosts {HOSTS[0]} --cpu-bind list:1:2:3:4:5:6:7:8:9:10:11:12 -d 1 --envall ./hello_affinity"),
        # 0.7's AuroraRun with a cpu_bind launch param
        (LaunchSpec(cmdline="./app", hostnames=HOSTS, ranks_per_node=4, threads_per_rank=8,
                    launch_params={"cpu_bind": "depth"}),
         f"mpiexec -n 8 --ppn 4 --hosts {','.join(HOSTS)} --cpu-bind depth -d 8 --envall ./app"),
    ]
    serial_worker_line = (f"mpiexec -n 2 --ppn 1 --hosts {','.join(HOSTS)} --cpu-bind list:1-51,53-103 -d 1 --envall "
                          f"{SERIAL_WORKER_CMDLINE}")
    # cpu_affinity: none (the settings default): unbound, so tasks may be pinned to hyperthreads too
    unbound_serial_worker_line = (f"mpiexec -n 2 --ppn 1 --hosts {','.join(HOSTS)} --cpu-bind none -d 1 --envall "
                                  f"{SERIAL_WORKER_CMDLINE}")
    # a threads_per_core=2 task: its cores and their second hardware threads (core + 104)
    task_cpu_cases = [((10, 11), 2, (10, 11, 114, 115)), ((10, 11), 1, (10, 11)), ((3,), 4, (3, 107))]


class TestSunspot(TestAurora):
    platform_class = SunspotPlatform
    platform_options = {"cpu_ids": "0-103", "cpu_bind": "none", "device_hierarchy": "composite"}
    expected_cpu_count = 104  # a cpu_ids that gives every core still works
    # COMPOSITE (as set in the options): the mask takes GPU.tile ids
    gpu_visibility = [(["0.0", "0.1"], {"ZE_AFFINITY_MASK": "0.0,0.1", "ZE_FLAT_DEVICE_HIERARCHY": "COMPOSITE"})]
    allocation_env = {"PBS_NODEFILE": "{nodefile}", "PBS_JOBID": "1234567.amn-0001"}
    launch_lines = [
        (LaunchSpec(cmdline="./app", hostnames=HOSTS[:1], ranks_per_node=2),
         f"mpiexec -n 2 --ppn 2 --hosts {HOSTS[0]} --cpu-bind none -d 1 --envall ./app"),
    ]
    serial_worker_line = (f"mpiexec -n 2 --ppn 1 --hosts {','.join(HOSTS)} --cpu-bind none -d 1 --envall "
                          f"{SERIAL_WORKER_CMDLINE}")

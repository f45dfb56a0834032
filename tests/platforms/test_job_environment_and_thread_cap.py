"""What a job is started with on the GPU machines, beyond its placement (pure: the drivers, the
NodeManager, runner.launch_environment and app_run.shell_line run under a real bash):

- Aurora's option ``device_hierarchy`` (flat/composite/combined) reaches every job, multi-node and
  CPU-only ones too (they get no ``ZE_AFFINITY_MASK``), as docs/platforms/aurora.md says.
- The variables the platform set for a job's GPU visibility survive its shell preamble: a
  ``module load`` or ``export ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE`` there ran before ``mpiexec
  --envall`` (or the serial task) and made mask ``1`` mean the whole GPU 1 (packed jobs shared
  GPUs); the same for ``CUDA_VISIBLE_DEVICES`` on Polaris and Perlmutter.
- ``threads_per_core`` above the cores' hardware threads (the API takes any positive value) is
  capped at them in the core count, the MPI binding and the serial pinning alike, with a warning
  naming the cap, once per app and value (not per job: ~10^4 lines on a campaign): uncapped,
  Aurora's binding named CPUs 209-210 and 313-314 of a 208-CPU node.
- An app's own GPU visibility variable, or a launch param that sets one for the MPI launcher, is
  named in a warning instead of being replaced (or winning) silently.
"""

from __future__ import annotations

import logging
import os
import subprocess
import types
from pathlib import Path
from typing import Any, Sequence

import pytest

from balsam.launcher.app_run import PreparedJob, shell_line
from balsam.launcher.node_manager import Demand, NodeManager
import balsam.util
from balsam.launcher.runner import launch_environment
from balsam.platform import LaunchSpec, NodeInfo, Platform, parse_id_ranges
from balsam_platform_aurora import AuroraPlatform
from balsam_platform_perlmutter import PerlmutterGPUPlatform
from balsam_platform_polaris import PolarisPlatform

AURORA_HOSTS = ("x4102c5s0b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov", "x4102c5s1b0n0.hostmgmt2102.cm.aurora.alcf.anl.gov")
#: What the job prints: the GPU visibility it really runs with.
SHOW = 'echo "MASK=${ZE_AFFINITY_MASK-unset} H=${ZE_FLAT_DEVICE_HIERARCHY-unset} CVD=${CUDA_VISIBLE_DEVICES-unset}"'


class NoHook:
    def get_hookimpls(self) -> list:
        return []


@pytest.fixture(autouse=True)
def _launcher_in_flat(monkeypatch: pytest.MonkeyPatch) -> None:
    # `module load frameworks` before the launcher (the Balsam-on-Aurora guide's step).
    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "FLAT")
    monkeypatch.delenv("ZE_AFFINITY_MASK", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Any:
    # The launcher's warnings are given once per app and value in a process: each test starts anew.
    given = balsam.util._warned
    given.clear()
    yield
    given.clear()


def manager(platform: Platform, nodes: Sequence[NodeInfo]) -> NodeManager:
    """The node manager as both modes build it: the platform's cpu_ids_are_cores and its cap."""
    return NodeManager(nodes, cpu_ids_are_cores=platform.cpu_ids_are_cores,
                       hardware_threads_per_core=platform.hardware_threads_per_core)


def aurora_nodes(tmp_path: Path, platform: AuroraPlatform, n: int = 2) -> list[NodeInfo]:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"{h}\n" for h in AURORA_HOSTS[:n]))
    return platform.discover_nodes({"PBS_NODEFILE": str(nodefile)})


def polaris(tmp_path: Path) -> tuple[PolarisPlatform, list[NodeInfo]]:
    nodefile = tmp_path / "polaris-nodes"
    nodefile.write_text("x3001c0s1b0n0\n")
    platform = PolarisPlatform(options={"gpu_list_dir": "", "discover_mig": False})
    return platform, platform.discover_nodes({"PBS_NODEFILE": str(nodefile)})


def perlmutter() -> tuple[PerlmutterGPUPlatform, list[NodeInfo]]:
    platform = PerlmutterGPUPlatform()
    return platform, platform.discover_nodes({"SLURM_JOB_NODELIST": "nid001000"})


def prepared(tmp_path: Path, demand: Demand, *, preamble: str = "", cmdline: str = SHOW, job_id: int = 1,
             own: dict[str, str] | None = None, launch_params: dict[str, str] | None = None,
             app_id: int | None = None) -> PreparedJob:
    """A job as JobPreparer makes it: the launcher's environment plus the app's own variables."""
    workdir = tmp_path / f"job{job_id}"
    workdir.mkdir(exist_ok=True)
    env = {**os.environ, **(own or {}), "BALSAM_JOB_ID": str(job_id)}
    job = None if app_id is None else types.SimpleNamespace(id=job_id, app_id=app_id)
    return PreparedJob(job=job, id=job_id, workdir=workdir, cmdline=cmdline, env=env, preamble=preamble,
                       demand=demand, launch_params=launch_params or {})


def run_job(job: PreparedJob, env: dict[str, str]) -> str:
    """The job's shell line, run as both modes run it (bash -c, in the job's environment)."""
    line = shell_line(job.cmdline, job.preamble, job.workdir)
    out = subprocess.run(["/bin/bash", "-c", line], env=env, cwd=job.workdir, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# -- D1: device_hierarchy is set for every job ---------------------------------------------------------


@pytest.mark.parametrize("option, expected", [("composite", "COMPOSITE"), ("combined", "COMBINED"), ("flat", "FLAT")])
def test_the_hierarchy_option_reaches_multi_node_and_cpu_only_jobs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str, expected: str) -> None:
    # The launcher runs in another mode than the option names: the option must win for every job.
    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "COMPOSITE" if option == "flat" else "FLAT")
    platform = AuroraPlatform(options={"device_hierarchy": option})
    nm = manager(platform, aurora_nodes(tmp_path, platform))
    two_nodes = Demand(num_nodes=2, ranks_per_node=12, gpus_per_rank=1)
    placement = nm.assign(1, two_nodes)
    assert placement.gpu_ids == ((), ())  # whole nodes: no mask
    env = launch_environment(prepared(tmp_path, two_nodes), placement, platform, NoHook())
    assert env["ZE_FLAT_DEVICE_HIERARCHY"] == expected and "ZE_AFFINITY_MASK" not in env
    nm.free(1)
    cpu_only = Demand(node_packing_count=12)
    env = launch_environment(prepared(tmp_path, cpu_only, job_id=2), nm.assign(2, cpu_only), platform, NoHook())
    assert env["ZE_FLAT_DEVICE_HIERARCHY"] == expected and "ZE_AFFINITY_MASK" not in env
    # a tile job: the hierarchy with its mask, as before
    tile = Demand(gpus_per_rank=1, node_packing_count=12)
    env = launch_environment(prepared(tmp_path, tile, job_id=3), nm.assign(3, tile), platform, NoHook())
    assert env["ZE_FLAT_DEVICE_HIERARCHY"] == expected and env["ZE_AFFINITY_MASK"] == ("0.0" if expected == "COMPOSITE" else "0")


def test_inherit_leaves_jobs_without_tiles_in_the_launchers_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZE_FLAT_DEVICE_HIERARCHY", "COMPOSITE")
    platform = AuroraPlatform()  # device_hierarchy: inherit
    assert platform.job_environment([]) == {}
    nm = manager(platform, aurora_nodes(tmp_path, platform))
    two_nodes = Demand(num_nodes=2)
    env = launch_environment(prepared(tmp_path, two_nodes), nm.assign(1, two_nodes), platform, NoHook())
    assert env["ZE_FLAT_DEVICE_HIERARCHY"] == "COMPOSITE"  # the launcher's, inherited


def test_other_platforms_set_nothing_for_jobs_without_gpus(tmp_path: Path) -> None:
    """The base class's job_environment is gpu_environment of the job's ids, nothing without."""
    platform, _ = polaris(tmp_path)
    assert platform.job_environment([]) == {}
    assert platform.job_environment(["3"]) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "3"}
    assert perlmutter()[0].job_environment([]) == {}


# -- D2: the platform's variables survive the job's shell preamble ------------------------------------


PREAMBLES = {
    "export one-liner": "export ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE ZE_AFFINITY_MASK=0,1 CUDA_VISIBLE_DEVICES=0,1,2,3",
    "module-style multi-line": ("\nexport ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE\nunset ZE_AFFINITY_MASK\n"
                                "export CUDA_VISIBLE_DEVICES=0,1,2,3\n"),
    "set -u list": ["set -u", "export ZE_FLAT_DEVICE_HIERARCHY=COMPOSITE CUDA_VISIBLE_DEVICES="],
}


def _preamble(value: Any) -> str:
    return " && ".join(value) if isinstance(value, list) else value  # as JobPreparer joins a list


@pytest.mark.parametrize("name", list(PREAMBLES))
def test_aurora_tile_jobs_keep_the_mask_and_hierarchy_balsam_set(tmp_path: Path, name: str) -> None:
    platform = AuroraPlatform()
    nm = manager(platform, aurora_nodes(tmp_path, platform, 1))
    tile = Demand(gpus_per_rank=1, node_packing_count=12)
    seen = []
    for job_id in (1, 2):
        job = prepared(tmp_path, tile, preamble=_preamble(PREAMBLES[name]), job_id=job_id,
                       cmdline='echo "MASK=${ZE_AFFINITY_MASK-unset} H=$ZE_FLAT_DEVICE_HIERARCHY"')
        seen.append(run_job(job, launch_environment(job, nm.assign(job_id, tile), platform, NoHook())))
    # Tiles 0.0 and 0.1 in FLAT numbering: with the preamble's COMPOSITE, mask 1 was the whole GPU 1.
    assert seen == ["MASK=0 H=FLAT", "MASK=1 H=FLAT"]


def test_aurora_multi_node_jobs_keep_the_option_hierarchy(tmp_path: Path) -> None:
    platform = AuroraPlatform(options={"device_hierarchy": "flat"})
    nm = manager(platform, aurora_nodes(tmp_path, platform))
    two_nodes = Demand(num_nodes=2, ranks_per_node=12, gpus_per_rank=1)
    job = prepared(tmp_path, two_nodes, preamble=_preamble(PREAMBLES["export one-liner"]))
    env = launch_environment(job, nm.assign(1, two_nodes), platform, NoHook())
    assert run_job(job, env) == "MASK=0,1 H=FLAT CVD=0,1,2,3"  # the preamble's own mask stays: no mask was set


@pytest.mark.parametrize("name", list(PREAMBLES))
def test_cuda_visible_devices_survives_the_preamble_on_polaris_and_perlmutter(tmp_path: Path, name: str) -> None:
    for platform, nodes in (polaris(tmp_path), perlmutter()):
        nm = manager(platform, nodes)
        gpu = Demand(gpus_per_rank=1, node_packing_count=4)
        job = prepared(tmp_path, gpu, preamble=_preamble(PREAMBLES[name]), cmdline='echo "CVD=$CUDA_VISIBLE_DEVICES"')
        placement = nm.assign(1, gpu)
        env = launch_environment(job, placement, platform, NoHook())
        assert run_job(job, env) == f"CVD={placement.gpu_ids[0][0]}", platform.name


def test_jobs_without_a_preamble_or_platform_variables_are_unchanged(tmp_path: Path) -> None:
    platform = AuroraPlatform()
    nm = manager(platform, aurora_nodes(tmp_path, platform, 1))
    tile = Demand(gpus_per_rank=1, node_packing_count=12)
    job = prepared(tmp_path, tile)
    env = launch_environment(job, nm.assign(1, tile), platform, NoHook())
    assert "BALSAM_PLATFORM_VARIABLES" not in env and shell_line(job.cmdline, "", job.workdir) == job.cmdline
    # a CPU-only job with a preamble: nothing to set again, the preamble's values stand
    cpu = Demand(node_packing_count=12)
    job = prepared(tmp_path, cpu, preamble="export ZE_AFFINITY_MASK=3", job_id=2)
    env = launch_environment(job, nm.assign(2, cpu), platform, NoHook())
    assert "BALSAM_PLATFORM_VARIABLES" not in env and run_job(job, env) == "MASK=3 H=FLAT CVD=unset"


def test_a_failing_preamble_still_skips_the_app(tmp_path: Path) -> None:
    platform = AuroraPlatform()
    nm = manager(platform, aurora_nodes(tmp_path, platform, 1))
    tile = Demand(gpus_per_rank=1, node_packing_count=12)
    job = prepared(tmp_path, tile, preamble="set -e; false; export X=1")
    env = launch_environment(job, nm.assign(1, tile), platform, NoHook())
    line = shell_line(job.cmdline, job.preamble, job.workdir)
    out = subprocess.run(["/bin/bash", "-c", line], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == ""


# -- D3: threads_per_core capped at the cores' hardware threads, the same in both modes ---------------


def _bind_cpus(bind: str) -> list[set[int]]:
    assert bind.startswith("list:"), bind
    return [set(parse_id_ranges(part)) for part in bind[len("list:"):].split(":")]


def _mpi_and_serial_cpus(platform: Platform, nodes: Sequence[NodeInfo], demand: Demand) -> tuple[set[int], set[int], Any]:
    """The CPUs mpi mode binds the job's ranks to and those serial mode pins the task to."""
    placement = NodeManager(nodes, cpu_ids_are_cores=platform.cpu_ids_are_cores,
                            hardware_threads_per_core=platform.hardware_threads_per_core).assign(1, demand)
    spec = LaunchSpec(cmdline="app", hostnames=placement.hostnames, ranks_per_node=demand.ranks_per_node,
                      threads_per_rank=demand.threads_per_rank, threads_per_core=demand.threads_per_core,
                      gpus_per_rank=demand.gpus_per_rank, cpu_ids=placement.cpu_ids, gpu_ids=placement.gpu_ids)
    bound = set().union(*_bind_cpus(platform.cpu_binding(spec)))  # type: ignore[attr-defined]
    pinned = set(platform.task_cpu_ids(placement.cpu_ids[0], demand.threads_per_core))
    return bound, pinned, placement


@pytest.mark.parametrize("threads_per_core", [3, 4])
def test_aurora_caps_threads_per_core_at_2_in_cores_binding_and_pinning(tmp_path: Path, threads_per_core: int) -> None:
    platform = AuroraPlatform()
    nodes = aurora_nodes(tmp_path, platform, 1)
    demand = Demand(threads_per_rank=8, threads_per_core=threads_per_core, gpus_per_rank=1, node_packing_count=12)
    bound, pinned, placement = _mpi_and_serial_cpus(platform, nodes, demand)
    # 8 threads at 2 per core: 4 cores and their second threads; uncapped, 2 cores and CPUs 209-314.
    assert placement.cpu_ids == ((1, 2, 3, 4),)
    assert bound == pinned == {1, 2, 3, 4, 105, 106, 107, 108}
    # two ranks of 6 threads, CPU only
    demand = Demand(ranks_per_node=2, threads_per_rank=6, threads_per_core=threads_per_core, node_packing_count=12)
    bound, pinned, placement = _mpi_and_serial_cpus(platform, nodes, demand)
    assert len(placement.cpu_ids[0]) == 6 and max(bound) < 208
    # a whole-node job of 4 ranks by 16 threads: no CPU the node does not have
    spec = LaunchSpec(cmdline="app", hostnames=AURORA_HOSTS, ranks_per_node=4, threads_per_rank=16, threads_per_core=4)
    ranks = _bind_cpus(platform.cpu_binding(spec))
    assert len(ranks) == 4 and max(max(r) for r in ranks) < 208


def test_polaris_and_perlmutter_get_the_same_cap_with_their_thread_counts(tmp_path: Path) -> None:
    platform, nodes = polaris(tmp_path)
    demand = Demand(threads_per_rank=8, threads_per_core=4, gpus_per_rank=1, node_packing_count=4)
    bound, pinned, placement = _mpi_and_serial_cpus(platform, nodes, demand)
    assert len(placement.cpu_ids[0]) == 4 and bound == pinned and max(bound) < 64  # 32 cores, 64 threads
    # Perlmutter binds with srun --cpus-per-task: 8 logical CPUs = the 4 cores the node manager counted
    platform, nodes = perlmutter()
    placement = NodeManager(nodes, cpu_ids_are_cores=True,
                            hardware_threads_per_core=platform.hardware_threads_per_core).assign(1, demand)
    assert len(placement.cpu_ids[0]) == 4
    spec = LaunchSpec(cmdline="app", hostnames=placement.hostnames, threads_per_rank=8, threads_per_core=4,
                      gpus_per_rank=1, cpu_ids=placement.cpu_ids, gpu_ids=placement.gpu_ids)
    args = platform.mpi_launch_args(spec)
    # A packed step is given the node's CPUs (--overlap steps would all be bound to the first cores)
    # and bound to its own by mask; the job's 8 are what its program sees (test_perlmutter_packed_cpus_recorded).
    assert "SLURM_CPUS_PER_TASK=8" in args and platform.cpus_per_task(spec) == 8
    pinned = set(platform.task_cpu_ids(placement.cpu_ids[0], 4))
    assert len(pinned) == 8 and max(pinned) < 128


def test_the_core_count_without_a_known_cap_is_unchanged() -> None:
    demand = Demand(threads_per_rank=8, threads_per_core=4)
    assert demand.cpu_ids_per_node(True) == 2 and demand.cpu_ids_per_node(True, 2) == 4
    assert demand.cpu_ids_per_node(False, 2) == 8  # ids that are hardware threads: one per thread
    node = NodeInfo(node_id="n", hostname="n", cpu_ids=range(8))
    assert NodeManager([node]).assign(1, demand).cpu_ids == ((0, 1),)


def test_one_warning_per_app_names_the_cap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    platform = AuroraPlatform()
    nm = manager(platform, aurora_nodes(tmp_path, platform, 1))
    demand = Demand(threads_per_rank=8, threads_per_core=4, node_packing_count=12)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.runner"):
        launch_environment(prepared(tmp_path, demand, job_id=7), nm.assign(7, demand), platform, NoHook())
        ok = Demand(threads_per_rank=8, threads_per_core=2, node_packing_count=12)
        launch_environment(prepared(tmp_path, ok, job_id=8), nm.assign(8, ok), platform, NoHook())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["job 7: threads_per_core=4 is more than the 2 hardware threads of a core on this machine: "
                        "it is placed, bound and pinned at threads_per_core=2 (4 cores per node); the same for every "
                        "job of its app with threads_per_core=4 (warned once)"]


def test_the_cap_is_warned_once_for_many_jobs_of_one_app(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """~10^4 jobs of one app at threads_per_core=4 were ~10^4 WARNING lines: one per app and value."""
    platform = AuroraPlatform()
    nm = NodeManager(aurora_nodes(tmp_path, platform, 1), cpu_ids_are_cores=True)  # (the warning is the platform's)
    over = Demand(threads_per_rank=2, threads_per_core=4, node_packing_count=12)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.runner"):
        for job_id in range(1, 201):
            job = prepared(tmp_path, over, job_id=job_id, app_id=3)
            launch_environment(job, nm.assign(job_id, over), platform, NoHook())
            nm.free(job_id)
        # another app, and another value of the same app: one more each
        for job_id, app_id, per_core in ((201, 4, 4), (202, 4, 4), (203, 3, 3), (204, 3, 3)):
            other = Demand(threads_per_rank=2, threads_per_core=per_core, node_packing_count=12)
            job = prepared(tmp_path, other, job_id=job_id, app_id=app_id)
            launch_environment(job, nm.assign(job_id, other), platform, NoHook())
            nm.free(job_id)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warnings] == ["job 1", "job 201", "job 203"], warnings
    assert warnings[0].endswith("the same for every job of app 3 with threads_per_core=4 (warned once)")


def test_the_replaced_variable_and_launch_param_warnings_come_once_per_app(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    platform = AuroraPlatform()
    nm = NodeManager(aurora_nodes(tmp_path, platform, 1), cpu_ids_are_cores=True)
    tile = Demand(gpus_per_rank=1, node_packing_count=12)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.runner"):
        for job_id in range(1, 51):
            job = prepared(tmp_path, tile, own={"ZE_AFFINITY_MASK": "7"}, launch_params={"env": "ZE_AFFINITY_MASK=0"},
                           job_id=job_id, app_id=3)
            launch_environment(job, nm.assign(job_id, tile), platform, NoHook())
            nm.free(job_id)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(w.startswith("job 1: ") for w in warnings), warnings
    assert "the same in every job of app 3 that sets that value (warned once)" in warnings[0]
    assert "the same for every job of app 3 with that launch param (warned once)" in warnings[1]


def test_the_set_of_given_warnings_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balsam.util, "_WARNED_MOST", 4)
    for key in range(10):
        assert balsam.util.first_warning((key,)) and not balsam.util.first_warning((key,))
        assert len(balsam.util._warned) <= 4


# -- the app's own GPU variables, and launch params that set them --------------------------------------


def test_an_apps_own_mask_is_replaced_with_a_warning_naming_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    platform = AuroraPlatform()
    nm = manager(platform, aurora_nodes(tmp_path, platform, 1))
    tile = Demand(gpus_per_rank=1, node_packing_count=12)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.runner"):
        job = prepared(tmp_path, tile, own={"ZE_AFFINITY_MASK": "7"}, job_id=5)
        env = launch_environment(job, nm.assign(5, tile), platform, NoHook())
        # the launcher's own ZE_FLAT_DEVICE_HIERARCHY=FLAT is not the app's: no warning for it
        job = prepared(tmp_path, tile, job_id=6)
        launch_environment(job, nm.assign(6, tile), platform, NoHook())
    assert env["ZE_AFFINITY_MASK"] == "0"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["job 5: its app's ZE_AFFINITY_MASK=7 is replaced by the platform's GPU visibility "
                        "variables: ZE_AFFINITY_MASK=0; the same in every job of its app that sets that value "
                        "(warned once)"]


def test_a_launch_param_that_sets_the_mask_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    platform = AuroraPlatform()
    nm = manager(platform, aurora_nodes(tmp_path, platform, 1))
    tile = Demand(gpus_per_rank=1, node_packing_count=12)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.runner"):
        job = prepared(tmp_path, tile, launch_params={"env": "ZE_AFFINITY_MASK=0"}, job_id=9)
        launch_environment(job, nm.assign(9, tile), platform, NoHook())
        job = prepared(tmp_path, tile, launch_params={"env": "MY_ZE_AFFINITY_MASK=0"}, job_id=10)
        launch_environment(job, nm.assign(10, tile), platform, NoHook())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["job 9: launch_params env='ZE_AFFINITY_MASK=0' sets ZE_AFFINITY_MASK for the MPI launcher, "
                        "over the value the platform set for the GPUs this job was given: its ranks may use GPUs "
                        "assigned to other jobs; the same for every job of its app with that launch param "
                        "(warned once)"]


def test_a_one_letter_depth_param_replaces_the_depth_instead_of_repeating_it() -> None:
    """``{"d": "8"}`` is ``-d 8`` (launch_option): it was passed on after Balsam's ``-d 1``."""
    spec = LaunchSpec(cmdline="app", hostnames=AURORA_HOSTS[:1], launch_params={"d": "8"})
    args = AuroraPlatform().mpi_launch_args(spec)
    assert args.count("-d") == 1 and args[args.index("-d") + 1] == "8"

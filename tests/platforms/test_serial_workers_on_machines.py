"""Serial mode on each machine: how its workers are started with the settings default
``serial_mode_startup_params: {cpu_affinity: none}`` ("workers unbound"), and the CPUs a task with
``threads_per_core > 1`` is pinned to (the master's own node and a worker's)."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.config.schema import LauncherSettings
from balsam.launcher.app_run import PreparedJob
from balsam.launcher.modes.serial import SerialMode
from balsam.launcher.modes.serial_worker import Master
from balsam.launcher.node_manager import Demand, NodeManager
from balsam.platform import NodeInfo
from balsam.plugins.manager import get_plugin_manager

WORKER = "-m balsam.launcher.modes.serial_worker /site/serial.json"


def _worker_line(platform, nodes, params) -> str:
    ctx = types.SimpleNamespace(nodes=nodes, platform=platform,
                                setting=lambda name: params if name == "serial_mode_startup_params" else None)
    mode = SerialMode.__new__(SerialMode)
    mode.context = ctx
    return mode.command("/site/serial.json")


def _two_nodes(platform) -> list[NodeInfo]:
    return [NodeInfo(h, h, platform.cpu_ids, getattr(platform, "gpu_ids", ())) for h in ("nid03824", "nid03825")]


# platform, options, what the default {cpu_affinity: none} must put on the line (and what it must not)
CASES = [
    # aprun binds with -cc depth unless told: the worker (and every task it pins) got one core
    ("theta-knl", None, "-cc none", "-cc depth"),
    # srun binds a task to --cpus-per-task (1 CPU by default): the worker gets every logical CPU
    ("perlmutter-gpu", None, "--cpus-per-task 128", "--cpus-per-task 2 "),
    ("perlmutter-cpu", None, "--cpus-per-task 256", "--cpus-per-task 2 "),
    # PALS: the computed list:<every core> leaves out the hyperthreads tasks are pinned to
    ("aurora", None, "--cpu-bind none", "list:"),
    ("polaris", {"gpu_list_dir": "", "discover_mig": False}, "--cpu-bind none", "list:"),
    # Open MPI line with --bind-to none already: nothing added
    ("thetagpu", {"gpu_list_dir": ""}, "--bind-to none -n 2", "cpu_affinity"),
]


@pytest.mark.parametrize("name,options,wanted,unwanted", CASES, ids=[c[0] for c in CASES])
def test_the_default_unbound_workers_are_started_unbound(name, options, wanted, unwanted, monkeypatch) -> None:
    monkeypatch.delenv("COBALT_NODEFILE", raising=False)  # ThetaGPU's -hostfile comes from the environment
    platform = get_plugin_manager().load_driver("platform", name)(options=options)
    default = LauncherSettings().serial_mode_startup_params
    assert default == {"cpu_affinity": "none"}
    line = _worker_line(platform, _two_nodes(platform), default)
    assert wanted in line and unwanted not in line and line.endswith(WORKER)
    # a site's own params are kept as they are (site init writes these)
    site_params = platform.settings_defaults()["launcher"]["serial_mode_startup_params"]
    assert "cpu_affinity" not in _worker_line(platform, _two_nodes(platform), site_params)


def test_a_users_param_wins_over_the_platforms_unbound_one() -> None:
    platform = get_plugin_manager().load_driver("platform", "perlmutter-gpu")()
    line = _worker_line(platform, _two_nodes(platform), {"cpu_affinity": "none", "cpus-per-task": "64"})
    assert "--cpus-per-task 64" in line and "128" not in line


@pytest.mark.parametrize("platform_name, given, mine", [
    ("perlmutter-gpu", {"--cpus-per-task": "64"}, "--cpus-per-task 64"),
    ("polaris", {"--cpu-bind": "depth"}, "--cpu-bind depth"),
    ("polaris", {"cpu_bind": "depth"}, "--cpu-bind depth"),
    ("theta-knl", {"-cc": "depth"}, "-cc depth"),
])
def test_a_users_param_wins_however_it_is_spelled(platform_name, given, mine) -> None:
    # The platforms read the first spelling of an option in their own order: the translation's
    # `cpu-bind: none` beside the user's `--cpu-bind: depth` used to win.
    platform = get_plugin_manager().load_driver("platform", platform_name)()
    line = _worker_line(platform, _two_nodes(platform), {"cpu_affinity": "none", **given})
    assert mine in line and " none" not in line and "128" not in line, line


def test_a_platform_without_the_hook_gets_cpu_affinity_left_out() -> None:
    class Unknowing(DefaultPlatform):
        def unbound_serial_worker_params(self):
            return None

    platform = Unknowing(mpi_flavor="openmpi", mpiexec="mpiexec")
    nodes = [NodeInfo("a", "a", [0]), NodeInfo("b", "b", [0])]
    line = _worker_line(platform, nodes, {"cpu_affinity": "none"})
    assert "cpu_affinity" not in line and "bind-to" not in line
    # the default platform itself: Open MPI binds ranks unless told, MPICH's hydra does not
    assert "--bind-to none" in _worker_line(DefaultPlatform(mpi_flavor="openmpi", mpiexec="mpiexec"), nodes,
                                            {"cpu_affinity": "none"})
    assert "bind" not in _worker_line(DefaultPlatform(mpi_flavor="mpich", mpiexec="mpiexec"), nodes,
                                      {"cpu_affinity": "none"})


def _master(platform, nodes: int) -> tuple[Master, list, dict]:
    """A master without threads or MPI: what it hands its spawner (rank 0) or a worker (others)."""
    started: list = []
    master = Master.__new__(Master)
    master.rank_of_node = list(range(nodes))
    master.platform = platform
    master.launch_hook = lambda **kw: None
    master.pool = types.SimpleNamespace(start=lambda *args: started.append(args))
    master.handover = types.SimpleNamespace(started_local=lambda *args: None)
    master._note_running = lambda *args: None
    master.outbox = {}
    master.remote = {}
    master.base_env = dict(os.environ)
    return master, started, master.outbox


def test_serial_tasks_with_two_threads_per_core_get_the_sibling_hardware_threads(tmp_path: Path) -> None:
    """Serial tasks were pinned to their cores' first hardware threads only (a 2-thread task of
    threads_per_core=2 to CPU 0 alone) while mpi mode binds the same job to 0,32."""
    platform = get_plugin_manager().load_driver("platform", "polaris")(options={"gpu_list_dir": "", "discover_mig": False})
    nm = NodeManager([NodeInfo(h, h, platform.cpu_ids, platform.gpu_ids) for h in ("h0", "h1")])
    master, started, outbox = _master(platform, 2)
    demand = Demand(threads_per_rank=2, threads_per_core=2, node_packing_count=64)
    for job_id in range(1, 34):  # 32 on h0 (one core each), the 33rd on h1
        prepared = PreparedJob(job=None, id=job_id, workdir=tmp_path, cmdline="app", env={}, demand=demand)
        master._start(prepared, nm.assign(job_id, demand))
    assert started[0][4] == (0, 32) and started[0][3]["OMP_NUM_THREADS"] == "2"
    assert started[31][4] == (31, 63) and len(started) == 32
    # a worker's task (rank 1) is pinned the same way
    [task] = outbox[1]
    assert task["cpu_ids"] == [0, 32]
    # one thread per core: the assigned cores only
    one = Demand(threads_per_rank=2, node_packing_count=64)
    nm.free(1)
    nm.free(2)
    master._start(PreparedJob(job=None, id=99, workdir=tmp_path, cmdline="app", env={}, demand=one), nm.assign(99, one))
    assert started[-1][4] == (0, 1)

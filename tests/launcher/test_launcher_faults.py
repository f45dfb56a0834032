"""Faults of the launcher's own processes, against a live server and real MPICH.

- A serial-mode worker rank killed (kill -9, a node lost): hydra ends every rank, the master too.
  The launcher process ends the master's Session itself (its RUNNING jobs become RUN_TIMEOUT at
  once, not at the Session's expiry), says why in the BatchJob's ``status_info``, and no task is
  left running as an orphan (the ranks' spawners have sessions of their own: the rank's death spares
  them, they see end of file and end their tasks).
- The launcher's whole process group SIGKILLed: its spawner outlives it and ends its tasks.

The server of this module expires Sessions after :data:`EXPIRE_SEC` (not the folder's 4 s), so
that a job made RUN_TIMEOUT by the launcher is told apart from one the expiry sweep reached.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.config import SiteConfig
from balsam.launcher import spawner
from balsam.launcher.job_mode import LauncherContext
from balsam.launcher.modes.serial import SerialMode
from balsam.platform import NodeInfo
from launcher_harness import start_launcher
from launcher_helpers import make_runnable, wait_for_states, worker_rank_pid

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

#: Session expiry of this module's server: far beyond every wait below.
EXPIRE_SEC = 120
#: The tasks: long enough to outlive every wait below unless something ends them.
TASK_SEC = 90


@pytest.fixture(scope="session")
def _long_expiry_server(live_server_factory: Any) -> Any:
    return live_server_factory(env={"BALSAM_SESSION_EXPIRE_SEC": str(EXPIRE_SEC), "BALSAM_SESSION_SWEEP_SEC": "1"})


@pytest.fixture
def live_server(_long_expiry_server: Any, request: pytest.FixtureRequest) -> str:
    request.node._balsam_live_server = _long_expiry_server
    return _long_expiry_server.url


def _context(path: Path, nodes: list[NodeInfo], batch_job_id: Any) -> LauncherContext:
    site_config = SiteConfig(path)
    return LauncherContext(site_config=site_config, settings=site_config.settings, site_id=site_config.site_id,
                           data_path=site_config.data_path, log_path=site_config.log_path, platform=DefaultPlatform(),
                           nodes=nodes, wall_time_min=2, job_mode="serial", batch_job_id=batch_job_id)


def _sleeper(site_name: str) -> Any:
    from balsam.api import ApplicationDefinition

    class Sleeper(ApplicationDefinition):
        site = site_name
        # exec: the task's pid (written first) is the process that would be left running.
        command_template = f"bash -c 'echo $$ > task.pid; exec sleep {TASK_SEC}'"

    Sleeper.sync()
    return Sleeper


def _task_pids(path: Path, workdirs: list[str], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    files = [path / "data" / w / "task.pid" for w in workdirs]
    while True:
        try:
            return [int(f.read_text()) for f in files]
        except (FileNotFoundError, ValueError):
            assert time.monotonic() < deadline, f"tasks did not start: {[f.exists() for f in files]}"
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after ``timeout`` (none: all gone sooner)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_serial_worker_rank_ends_the_session_says_why_and_leaves_no_orphan(new_site: Any) -> None:
    from balsam.api import BatchJob

    name, path = new_site(idle_ttl_sec=60)
    app = _sleeper(name)
    workdirs = [f"s/{i}" for i in range(4)]
    ids = make_runnable(app.submit(workdir=w, node_packing_count=2, save=False) for w in workdirs)
    batch_job = BatchJob.objects.create(site_id=app.resolve_site_id(), project="local", queue="local", num_nodes=2,
                                        wall_time_min=2, job_mode="serial")
    # Two "nodes" on this host: rank 0 (the master) runs node 0's two tasks, rank 1 node 1's.
    nodes = [NodeInfo(str(i), socket.gethostname(), [0, 1]) for i in range(2)]
    mode = SerialMode(_context(path, nodes, batch_job.id))
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", mode.run()), daemon=True)
    thread.start()
    pids: list[int] = []
    try:
        wait_for_states(ids, {"RUNNING"}, timeout=60)
        pids = _task_pids(path, workdirs)
        victim = worker_rank_pid(path)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        # RUN_TIMEOUT by the launcher, long before the Session's expiry (EXPIRE_SEC) would do it.
        wait_for_states(ids, {"RUN_TIMEOUT"}, timeout=EXPIRE_SEC / 3)
        thread.join(30)
        assert result.get("rc") == 1
        error = BatchJob.objects.get(id=batch_job.id).status_info.get("error", "")
        assert "serial workers died (mpiexec exit" in error, error
        # The tasks of both ranks end (their spawners outlive the ranks and end them).
        assert _wait_gone(pids, spawner.ORPHAN_GRACE_SEC + 10) == []
    finally:
        _kill_leftovers(pids)


@pytest.mark.parametrize("job_mode", ["mpi", "serial"])
def test_a_sigkill_of_the_launchers_process_group_leaves_no_task_running(new_site: Any, job_mode: str) -> None:
    """The end of an allocation (or a user) kills the launcher's whole process group: its tasks
    (sessions of their own, mpi mode's mpiexec with its ranks) are not in that group and used to
    run on as orphans while their jobs were expired and run again elsewhere. The spawner, in a
    session of its own too, outlives the kill, sees end of file and ends them."""
    name, path = new_site(idle_ttl_sec=60)
    app = _sleeper(name)
    ids = make_runnable([app.submit(workdir="k", save=False)])
    proc = start_launcher(path, job_mode, 5)  # its own session: the test is not in its group
    pids: list[int] = []
    try:
        wait_for_states(ids, {"RUNNING"}, timeout=60)
        pids = _task_pids(path, ["k"])
        if job_mode == "mpi":  # the app's processes under mpiexec, not only mpiexec itself
            pids += [int(p) for p in Path(f"/proc/{pids[0]}/task/{pids[0]}/children").read_text().split()]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert _wait_gone(pids, spawner.ORPHAN_GRACE_SEC + 10) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_leftovers(pids)


def test_mpi_mode_takes_a_node_that_is_down_out_and_requeues_the_jobs_that_failed_there(new_site: Any) -> None:
    """A node of the list that cannot be reached: every launch there fails at once (hydra: "ssh:
    Could not resolve hostname ... Launch proxy failed"), and, freed first, it soaked up most of a
    campaign's jobs as RUN_ERROR. Now it is taken out after NodeFaults' threshold; the jobs that
    failed there are re-queued (RUN_TIMEOUT), none is RUN_ERROR, and the BatchJob says which node."""
    import json

    from balsam.api import ApplicationDefinition, BatchJob

    name, path = new_site(idle_ttl_sec=2)

    class Hi(ApplicationDefinition):
        site = name
        command_template = "bash -c 'echo hi; sleep 0.5'"

    Hi.sync()
    ids = make_runnable(Hi.submit(workdir=f"w/{i}", save=False) for i in range(10))
    batch_job = BatchJob.objects.create(site_id=Hi.resolve_site_id(), project="local", queue="local", num_nodes=2,
                                        wall_time_min=2, job_mode="mpi")
    nodes = [{"node_id": "0", "hostname": socket.gethostname(), "cpu_ids": [0], "gpu_ids": []},
             {"node_id": "1", "hostname": "nid-down-001.invalid", "cpu_ids": [0], "gpu_ids": []}]
    proc = start_launcher(path, "mpi", 2, env={"BALSAM_LAUNCHER_NODELIST": json.dumps(nodes),
                                               "BALSAM_BATCH_JOB_ID": str(batch_job.id)})
    jobs = wait_for_states(ids, {"RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT"}, timeout=90)
    proc.wait(60)
    states = [str(j.state) for j in jobs.values()]
    assert "RUN_ERROR" not in states, states
    from balsam.launcher.node_manager import NodeFaults

    # The threshold's jobs, and those handed over behind them on that node before it was taken out.
    assert NodeFaults(2).threshold <= states.count("RUN_TIMEOUT") and states.count("RUN_DONE") >= 1, states
    assert "nid-down-001.invalid taken out" in BatchJob.objects.get(id=batch_job.id).status_info.get("nodes_out", "")

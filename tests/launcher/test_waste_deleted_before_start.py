"""A job deleted while a launcher holds it leased and not yet RUNNING: the 404 of its RUNNING update
says it is gone, and its run is ended at once. Real server, real launchers (serial and mpi mode).

Found by a DeepHyper-style search (benchmarks/deephyper_style_search.py): its early stop deletes
the jobs not yet running (``Job.objects.filter(...).delete()`` skips the RUNNING ones), among them
jobs the launcher had leased ahead. The launcher started them, logged ``ERROR ... server refused
update ... HTTP 404 Job not found`` for their RUNNING, ran them to their end (job 99 to RUN_DONE,
for nothing) and logged another ERROR for that: the heartbeat that tells a launcher which of its
jobs are gone comes once a minute (``BALSAM_LAUNCHER_TICK_SEC``, 60 s by default), and a short job
starts and ends between two heartbeats.

These tests run their own server, whose Sessions expire after 10 minutes (this folder's server
expires them after 4 s, which needs a heartbeat a second), so the launchers heartbeat once a
minute, as they do by default: the heartbeat cannot be what ends the run.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import alive, make_runnable, site_logs, wait_for, wait_for_states

#: Generous, and far below the doomed job's 300 s sleep and the 60 s heartbeat: the outcome is
#: waited for, never timed.
WAIT_SEC = 45
TICK_SEC = 60


@pytest.fixture(scope="module")
def _long_session_server(live_server_factory: Any) -> Any:
    return live_server_factory(env={"BALSAM_SESSION_EXPIRE_SEC": "600", "BALSAM_SESSION_SWEEP_SEC": "1"})


@pytest.fixture
def live_server(_long_session_server: Any, request: pytest.FixtureRequest) -> str:
    request.node._balsam_live_server = _long_session_server
    return _long_session_server.url


def pid_of(path: Path, workdir: str) -> int:
    pid_file = path / "data" / workdir / "pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), message=f"{workdir} never started")
    return int(pid_file.read_text())


@pytest.mark.parametrize("mode, nodes", [
    ("serial", 1),  # the master in the launcher process
    pytest.param("serial", 2, marks=pytest.mark.mpi),  # a master and a worker rank, each on a "node" of this host
    pytest.param("mpi", 1, marks=pytest.mark.mpi),
])
def test_a_job_deleted_while_leased_ahead_is_ended_at_its_refused_running(new_site, mode: str, nodes: int) -> None:
    from balsam.api import ApplicationDefinition, Job

    name, path = new_site(idle_ttl_sec=3)

    class Sleeper(ApplicationDefinition):
        site = name
        # The pid of the sleep itself (bash execs it), to see that the run really ended.
        command_template = "bash -c 'echo $$ > pid; exec sleep {{ seconds }}'"

    Sleeper.sync()
    # One job at a time per node: "doomed" is leased with the "first" ones (the first acquire takes
    # them all) and waits for a node while they run.
    *first, doomed = make_runnable([Sleeper.submit(workdir=w, seconds=s, node_packing_count=1, save=False)
                                    for w, s in [*((f"first/{i}", 4) for i in range(nodes)), ("doomed", 300)]])
    host = socket.gethostname()
    node_list = [{"node_id": str(i), "hostname": host, "cpu_ids": [0, 1], "gpu_ids": []} for i in range(nodes)]
    proc = start_launcher(path, mode, 3, tick_sec=TICK_SEC, env={"BALSAM_LAUNCHER_NODELIST": json.dumps(node_list)})
    try:
        wait_for_states(first, {"RUNNING"}, timeout=WAIT_SEC)
        assert not (path / "data" / "doomed" / "pid").exists()
        # The search's early stop: the jobs that do not run yet (the RUNNING ones are skipped).
        deleted = Job.objects.filter(id=[*first, doomed]).delete()
        assert deleted == 1, deleted
        pid = pid_of(path, "doomed")  # started: it was leased before the delete
        wait_for(lambda: not alive(pid), message=f"the deleted job's run (pid {pid}) goes on")
        wait_for_states(first, {"RUN_DONE"}, timeout=WAIT_SEC)
    finally:
        if proc.poll() is None:
            proc.terminate()
        finish(proc)
    text = site_logs(path)
    assert f"job {doomed} was deleted on the server (HTTP 404)" in text, text[-3000:]
    assert f"job {doomed} was deleted or moved by its user: its run was ended" in text, text[-3000:]
    assert "server refused update" not in text and "| ERROR |" not in text, text[-3000:]

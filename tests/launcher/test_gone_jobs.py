"""A job its user deletes (libEnsemble's ``BalsamTask.kill()``: ``job.delete()``) or moves while a
launcher runs it: the heartbeat tells the launcher, which ends the run, frees its resources for the
next job and sends no update for it (the server would refuse it). Real server, real launchers."""

from __future__ import annotations

import json
import signal
import socket
import uuid
from pathlib import Path

import pytest

from launcher_helpers import alive, events_of, make_runnable, wait_for, wait_for_states
from launcher_harness import finish, start_launcher

#: Generous: the outcome is waited for, never timed (the jobs sleep 60 s, far longer).
WAIT_SEC = 45


def sleeper_app(name: str):
    from balsam.api import ApplicationDefinition

    class Sleeper(ApplicationDefinition):
        site = name
        # The pid of the sleep itself (bash execs it), to see that the run really ended.
        command_template = "bash -c 'echo $$ > pid; exec sleep {{ seconds }}'"

    Sleeper.sync()
    return Sleeper


def pid_of(path: Path, workdir: str) -> int:
    pid_file = path / "data" / workdir / "pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), message=f"no pid in {pid_file}")
    return int(pid_file.read_text())


def logs(path: Path, pattern: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (path / "log").glob(pattern))


def test_a_lease_watching_its_jobs_hands_over_those_the_session_lost(balsam_env) -> None:
    """JobLease.watch against the server: the tick sends the held ids and hands ``gone`` to the
    callback; without watch the tick sends ``{}`` as Balsam 0.7 did and nothing is gone."""
    from balsam.api import App, Job, Site
    from balsam.client.default import get_default_client
    from balsam.client.lease import JobLease

    site = Site.objects.create(name=f"gone-{uuid.uuid4().hex[:8]}", path=f"/tmp/gone-{uuid.uuid4().hex[:8]}")
    app = App.objects.create(site_id=site.id, name="A", serialized_class="x", source_code="x")
    ids = make_runnable(Job(workdir=f"w/{i}", app_id=app.id) for i in range(3))
    lease = JobLease(get_default_client(), site.id, heartbeat_thread=False)
    try:
        held = [j["id"] for j in lease.acquire(3)]
        assert sorted(held) == sorted(ids)
        assert lease.tick() == []  # not watching: the 0.7 heartbeat
        got: list[list[int]] = []
        lease.watch(lambda: held, got.append)
        assert lease.tick() == [] and got == []
        Job.objects.get(id=held[0]).delete()
        Job.objects.filter(id=[held[1]]).update(state="FAILED")
        assert lease.tick() == sorted(held[:2]) and got == [sorted(held[:2])]
    finally:
        lease.close()


@pytest.mark.slow
@pytest.mark.mpi
def test_mpi_mode_ends_the_run_of_a_deleted_job_and_reuses_its_node(new_site) -> None:
    from balsam.api import Job

    name, path = new_site(idle_ttl_sec=3)
    Sleeper = sleeper_app(name)
    # One job per node (node_packing_count 1): the second runs only once the first's node is free.
    (doomed,) = make_runnable([Sleeper.submit(workdir="doomed", seconds=60, node_packing_count=1, save=False)])
    proc = start_launcher(path, "mpi", 2, tick_sec=0.5)
    try:
        wait_for_states([doomed], {"RUNNING"}, timeout=WAIT_SEC)
        pid = pid_of(path, "doomed")
        (after,) = make_runnable([Sleeper.submit(workdir="after", seconds=0, node_packing_count=1, save=False)])
        Job.objects.get(id=doomed).delete()  # what libEnsemble's BalsamTask.kill() does
        wait_for(lambda: not alive(pid), message=f"the deleted job's process {pid} still runs")
        wait_for_states([after], {"RUN_DONE"}, timeout=WAIT_SEC)
    finally:
        proc.send_signal(signal.SIGTERM)
        finish(proc)
    text = logs(path, "mpi_mode_*.log")
    assert f"job {doomed} was deleted or moved by its user: its run was ended" in text, text[-3000:]
    assert "server refused update" not in text and "giving up on" not in text, text[-3000:]
    assert [(e.from_state, e.to_state) for e in events_of([after])[after]][-2:] == [
        ("PREPROCESSED", "RUNNING"), ("RUNNING", "RUN_DONE")]


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("nodes", [1, 2])
def test_serial_mode_ends_runs_of_deleted_and_moved_jobs(new_site, nodes: int) -> None:
    """One node: the master in the launcher process. Two: the master (rank 0) and a worker rank
    (rank 1) on two "nodes" of this host, so one of the ended runs is on the worker's node."""
    from balsam.api import Job

    name, path = new_site(idle_ttl_sec=3)
    Sleeper = sleeper_app(name)
    # One task per node at a time (node_packing_count 1).
    doomed = make_runnable([Sleeper.submit(workdir=f"doomed/{i}", seconds=60, node_packing_count=1, save=False)
                            for i in range(2)])
    host = socket.gethostname()
    node_list = [{"node_id": str(i), "hostname": host, "cpu_ids": [0, 1], "gpu_ids": []} for i in range(nodes)]
    proc = start_launcher(path, "serial", 2, tick_sec=0.5, env={"BALSAM_LAUNCHER_NODELIST": json.dumps(node_list)})
    try:
        wait_for_states(doomed[:nodes], {"RUNNING"}, timeout=WAIT_SEC)
        pids = [pid_of(path, f"doomed/{i}") for i in range(nodes)]
        after = make_runnable([Sleeper.submit(workdir=f"after/{i}", seconds=0, node_packing_count=1, save=False)
                               for i in range(2)])
        Job.objects.get(id=doomed[0]).delete()
        # Moved by its user (gave up on it): the lease ends, the server refuses the launcher's updates.
        Job.objects.filter(id=[doomed[1]]).update(state="FAILED")
        wait_for(lambda: not any(alive(pid) for pid in pids), message=f"the runs {pids} still go on")
        wait_for_states(after, {"RUN_DONE"}, timeout=WAIT_SEC)
    finally:
        proc.send_signal(signal.SIGTERM)
        finish(proc)
    text = logs(path, "serial_mode_*")
    for job_id in doomed[:nodes]:
        assert f"job {job_id} was deleted or moved by its user: its run was ended" in text, text[-3000:]
    if nodes == 1:  # the second was leased ahead, never started
        assert f"job {doomed[1]} was deleted or moved by its user: dropped before it started" in text, text[-3000:]
    assert "server refused update" not in text and "giving up on" not in text, text[-3000:]
    assert str(Job.objects.get(id=doomed[1]).state) == "FAILED"
    assert [e.to_state for e in events_of([doomed[1]])[doomed[1]]][-1] == "FAILED"

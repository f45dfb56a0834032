"""End to end: a batch system ends the allocation while jobs run (scancel, a requeue, a node set
down, the time limit). Slurm signals every process of the job: here the jobs' processes get
SIGTERM first and die of it, and the launcher's whole process group (launcher, MPI launcher, serial
ranks) 1.5 s later, the delay a real-Slurm audit saw before the serial master's own stop. Every job
that was running must be RUN_TIMEOUT (the launcher's stop) and run again, never RUN_ERROR ->
FAILED. See the module docstring of balsam.launcher.modes.serial_worker ("Exits at a stop")."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from launcher_helpers import events_of, make_runnable, wait_for_states
from launcher_harness import finish, start_launcher

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

#: First run: writes its pid and runs until killed (``exec sleep``: the job's process itself dies
#: of the signal; ``command sleep``: a bash wrapper around its sleep); a re-run succeeds at once.
COMMANDS = ["exec", "command"]


@pytest.mark.parametrize("mode", ["serial", "mpi"])
def test_jobs_killed_by_the_allocations_sigterm_before_the_launchers_stop_are_timeouts_and_rerun(mode: str, new_site) -> None:
    from balsam.api import ApplicationDefinition, Job

    name, path = new_site(idle_ttl_sec=60)

    class Victim(ApplicationDefinition):
        site = name
        command_template = ("bash -c 'if [ -f ran ]; then echo second run; else touch ran; echo $$ > pid; "
                            "{{ how }} sleep 300; fi'")

    Victim.sync()
    ids = make_runnable([Victim.submit(workdir=f"v/{i}", how=how, node_packing_count=2, save=False) for i, how in enumerate(COMMANDS)])
    proc = start_launcher(path, mode, 2)
    pid_files = [path / "data" / "v" / str(i) / "pid" for i in range(len(COMMANDS))]
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text().strip() for p in pid_files):
        assert time.monotonic() < deadline and proc.poll() is None, Path(proc.console_path).read_text()[-3000:]
        time.sleep(0.05)
    wait_for_states(ids, {"RUNNING"}, timeout=30)
    # The batch system's SIGTERM reaches the jobs (each is its own process group)...
    for pid_file in pid_files:
        os.killpg(int(pid_file.read_text()), signal.SIGTERM)
    time.sleep(1.5)
    # ...and the launcher's process group a moment later.
    os.killpg(proc.pid, signal.SIGTERM)
    jobs = wait_for_states(ids, {"RUN_TIMEOUT", "RUN_ERROR", "FAILED", "RUN_DONE"}, timeout=60)
    assert finish(proc, 60) == 0
    history = events_of(ids)
    for job_id in ids:
        states = [e.to_state for e in history[job_id]]
        assert states[-2:] == ["RUNNING", "RUN_TIMEOUT"], (job_id, states, [e.data for e in history[job_id]])
        assert "launcher stopped" in history[job_id][-1].data["reason"]

    # What the processing module's default handle_timeout() does: re-queue; the re-run finishes.
    for job_id in ids:
        jobs[job_id].state = "RESTART_READY"
        jobs[job_id].save()
    second = start_launcher(path, mode, 1)
    wait_for_states(ids, {"RUN_DONE"}, timeout=60)
    second.send_signal(signal.SIGTERM)
    finish(second, 60)
    history = events_of(ids)
    for job_id in ids:
        states = [e.to_state for e in history[job_id]]
        assert states[-5:] == ["RUNNING", "RUN_TIMEOUT", "RESTART_READY", "RUNNING", "RUN_DONE"], (job_id, states)
        assert Job.objects.get(id=job_id).return_code == 0

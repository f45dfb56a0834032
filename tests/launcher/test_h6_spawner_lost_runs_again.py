"""A task whose spawner process dies is RUN_TIMEOUT (run again), not RUN_ERROR (failed).

The launcher never sees such a task's exit: the spawner that started it, and would have reaped it,
is gone. It was reported RUN_ERROR -1 "the spawner process exited unexpectedly", which the
processing module's default ``handle_error`` makes FAILED, though the task may have run on (its
spawner killed by a signal cannot end it) and succeeded: measured here, a ``sleep 6`` ran to its end
after the spawner's ``kill -9`` while its job was already RUN_ERROR. Every other run the launcher
loses (a serial worker rank, a node taken out, the launcher's own crash or session expiry) is
RUN_TIMEOUT: so is this one now, in both modes, with the reason.

A real launcher against a real server; the spawner processes are killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import events_of, make_runnable, wait_for_states

FINAL = {"RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT", "FAILED"}


def _spawners_of(launcher_pid: int) -> list[int]:
    """The launcher's spawner processes (its children running balsam/launcher/spawner.py)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and b"launcher/spawner.py" in cmdline:
            found.append(int(entry.name))
    return found


def _read_pids(paths: list[Path], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not all(p.exists() and p.read_text().strip() for p in paths):
        assert time.monotonic() < deadline, f"pid files not written: {paths}"
        time.sleep(0.05)
    return [int(p.read_text()) for p in paths]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_the_tasks_of_a_spawner_killed_outright_run_again(mode: str, new_site) -> None:
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Sleeper(ApplicationDefinition):
        site = name
        command_template = "bash -c 'echo $$ > task.pid; exec sleep 60'"

    Sleeper.sync()
    ids = make_runnable([Sleeper.submit(workdir=f"sleeper{i}", node_packing_count=4, save=False) for i in range(2)])
    proc = start_launcher(path, mode, 2)
    tasks: list[int] = []
    try:
        wait_for_states(ids, {"RUNNING"}, timeout=60)
        tasks = _read_pids([path / "data" / f"sleeper{i}" / "task.pid" for i in range(2)])
        spawners = _spawners_of(proc.pid)
        assert spawners, "the launcher runs no spawner process"
        _kill(spawners)
        jobs = wait_for_states(ids, FINAL, timeout=60)
    finally:
        _kill(tasks)
        assert finish(proc) == 0
    events = events_of(ids)
    for job_id in ids:
        last = events[job_id][-1]
        assert str(jobs[job_id].state) == "RUN_TIMEOUT", [(e.to_state, e.data) for e in events[job_id]]
        assert "the spawner process exited unexpectedly (status -9)" in last.data["reason"], last.data
        assert "the job runs again" in last.data["reason"], last.data

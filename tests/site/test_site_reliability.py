"""Site-side faults found by the reliability drills (issue 12); each test failed before its fix.

- ``balsam site stop`` during a hung scheduler command left that command orphaned;
- ``site stop`` trusted a pid file without the process's start time: a reused pid got SIGTERM;
- the processing module ran hooks in a workdir outside data/.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from site_test_utils import wait_for


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)


@pytest.mark.parametrize("with_start_time", [True, False])
def test_site_stop_never_signals_a_process_that_reused_the_agents_pid(tmp_path: Path, with_start_time: bool) -> None:
    from balsam.site.site_ops import stop_agent

    stranger = _sleeper()  # has the pid the dead agent had (as if the pid had been reused)
    try:
        started = psutil.Process(stranger.pid).create_time()
        lines = [socket.gethostname(), str(stranger.pid)]
        if with_start_time:
            lines.append(f"{started - 3600:.3f}")  # the agent started an hour before this process
        (tmp_path / "balsam-service.pid").write_text("\n".join(lines) + "\n")
        assert stop_agent(tmp_path, timeout=5) is None
        time.sleep(0.3)
        assert stranger.poll() is None, "a process that merely reused the agent's pid was signalled"
        assert not (tmp_path / "balsam-service.pid").exists()  # the stale file is cleaned up
    finally:
        stranger.kill()
        stranger.wait()


def test_the_pid_file_records_the_agents_start_time(tmp_path: Path) -> None:
    from balsam.site.agent import read_pid_record, remove_pid_file, write_pid_file

    write_pid_file(tmp_path)
    host, pid, start_time = read_pid_record(tmp_path)
    assert (host, pid) == (socket.gethostname(), os.getpid())
    assert start_time is not None and abs(start_time - psutil.Process().create_time()) < 0.5
    remove_pid_file(tmp_path)


def _hung_processes(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("force", [False, True])
def test_site_stop_ends_a_hung_scheduler_command(make_site: Any, agent_daemon: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, force: bool) -> None:
    """The scheduler's status command hangs (a wedged PBS server); ``site stop`` must not leave it behind,
    neither when the agent stops by itself nor when it has to be killed (--force)."""
    from balsam.site.site_ops import stop_agent

    marker = f"{random.randint(100000, 999999)}.25"  # a unique "sleep" duration tells our hung command apart
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qstat = bin_dir / "qstat"
    qstat.write_text(f"#!/bin/sh\nexec sleep {marker}\n")
    qstat.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # The agent's stop waits this long (not its default 15 s) for the hung cycle before it ends the
    # command: what is ended after the wait is the same.
    monkeypatch.setenv("BALSAM_AGENT_STOP_WAIT_SEC", "1")
    site = make_site(overrides={"scheduler": {"name": "pbs", "allowed_queues": {"debug": {"max_nodes": 1, "max_walltime": 60, "max_queued_jobs": 1}}}})
    agent_daemon(site)
    hung = wait_for(lambda: _hung_processes(marker), timeout=60, what="the scheduler command to start")
    assert len(hung) == 1
    if force:
        # The agent ignores SIGTERM (wedged), so only --force ends it: its hung child must go too.
        from balsam.site.agent import read_pid_file

        os.kill(read_pid_file(Path(site.site_path))[1], 19)  # SIGSTOP: it cannot react to SIGTERM
        stop_agent(Path(site.site_path), timeout=2, force=True)
    else:
        stop_agent(Path(site.site_path), timeout=45)
    wait_for(lambda: not _hung_processes(marker), timeout=15, what="the hung scheduler command to be ended")


def test_processing_refuses_a_workdir_outside_data() -> None:
    from balsam.site.modules.processing import ProcessingModule

    module = ProcessingModule.__new__(ProcessingModule)  # _dispatch checks the workdir before anything else
    jobs = [{"id": i, "state": "RUN_DONE", "app_id": 1, "workdir": w} for i, w in enumerate(["../../etc", "/abs", "."])]
    updates = module._dispatch(jobs, set())
    assert [(u["id"], u["state"]) for u in updates] == [(0, "FAILED"), (1, "FAILED"), (2, "FAILED")]
    assert all("workdir" in u["state_data"]["message"] for u in updates)

"""Ctrl-C at the terminal of a foreground site agent (``python -m balsam.site --log-to-stderr``) on
the local scheduler.

The terminal sends SIGINT to its whole foreground process group. The agent's own handler stops it
cleanly, but the local scheduler's queue command (``python -m balsam.builtin.local_queue status``)
ran in that group too: it died of the SIGINT and the agent logged ``WARNING scheduler status poll
failed: local scheduler could not list its jobs: KeyboardInterrupt``. The queue command now runs
with SIGINT blocked (still in the agent's process group, so that ``site stop --force`` ends a hung
one): it finishes, and the agent stops after it with one line saying why. The batch job it started
(its own session already) runs on, with no signal blocked, as a batch job outlives a Ctrl-C in the
login shell on a real cluster.

The agent is a real process in a process group of its own (as a terminal's foreground job), the
scheduler the real local one. The test holds the queue's file lock so that the status poll is
sure to be in flight when the SIGINT comes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from filelock import FileLock

from balsam.builtin.local_scheduler import LocalScheduler
from balsam.states import BatchJobState
from site_test_utils import batch_job, create_batch_job, wait_for


def _queue_status_child(agent: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in agent.children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if "balsam.builtin.local_queue" in cmdline and "status" in cmdline:
            found.append(child)
    return found


def _blocked_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk line for {pid}")


def test_ctrl_c_stops_the_agent_cleanly_and_leaves_the_batch_job_running(make_site, client, tmp_path, monkeypatch):
    state_dir = tmp_path / "local-queue"
    monkeypatch.setenv("BALSAM_LOCAL_SCHEDULER_DIR", str(state_dir))
    site = make_site()
    site_path = Path(site.site_path)
    # The batch job stands for a launcher running a job: a process that must outlive the Ctrl-C.
    Path(site.job_template_path).write_text("#!/bin/bash\nsleep 300\n")
    log_path = tmp_path / "agent-stderr.log"
    env = {**os.environ, "BALSAM_SITE_PATH": str(site_path)}
    with open(log_path, "wb") as log:
        # A group of its own, as the shell gives a foreground job: killpg(SIGINT) is the terminal's Ctrl-C.
        agent_proc = subprocess.Popen([sys.executable, "-m", "balsam.site", "--log-to-stderr"], cwd=site_path,
                                      env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
    scheduler = LocalScheduler(state_dir=state_dir)
    scheduler_id = None
    try:
        bj = create_batch_job(client, site.site_id)["id"]
        record = wait_for(lambda: (r := batch_job(client, bj))["state"] == "running" and r, what="the batch job running")
        scheduler_id = record["scheduler_id"]
        job_pid = json.loads((state_dir / "jobs.json").read_text())["jobs"][str(scheduler_id)]["pid"]
        assert psutil.pid_exists(job_pid)

        agent = psutil.Process(agent_proc.pid)
        lock = FileLock(str(state_dir / "jobs.json.lock"))
        with lock:
            polls = wait_for(lambda: _queue_status_child(agent), what="a status poll waiting for the queue's lock")
            os.killpg(agent_proc.pid, signal.SIGINT)
            wait_for(lambda: b"received SIGINT" in log_path.read_bytes(), what="the agent's word on the SIGINT")
            # The poll in flight was not interrupted: it waits for the lock still.
            assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in polls), log_path.read_text()
        assert agent_proc.wait(timeout=90) == 0, log_path.read_text()

        text = log_path.read_text()
        assert "status poll failed" not in text, text
        assert "KeyboardInterrupt" not in text, text
        assert text.count("received SIGINT: stopping") == 1, text
        # The batch job runs on, in a session and process group other than the agent's.
        job = psutil.Process(job_pid)
        assert job.is_running() and job.status() != psutil.STATUS_ZOMBIE
        assert os.getpgid(job_pid) != agent_proc.pid and os.getsid(job_pid) != agent_proc.pid
        # It starts as a real scheduler starts a job: the queue command's blocked SIGINT not inherited.
        assert _blocked_signals(job_pid) == 0, Path(f"/proc/{job_pid}/status").read_text()
        assert scheduler.get_statuses()[scheduler_id].state is BatchJobState.running
    finally:
        if agent_proc.poll() is None:
            agent_proc.kill()
            agent_proc.wait(10)
        if scheduler_id is not None:
            scheduler.delete_job(scheduler_id)


def test_a_keyboard_interrupt_in_a_drivers_command_is_not_made_a_scheduler_error(tmp_path):
    """The one guard around every driver call turns exceptions into SchedulerError (a failed poll,
    logged and retried) but lets a KeyboardInterrupt through: an agent without its signal handlers
    (a test, an embedding program) must stop, not log the interrupt as the scheduler's failure."""

    def interrupted(command):
        raise KeyboardInterrupt

    scheduler = LocalScheduler(interrupted, state_dir=tmp_path / "local-queue")
    with pytest.raises(KeyboardInterrupt):
        scheduler.get_statuses()

"""Ctrl-C (SIGINT) or a hangup (SIGHUP) at the terminal of a foreground site agent
(``python -m balsam.site --log-to-stderr``).

The terminal sends SIGINT to its whole foreground process group, and a shell whose terminal or ssh
session closes sends SIGHUP to its jobs' groups. The agent's own handler stops it cleanly, but the
scheduler commands it ran were in that group too: the local scheduler's queue command died of the
SIGINT (``WARNING scheduler status poll failed: local scheduler could not list its jobs:
KeyboardInterrupt``), and a ``#!/bin/sh`` site wrapper around qsub died between submitting and
printing the job's id (a job in the queue, the BatchJob submit_failed). Blocking SIGINT in the
commands did not hold: dash (/bin/sh on Debian and Ubuntu) clears its signal mask, and SIGHUP was
not blocked at all. Each command now leads a process group of its own (still in the agent's
session: ``site stop --force`` ends it, tests/site/test_site_reliability.py): no signal the
terminal or the shell sends reaches it. The batch job the local scheduler starts (its own session)
runs on, with no signal blocked, as a batch job outlives a Ctrl-C in the login shell on a real
cluster.

The agent is a real process in a process group of its own (as a terminal's foreground job), the
schedulers the real local one and the fake PBS of tests/fixtures behind a real ``#!/bin/sh``
wrapper. Each test holds the command (the queue's file lock, the wrapper's release file) so that
it is sure to be in flight when the signal comes.
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
from balsam.testing.fakebatch import fake_batch_env
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
        # It starts as a real scheduler starts a job: no signal blocked.
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


FAKE_PBS = Path(__file__).resolve().parents[1] / "fixtures" / "fake_pbs"
PBS_QUEUES = {"debug": {"max_nodes": 1, "max_walltime": 30, "max_queued_jobs": 5}}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
def test_a_signal_at_the_terminal_does_not_cut_a_submit_through_a_sh_wrapper(make_site, client, tmp_path, signum):
    """A site's ``#!/bin/sh`` wrapper in front of qsub (dash here, as on Debian and Ubuntu login
    nodes) has queued the job and not yet printed its id when Ctrl-C or a hangup reaches the agent's
    process group. The wrapper was in that group: it died, the agent read the dead qsub as a refusal
    and made the BatchJob submit_failed while its job was in the queue. Now the wrapper is out of
    the group: it prints the id, the agent records the job, then stops."""
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    started, release = tmp_path / "qsub-started", tmp_path / "qsub-release"
    # It submits, then waits for the test (at most 60 s) before printing the id: the signal comes meanwhile.
    (wrap / "qsub").write_text(
        f'#!/bin/sh\nout=$("{FAKE_PBS}/qsub" "$@") || exit $?\n: > "{started}"\n'
        f'i=0; while [ ! -e "{release}" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done\necho "$out"\n')
    (wrap / "qsub").chmod(0o755)
    env = {**os.environ, **fake_batch_env(FAKE_PBS, tmp_path / "server")}
    env["PATH"] = f"{wrap}{os.pathsep}{env['PATH']}"
    site = make_site(overrides={"scheduler": {"name": "pbs", "allowed_queues": PBS_QUEUES,
                                              "allowed_projects": ["proj"]}})
    Path(site.job_template_path).write_text("#!/bin/bash\nexec sleep 300\n")
    log_path = tmp_path / "agent-stderr.log"
    with open(log_path, "wb") as log:
        agent_proc = subprocess.Popen([sys.executable, "-m", "balsam.site", "--log-to-stderr"], cwd=site.site_path,
                                      env={**env, "BALSAM_SITE_PATH": str(site.site_path)}, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        bj = create_batch_job(client, site.site_id, project="proj", queue="debug")["id"]
        wait_for(started.exists, what="the wrapper's qsub done, its id not yet printed")
        os.killpg(agent_proc.pid, signum)
        name = signal.Signals(signum).name
        wait_for(lambda: f"received {name}".encode() in log_path.read_bytes(), what=f"the agent's word on the {name}")
        release.touch()
        assert agent_proc.wait(timeout=90) == 0, log_path.read_text()
        text = log_path.read_text()
        assert "submit failed" not in text, text
        assert text.count(f"received {name}: stopping") == 1, text
        fake_jobs = json.loads((tmp_path / "server" / "state.json").read_text())["jobs"]
        assert len(fake_jobs) == 1, fake_jobs
        record = batch_job(client, bj)
        assert record["state"] in ("queued", "running"), (record, text)
        assert str(record["scheduler_id"]) in fake_jobs, (record, fake_jobs)
    finally:
        release.touch()
        if agent_proc.poll() is None:
            agent_proc.kill()
            agent_proc.wait(10)
        subprocess.run(f'for j in $(qselect); do qdel "$j"; done', shell=True, env=env, capture_output=True, timeout=60)


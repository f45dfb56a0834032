"""What a scheduler command leaves in its process group, with a real agent daemon and the real PBS
driver over a fake ``qstat`` on PATH (real processes).

The agent runs each scheduler command as the leader of a process group of its own (a Ctrl-C or
SIGHUP at its terminal must not cut a submit). A child that left the command (``(helper &)``:
reparented, no descendant of the agent) stays in that group. While the command ran in the agent's
group, the agent's stop ended such a child with the group; now:

- a hung command's child: the agent's own shutdown (a SIGTERM, a plain ``balsam site stop``) reads
  the groups of its commands before it ends its descendants and then ends what is left in them;
  ``stop_agent`` (plain or ``--force``) reads them too (Agent.shutdown, site_ops.stop_agent), and
  lists what is in them again after each round, for what a member started as it was ended;
- an exited command's child (its output to /dev/null, so the command's pipes closed): the runner
  ends what the command left in its group as soon as the command exits; before, one more process
  was left behind every status poll, found by no stop (balsam.scheduler.subprocess_runner). The
  command is reaped only once that is done: until then it is the agent's child (a zombie), so a
  ``--force`` stop that kills the agent meanwhile finds its group; reaped first, the group was
  found nowhere and the child ran on.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from balsam import scheduler
from balsam.scheduler import Command, subprocess_runner
from balsam.site.agent import read_pid_file
from balsam.site.site_ops import agent_command_groups, end_own_command_groups, stop_agent
from site_test_utils import wait_for

PBS_SITE = {"scheduler": {"name": "pbs", "allowed_queues": {"debug": {"max_nodes": 1, "max_walltime": 60,
                                                                      "max_queued_jobs": 1}}}}


def _running(mark: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline", "status"])
            if p.info["cmdline"] == ["sleep", mark] and p.info["status"] != psutil.STATUS_ZOMBIE]


def _marks() -> tuple[str, str]:
    base = random.randint(100000, 999999)
    return f"{base}.25", f"{base}.35"


def _fake_qstat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "qstat").write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / "qstat").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


#: A child that leaves the command (output to /dev/null: the command's pipes close as it exits)
#: and ignores SIGTERM: the runner, after its SIGTERM, waits out LEFTOVER_GRACE_SEC before SIGKILL.
#: Ignored before the fork (inherited): set in the child, the runner's SIGTERM could come first.
STUBBORN_CHILD = "trap '' TERM; (sleep {mark} > /dev/null 2>&1 &)"


def _kill_marked(*marks: str) -> None:
    for mark in marks:
        for proc in _running(mark):
            proc.kill()


@pytest.mark.slow  # a real agent whose shutdown waits for the hung command's thread before ending it
@pytest.mark.parametrize("how", ["sigterm", "stop", "stop-force"])
def test_stopping_the_agent_ends_the_child_a_hung_command_left(make_site, agent_daemon, tmp_path, monkeypatch, how):
    hung, left = _marks()
    # The agent's stop waits this long (not its default 15 s) for the hung cycle before it ends the
    # command: what is ended after the wait is the same.
    monkeypatch.setenv("BALSAM_AGENT_STOP_WAIT_SEC", "1")
    # The status poll's qstat starts a child that leaves it (still in its group), then hangs.
    _fake_qstat(tmp_path, monkeypatch, f"(sleep {left} &)\nexec sleep {hung}")
    site = make_site(overrides=PBS_SITE)
    agent_pid = agent_daemon(site)
    try:
        wait_for(lambda: _running(hung) and _running(left), timeout=60, what="the hung qstat and its child")
        assert _running(left)[0].pid not in {p.pid for p in psutil.Process(agent_pid).children(recursive=True)}
        if how == "sigterm":  # the agent's own shutdown, nothing else
            os.kill(agent_pid, signal.SIGTERM)
            wait_for(lambda: not psutil.pid_exists(agent_pid)
                     or psutil.Process(agent_pid).status() == psutil.STATUS_ZOMBIE, timeout=60, what="the agent to exit")
        elif how == "stop":
            stop_agent(Path(site.site_path), timeout=45)
        else:  # a stuck agent: SIGKILLed after the timeout, no shutdown of its own
            os.kill(read_pid_file(Path(site.site_path))[1], signal.SIGSTOP)
            stop_agent(Path(site.site_path), timeout=2, force=True)
        wait_for(lambda: not _running(hung) and not _running(left), timeout=15,
                 what="the hung qstat and the child it left to be ended")
    finally:
        _kill_marked(hung, left)


def test_the_runner_ends_what_an_exited_command_left_in_its_group():
    left, spared = _marks()
    # The helper's output goes to /dev/null: the command's pipes close as it exits. A process in a
    # session of its own (a daemon that means to outlive the command) is not in the group: spared.
    # (Popen returns once its child has its session: no race with the command's exit.)
    daemon = (f"{sys.executable} -c 'import subprocess as s; s.Popen([\"sleep\", \"{spared}\"], "
              "start_new_session=True, stdout=s.DEVNULL, stderr=s.DEVNULL)'")
    result = subprocess_runner(Command(["/bin/sh", "-c", f"(sleep {left} > /dev/null 2>&1 &); {daemon}; echo done"],
                                       timeout=30))
    try:
        assert (result.returncode, result.stdout) == (0, "done\n")
        wait_for(lambda: _running(spared), timeout=10, what="the setsid sleep to start")
        assert not _running(left), "the child the exited command left in its group runs on"
        assert _running(spared), "a process in a session of its own was ended"
    finally:
        _kill_marked(left, spared)


def test_an_exited_command_is_reaped_only_once_what_it_left_in_its_group_is_ended(monkeypatch):
    """Until then the command (a zombie) is the agent's child: a stop that kills the agent
    meanwhile finds its group among the agent's command groups (what stop_agent --force reads)."""
    left, _ = _marks()
    monkeypatch.setattr(scheduler, "LEFTOVER_GRACE_SEC", 60)  # the window, held open until the test ends it
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(subprocess_runner, Command(["/bin/sh", "-c", STUBBORN_CHILD.format(mark=left)], timeout=30))
        try:
            child = wait_for(lambda: _running(left), timeout=10, what="the child the command left")[0]
            group = os.getpgid(child.pid)  # the command's pid
            wait_for(lambda: _exited(group), timeout=10, what="the command to exit")
            assert group in agent_command_groups(os.getpid())[1], "the exited command's group is nobody's"
        finally:
            _kill_marked(left)
        assert run.result(timeout=30).returncode == 0


def test_the_sweep_of_command_groups_ends_what_a_member_starts_as_it_is_ended():
    """A member that the sweep's SIGTERM reaches starts another process before it ends (a wrapper
    whose TERM trap starts a cleanup helper): one the sweep's listing did not have. The listing is
    made again until it finds nothing new."""
    left, hung = _marks()
    # The command of a hung status poll, its group a command group of this process (the agent).
    command = subprocess.Popen(["/bin/sh", "-c", f"trap '(sleep {left} > /dev/null 2>&1 &); exit' TERM; "
                                f"sleep {hung} & wait"],
                               preexec_fn=os.setpgrp)  # a group of its own; process_group=0 is Python 3.11+
    try:
        wait_for(lambda: _running(hung), timeout=10, what="the hung command")
        session, groups = agent_command_groups(os.getpid())
        assert command.pid in groups
        # This command's group only: this process is a pytest worker, whose other children (the
        # session's live servers, each in a group of its own) the sweep would end as commands.
        end_own_command_groups((session, {command.pid}), grace_sec=5)
        assert not _running(hung) and not _running(left), "the helper started as the command was ended runs on"
    finally:
        _kill_marked(left, hung)
        command.wait()


@pytest.mark.parametrize("force", [False, True])
def test_stopping_the_agent_finds_no_child_an_exited_command_left(make_site, agent_daemon, tmp_path, monkeypatch,
                                                                   force):
    left, _ = _marks()
    # Each status poll's qstat leaves a child that outlives it by the runner's grace (1 s): the stop
    # comes while the runner ends it, the window in which a reaped command's group was found by no
    # --force stop (a stuck agent: SIGKILLed, no shutdown of its own).
    _fake_qstat(tmp_path, monkeypatch, f"{STUBBORN_CHILD.format(mark=left)}\nexit 1")
    site = make_site(overrides=PBS_SITE)
    agent_daemon(site)
    try:
        wait_for(lambda: _running(left), timeout=60, interval=0.05, what="a status poll's child")
        if force:
            os.kill(read_pid_file(Path(site.site_path))[1], signal.SIGSTOP)
            stop_agent(Path(site.site_path), timeout=2, force=True)
        else:
            stop_agent(Path(site.site_path), timeout=45)
        wait_for(lambda: not _running(left), timeout=10, what="the child the exited qstat left to be ended")
    finally:
        _kill_marked(left)

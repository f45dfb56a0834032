"""What ``balsam site stop --force`` ends once it has killed the agent, on a real process tree.

The agent's scheduler commands lead process groups of their own (so that a Ctrl-C or SIGHUP at its
terminal does not cut them): ending the agent's group no longer reached a hung one. stop_agent
reads the groups of the agent's descendants in its session before the kill and ends them after:
the command, what it started, and what it started that has left it since (reparented, still in its
group). A batch job that the local scheduler started in a session of its own is left alone, even
while the submit command that started it is its parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import psutil

from balsam.site.site_ops import agent_command_groups, end_group_leftovers
from balsam.util import process_start_time
from site_test_utils import wait_for

#: Stands for the agent: a scheduler command (a wrapper with a child, and a grandchild it left,
#: reparented) in a group of its own, whose child is also a batch job in a session of its own.
AGENT = """
import os, subprocess, sys, time
marks = sys.argv[1:]
wrapper = (f"(sleep {marks[3]} &); sleep {marks[1]} & "
           f"python3 -c 'import subprocess, sys; subprocess.Popen([\\"sleep\\", \\"{marks[2]}\\"], start_new_session=True)'; "
           f"exec sleep {marks[0]}")
subprocess.Popen(["/bin/sh", "-c", wrapper], preexec_fn=os.setpgrp)  # process_group=0 is 3.11+
time.sleep(600)
"""


def _running(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["cmdline"] == ["sleep", mark] and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def test_stop_force_ends_the_commands_groups_and_spares_a_batch_job():
    base = uuid.uuid4().int % 900000 + 100000
    command, child, batch_job, left = marks = [f"{base}.{n}5" for n in range(1, 5)]
    agent = subprocess.Popen([sys.executable, "-c", AGENT, *marks], start_new_session=True)
    try:
        wait_for(lambda: all(_running(m) for m in marks), what="the agent's command tree")
        # The grandchild left behind is no descendant of the agent any more, but in the command's group.
        assert _running(left)[0].pid not in {p.pid for p in psutil.Process(agent.pid).children(recursive=True)}
        started = process_start_time(agent.pid)
        session, groups = agent_command_groups(agent.pid)
        assert session == agent.pid
        assert groups == {os.getpgid(_running(command)[0].pid)}
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        end_group_leftovers(agent.pid, started, grace_sec=1, commands=(session, groups))
        wait_for(lambda: not any(_running(m) for m in (command, child, left)), timeout=15,
                 what="the command, its child and the grandchild it left to be ended")
        assert _running(batch_job), "the batch job (a session of its own) was ended"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        for mark in marks:
            for proc in _running(mark):
                proc.kill()

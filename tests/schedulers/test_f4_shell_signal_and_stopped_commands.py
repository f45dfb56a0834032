"""Two ways a scheduler command ends without an answer, with real processes and the real drivers.

- A site's ``#!/bin/sh`` wrapper that runs qsub without ``exec`` exits 128+N when qsub dies of
  signal N, printing nothing or only the shell's notice (``Killed``): PBS and Cobalt read it as
  qsub's refusal, permanent (the BatchJob submit_failed while its job could be queued). It is an
  unknown outcome now; a refusal that names the server's reason stays permanent (a PBS qsub's own
  exit status can be above 128). Slurm already read such an exit as not permanent.
- The agent runs its commands out of the terminal's foreground process group: one that reads the
  terminal (a password prompt) is stopped by SIGTTIN/SIGTTOU. It was ended by the timeout only and
  reported as a command that did not answer; it is now reported as stopped, as soon as it is seen.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from balsam.scheduler import Command, CommandResult, SchedulerError, subprocess_runner
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler


def _wrapper_exit(shell: str, signal_name: str) -> CommandResult:
    """What a real wrapper (``shell``) returns when its qsub (an inner shell) dies of ``signal_name``."""
    wrapper = f"sh -c 'kill -{signal_name} $$'; exit $?"
    signum = getattr(signal, f"SIG{signal_name}")
    # The signal's default action in the wrapper: a run under nohup (or any parent ignoring SIGHUP)
    # passes the ignored disposition down, a non-interactive shell cannot reset it, and the inner
    # shell then survived its own `kill -HUP` (exit 0).
    done = subprocess.run([shell, "-c", f"{wrapper}\n:"], capture_output=True, text=True, timeout=30,
                          preexec_fn=None if signum == signal.SIGKILL else lambda: signal.signal(signum, signal.SIG_DFL))
    return CommandResult(("qsub",), done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("driver", [PBSScheduler, CobaltScheduler, SlurmScheduler])
@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
@pytest.mark.parametrize("signal_name, status", [("KILL", 137), ("TERM", 143), ("HUP", 129)])
def test_a_wrappers_qsub_ended_by_a_signal_is_not_a_refusal(driver, shell, signal_name, status):
    result = _wrapper_exit(shell, signal_name)
    assert result.returncode == status, result
    with pytest.raises(SchedulerError) as caught:
        driver().parse_submit(result)
    assert not caught.value.permanent, caught.value
    if driver is not SlurmScheduler:
        assert f"exited with status {status}, a shell's word for a command ended by signal SIG{signal_name}" \
            in str(caught.value)


@pytest.mark.parametrize("driver, said", [
    (PBSScheduler, "qsub: Unknown queue\n"),
    (PBSScheduler, "qsub: Job violates queue and/or server resource limits\n"),
    (CobaltScheduler, "Usage: qsub.py [options] <executable> [<excutable options>]\nqsub.py: error: bad project\n"),
])
def test_a_refusal_with_a_status_above_128_that_names_its_reason_stays_permanent(driver, said):
    with pytest.raises(SchedulerError) as caught:
        driver().parse_submit(CommandResult(("qsub",), 137, "", said))
    assert caught.value.permanent, caught.value


@pytest.mark.parametrize("args", [
    ["/bin/sh", "-c", "kill -STOP $$"],  # the command itself
    ["/bin/sh", "-c", "/bin/sh -c 'kill -STOP $$'; echo never"],  # what a wrapper runs (ssh asking a password)
])
def test_a_command_stopped_by_the_terminal_is_reported_as_such(args):
    with pytest.raises(SchedulerError) as caught:
        subprocess_runner(Command(args, timeout=20))
    assert str(caught.value).startswith("`/bin/sh` was stopped: it (or a process it started) tried to use the "
                                        "terminal"), caught.value
    assert "make the command non-interactive" in str(caught.value)
    assert not caught.value.permanent


#: Run under a real pseudo-terminal (its controlling terminal, in its foreground group, as an agent
#: started at a login shell): a command that reads the terminal, as a password prompt does.
AT_A_TERMINAL = """
from balsam.scheduler import Command, SchedulerError, subprocess_runner
try:
    subprocess_runner(Command(["/bin/sh", "-c", "read answer < /dev/tty; echo got $answer"], timeout=20))
except SchedulerError as exc:
    print("error:", exc)
"""


def test_a_command_that_reads_the_terminal_is_reported_as_stopped():
    import os
    import pty
    import sys

    pid, fd = pty.fork()
    if pid == 0:  # the child: a session of its own, the pty its controlling terminal
        os.execv(sys.executable, [sys.executable, "-c", AT_A_TERMINAL])
    said = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            said += chunk
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    assert "error: `/bin/sh` was stopped: it (or a process it started) tried to use the terminal" in said.decode(), said


def test_a_group_whose_only_member_is_a_zombie_has_no_leftovers(caplog):
    """Review r9: killpg(pgid, 0) also finds a member that exited and is not reaped yet (srun's
    helper, re-parented to a container's init that reaps it 1-2 s later): every such command was
    warned about and waited for a whole second. A zombie is no leftover."""
    import logging
    import time

    from balsam.scheduler import Command, _end_group_leftovers, _group_alive

    proc = subprocess.Popen(["true"], process_group=0)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # exited, not reaped: a zombie leading its own group
            with open(f"/proc/{proc.pid}/stat", "rb") as fp:
                if fp.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.01)
        os.killpg(proc.pid, 0)  # the kernel still finds the group
        assert not _group_alive(proc.pid)
        caplog.set_level(logging.WARNING, logger="balsam.scheduler")
        _end_group_leftovers(Command(["srun"]), proc.pid)
        assert "left processes" not in caplog.text  # neither warned about nor waited for
    finally:
        proc.wait()

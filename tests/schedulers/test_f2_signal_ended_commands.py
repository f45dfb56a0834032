"""Scheduler commands that a signal ends, and how the commands are started.

A submit command that a signal ended (rc < 0: a Ctrl-C that reached it, the OOM killer, a site's
watchdog) had no say: it may have queued the job before it could print the id. The PBS and Cobalt
drivers read it as a permanent refusal, so the agent dropped the submission's ``.submitting``
marker, revoked its launcher credential and made the BatchJob submit_failed while the job could be
in the queue. The base class now raises a SchedulerError that is not permanent for any driver,
which the agent treats as an unknown outcome (marker kept, the scheduler asked for the job).

Real processes throughout: fake ``qsub``/``sbatch`` (and a fake Python for the local scheduler's
queue command) that end themselves with a signal, run by the real ``subprocess_runner``.
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import attrs
import psutil
import pytest

from balsam.builtin.local_scheduler import LocalScheduler
from balsam.scheduler import Command, SchedulerError, SubmitRequest, subprocess_runner
from balsam_scheduler_cobalt import CobaltScheduler
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_slurm import SlurmScheduler

from fake_env import fake_batch_env, wait_for

#: A command that starts, notes that it ran, and is ended by a signal before it answers.
ENDED_BY_SIGNAL = """#!{python}
import os, signal, sys
from pathlib import Path
Path(os.environ["F2_RAN"]).write_text(" ".join(sys.argv))
if {signum} != signal.SIGKILL:  # its default action (death), whatever this process inherited
    signal.signal({signum}, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {{{signum}}})
os.kill(os.getpid(), {signum})
"""


def _ended_by_signal(path: Path, signum: int) -> Path:
    path.write_text(ENDED_BY_SIGNAL.format(python=sys.executable, signum=int(signum)))
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("driver", ["pbs", "cobalt", "slurm", "local"])
def test_a_submit_ended_by_a_signal_is_an_unknown_outcome_not_a_refusal(tmp_path, monkeypatch, driver, signum):
    ran = tmp_path / "ran"
    monkeypatch.setenv("F2_RAN", str(ran))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if driver == "local":
        # The local scheduler's queue command is `python -m balsam.builtin.local_queue submit ...`:
        # the same command run by a Python that a signal ends.
        fake_python = _ended_by_signal(bin_dir / "python", signum)

        def runner(command: Command):
            return subprocess_runner(attrs.evolve(command, args=(str(fake_python), *command.args[1:])))

        scheduler = LocalScheduler(runner, state_dir=tmp_path / "local-queue")
    else:
        _ended_by_signal(bin_dir / ("sbatch" if driver == "slurm" else "qsub"), signum)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        scheduler = {"pbs": PBSScheduler, "cobalt": CobaltScheduler, "slurm": SlurmScheduler}[driver]()
    script = tmp_path / "qlaunch00001.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    request = SubmitRequest(script_path=script, project="proj", queue="debug", num_nodes=1, wall_time_min=5,
                            job_name="qlaunch00001")
    with pytest.raises(SchedulerError) as info:
        scheduler.submit(request)
    assert ran.exists()  # the driver's command really ran
    assert not info.value.permanent and not info.value.at_queue_limit, str(info.value)
    name = signal.Signals(signum).name
    assert f"was ended by signal {name} ({int(signum)}) before it answered: its outcome is unknown" in str(info.value)


def test_a_command_leads_a_process_group_of_its_own_in_the_agents_session():
    """Out of the caller's process group (a terminal's Ctrl-C, a shell's SIGHUP to its jobs do not
    reach it), in its session (``balsam site stop --force`` ends it), with no signal blocked."""
    probe = ("import os; from pathlib import Path; "
             "blk = [l.split()[1] for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('SigBlk:')][0]; "
             "print(os.getpid(), os.getpgid(0), os.getsid(0), int(blk, 16))")
    result = subprocess_runner(Command([sys.executable, "-c", probe]))
    assert result.returncode == 0, result.stderr
    pid, group, session, blocked = map(int, result.stdout.split())
    assert group == pid != os.getpgid(0)
    assert session == os.getsid(0)
    assert blocked == 0


def test_a_timed_out_command_is_ended_with_what_it_started():
    """A wrapper that timed out is killed with its group: its qsub (a grandchild) went on running,
    holding the output pipes."""
    marker = f"{uuid.uuid4().int % 900000 + 100000}.25"  # tells the grandchild `sleep` apart
    with pytest.raises(SchedulerError, match="did not answer within 1 s"):
        subprocess_runner(Command(["/bin/sh", "-c", f"sleep {marker} & wait"], timeout=1))

    def sleeping():
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            if proc.info["cmdline"] == ["sleep", marker] and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        return found

    try:
        wait_for(lambda: not sleeping(), 15, "the wrapper's child to be ended")
    finally:
        for proc in sleeping():
            proc.kill()


def test_a_job_of_the_fake_pbs_starts_with_no_signal_blocked(tmp_path, monkeypatch):
    """balsam.testing.fakebatch starts a job from the qsub's process: a job submitted through the
    agent's runner had the runner's SIGINT blocked for its whole run."""
    for key, value in fake_batch_env("fake_pbs", tmp_path / "server").items():
        monkeypatch.setenv(key, value)
    pbs = PBSScheduler(user=getpass.getuser())
    mask = tmp_path / "job-mask.txt"
    script = tmp_path / "qsubmit" / "qlaunch00001.sh"
    script.parent.mkdir()
    script.write_text(f"#!/bin/bash\ngrep '^SigBlk:' /proc/self/status > {mask}.tmp && mv {mask}.tmp {mask}\n")
    script.chmod(0o755)
    jobid = pbs.submit(SubmitRequest(script_path=script, project="proj", queue="debug", num_nodes=1, wall_time_min=5,
                                     job_name="qlaunch00001"))
    try:
        text = wait_for(lambda: mask.exists() and mask.read_text(), 30, "the job's signal mask")
        assert int(text.split()[1], 16) == 0, text
    finally:
        subprocess.run(["qdel", str(jobid)], capture_output=True, timeout=60)

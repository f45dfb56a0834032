"""Perlmutter's stop signal: srun does not forward a SIGTERM sent to it; it SIGKILLs its step's tasks
("forcing job termination", sacct 0:9), so an app trapping SIGTERM to save a checkpoint never ran its
handler when the launcher stopped (a real-Slurm audit). The platform delivers the SIGTERM through
Slurm instead (``Platform.signal_runs``): one ``scontrol --oneliner show step`` lists the steps and
the pid of each one's srun, the srun's environment names its job (``BALSAM_JOB_ID``), one ``scancel
--signal=TERM`` signals those steps. Faked scontrol and scancel on PATH record what they were run
with; the "sruns" are real processes of this test, with the environment the launcher gives a job."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from balsam.platform import LaunchSpec
from balsam_platform_perlmutter import PerlmutterGPUPlatform
from balsam_platform_perlmutter import platform as pm_platform

ALLOCATION = "4242"


def _fake(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {directory}/calls.log\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def sruns():
    """Stand-ins for the sruns of jobs 7 and 9 and of a serial-mode worker (no BALSAM_JOB_ID)."""
    procs = {}
    for key, job in (("7", "7"), ("9", "9"), ("worker", None)):
        env = {k: v for k, v in os.environ.items() if k != "BALSAM_JOB_ID"}
        if job is not None:
            env["BALSAM_JOB_ID"] = job
        procs[key] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.wait()


@pytest.fixture
def slurm_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sruns) -> Path:
    host = socket.gethostname()
    # scontrol's lines as on Slurm 22.05 (fields cut): the batch step, the steps of jobs 7 and 9 and
    # of a serial worker, all started here, and a step whose srun runs on another host.
    steps = "\n".join([
        f"StepId={ALLOCATION}.batch UserId=0 State=RUNNING NodeList=nid001234 Name=batch SrunHost:Pid=(null):0",
        f"StepId={ALLOCATION}.0 UserId=0 State=RUNNING Name=python SrunHost:Pid={host}:{sruns['7'].pid}",
        f"StepId={ALLOCATION}.1 UserId=0 State=RUNNING Name=python SrunHost:Pid={host}:{sruns['9'].pid}",
        f"StepId={ALLOCATION}.2 UserId=0 State=RUNNING Name=python SrunHost:Pid={host}:{sruns['worker'].pid}",
        f"StepId={ALLOCATION}.3 UserId=0 State=RUNNING Name=python SrunHost:Pid=elsewhere:{sruns['7'].pid}",
    ]) + "\n"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "steps.out").write_text(steps)
    _fake(bin_dir, "scontrol", f"cat {bin_dir}/steps.out")
    _fake(bin_dir, "scancel", "exit 0")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_JOB_ID", ALLOCATION)
    return bin_dir


def _calls(bin_dir: Path) -> list[str]:
    log = bin_dir / "calls.log"
    return [line.split(" ", 1)[1] if " " in line else "" for line in log.read_text().splitlines()] if log.exists() else []


def test_signal_runs_scancels_exactly_the_jobs_steps(slurm_bin):
    delivered = PerlmutterGPUPlatform().signal_runs([7, 9, 11], signal.SIGTERM)
    assert delivered == {7, 9}  # job 11 has no step (yet): the launcher signals its srun's group
    assert _calls(slurm_bin) == [
        f"--oneliner show step {ALLOCATION}",
        f"--signal=TERM {ALLOCATION}.0 {ALLOCATION}.1",  # not the batch step, the worker's or another host's
    ]


def test_only_the_jobs_asked_for_are_signalled(slurm_bin):
    assert PerlmutterGPUPlatform().signal_runs([9], signal.SIGTERM) == {9}
    assert _calls(slurm_bin)[-1] == f"--signal=TERM {ALLOCATION}.1"


def test_signal_runs_outside_an_allocation_runs_nothing(slurm_bin, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_JOBID", raising=False)
    assert PerlmutterGPUPlatform().signal_runs([7], signal.SIGTERM) == set()
    assert _calls(slurm_bin) == []


def test_a_failed_scancel_delivers_nothing_with_a_warning(slurm_bin, caplog):
    # an error that names no step (the controller, the credentials): no step was signalled
    _fake(slurm_bin, "scancel", "echo 'scancel: error: Access denied' >&2; exit 1")
    with caplog.at_level(logging.WARNING):
        assert PerlmutterGPUPlatform().signal_runs([7, 9], signal.SIGTERM) == set()
    assert "Access denied" in caplog.text


def test_a_step_that_ended_does_not_undo_the_delivery_to_the_others(slurm_bin, sruns):
    # scancel signals each step on its own and exits with the worst error: a step that ended between
    # scontrol and scancel (its srun gone) makes it exit 1 with nothing on stderr (Slurm prints the
    # "already done" error only with -v), while the other steps got the signal.
    env = {**os.environ, "BALSAM_JOB_ID": "13"}
    third = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        steps = (slurm_bin / "steps.out").read_text() + (
            f"StepId={ALLOCATION}.4 UserId=0 State=RUNNING Name=python SrunHost:Pid={socket.gethostname()}:{third.pid}\n")
        (slurm_bin / "steps.out").write_text(steps)
        # kill -9 is asynchronous: wait (bounded) until the srun is gone, as a step that ended is
        pid = sruns["9"].pid
        _fake(slurm_bin, "scancel", f"kill -9 {pid}; n=0; while grep -qs BALSAM_JOB_ID= /proc/{pid}/environ "
                                    f"&& [ $n -lt 1000 ]; do sleep 0.01; n=$((n+1)); done; exit 1")
        delivered = PerlmutterGPUPlatform().signal_runs([7, 9, 13], signal.SIGTERM)
    finally:
        third.kill()
        third.wait()
    assert delivered == {7, 13}  # job 9's run ended: the launcher's wait copes with it
    assert _calls(slurm_bin)[-1] == f"--signal=TERM {ALLOCATION}.0 {ALLOCATION}.1 {ALLOCATION}.4"


def test_the_steps_scancel_names_in_its_errors_were_not_signalled(slurm_bin):
    _fake(slurm_bin, "scancel",
          f"echo 'scancel: error: Kill job error on job step id {ALLOCATION}.1: Access/permission denied' >&2; exit 1")
    assert PerlmutterGPUPlatform().signal_runs([7, 9], signal.SIGTERM) == {7}


def test_a_pending_step_is_not_a_step_to_signal():
    text = "\n".join([
        "StepId=4242.TBD UserId=0 State=PENDING Name=python SrunHost:Pid=nid001234:321",
        "StepId=4242.extern UserId=0 State=RUNNING SrunHost:Pid=nid001234:5",
        "StepId=4242.3 UserId=0 State=RUNNING Name=python SrunHost:Pid=nid001234:654",
    ])
    assert pm_platform.parse_steps(text) == [("4242.3", "nid001234", 654)]


def test_the_launchers_deadline_bounds_the_slurm_calls(slurm_bin, caplog):
    # no grace left: no call at all (the batch system's kill does not wait)
    with caplog.at_level(logging.WARNING):
        assert PerlmutterGPUPlatform().signal_runs([7], signal.SIGTERM, timeout=0) == set()
    assert _calls(slurm_bin) == []
    assert "grace is spent" in caplog.text


def test_a_hung_scontrol_is_given_up_on_at_the_launchers_deadline(slurm_bin, caplog):
    # SLURM_CALL_TIMEOUT_SEC (5 s) unchanged: the launcher's shorter deadline is what ends the call
    _fake(slurm_bin, "scontrol", "exec sleep 30")
    with caplog.at_level(logging.WARNING):
        assert PerlmutterGPUPlatform().signal_runs([7], signal.SIGTERM, timeout=0.5) == set()
    assert re.search(r"timed out after 0\.\d+ seconds", caplog.text)  # not SLURM_CALL_TIMEOUT_SEC's 5


def test_a_missing_scontrol_delivers_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", ALLOCATION)
    with caplog.at_level(logging.WARNING):
        assert PerlmutterGPUPlatform().signal_runs([7], signal.SIGTERM) == set()
    assert "scontrol is not on PATH" in caplog.text


def test_a_hung_scontrol_is_given_up_on(slurm_bin, monkeypatch, caplog):
    _fake(slurm_bin, "scontrol", "exec sleep 30")
    monkeypatch.setattr(pm_platform, "SLURM_CALL_TIMEOUT_SEC", 0.5)
    with caplog.at_level(logging.WARNING):
        assert PerlmutterGPUPlatform().signal_runs([7], signal.SIGTERM) == set()
    assert "timed out" in caplog.text
    assert not [c for c in _calls(slurm_bin) if c.startswith("--signal")]


def test_the_launch_line_is_unchanged():
    # The steps are found by their sruns' pids: nothing is added to the line (no --job-name).
    line = PerlmutterGPUPlatform().mpi_launch_args(LaunchSpec(cmdline="./app", hostnames=["nid001234"], job_id=7, app_id=1))
    assert not any(a.startswith("--job-name") for a in line)


def test_deliver_signal_never_raises_into_the_launcher(caplog):
    from balsam.platform import deliver_signal  # here: the launcher's wrapper of the hook is new

    class Broken(PerlmutterGPUPlatform):
        def signal_runs(self, job_ids, sig, timeout=None):
            raise RuntimeError("boom")

    with caplog.at_level(logging.WARNING):
        assert deliver_signal(Broken(), [1, 2], signal.SIGTERM) == set()
    assert "boom" in caplog.text


def test_deliver_signal_ignores_an_answer_that_is_not_ids(caplog):
    from balsam.platform import deliver_signal

    class Sloppy(PerlmutterGPUPlatform):
        def signal_runs(self, job_ids, sig, timeout=None):
            return True  # not a set of job ids

    with caplog.at_level(logging.WARNING):
        assert deliver_signal(Sloppy(), [1, 2], signal.SIGTERM) == set()
    assert "could not signal the runs" in caplog.text

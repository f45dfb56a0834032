"""Serial mode on Perlmutter when the allocation ends (``balsam queue term``: scancel): Slurm sends
SIGTERM to every process of the job. ``srun`` exits by it at once (-15) while the step's tasks, the
serial master among them, get the signal from slurmstepd and take their time to end their jobs and
report them RUN_TIMEOUT. A real-Slurm audit saw the launcher take srun's exit for the workers'
death: it deleted the live master's Session (the master's RUN_TIMEOUT reports were refused with
HTTP 409, the jobs' reason said the Session was deleted) and recorded "serial workers died (mpiexec
exit -15)" on the BatchJob, naming a launcher that was srun."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from launcher_helpers import events_of
from machine_jobs import make_runnable, site_for, wait_for_states
from platform_harness import finish, start_launcher

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

#: A stand-in for srun and slurmstepd: the program runs in a session of its own (slurmstepd's
#: child, not srun's); srun's SIGTERM reaches it (Slurm signals the step's tasks) and srun itself
#: dies of the signal at once, without waiting for the task.
FAKE_SRUN = '''
import os, signal, subprocess, sys
args = sys.argv[1:]
if os.environ.get("FAKE_SRUN_FAIL"):
    sys.exit("srun: error: Unable to create step for job 1: Invalid node name specified")
program = args[args.index("--overlap") + 1:]
with open(os.environ["FAKE_SRUN_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
env = {**os.environ, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
task = None
def stop(signum, frame):
    if task is not None:
        os.killpg(task.pid, signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
# The handler before the task: the task's pid file is what the test waits for before its SIGTERM,
# and a SIGTERM between the two met the default action (srun gone, its task never signalled).
signal.signal(signal.SIGTERM, stop)
task = subprocess.Popen(program, env=env, start_new_session=True)
sys.exit(task.wait())
'''


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"serial master {pid} still running {timeout} s after the launcher's stop")


def _site(tmp_path: Path) -> tuple[str, Path, Path]:
    """A perlmutter-gpu site whose srun is :data:`FAKE_SRUN` (named srun); and its log of calls."""
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text(f"#!{sys.executable}\n{FAKE_SRUN}")
    srun.chmod(0o755)
    name, path = site_for(tmp_path, "perlmutter-gpu", idle_ttl_sec=60, serial_mode_startup_params={"cpus-per-task": "128"},
                          platform_options={"srun": str(srun)})
    return name, path, tmp_path / "srun.log"


def test_scancel_of_a_serial_allocation_lets_the_master_report_its_timeouts(balsam_env, tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, BatchJob

    name, path, log = _site(tmp_path)

    class Stubborn(ApplicationDefinition):
        site = name
        # Ignores SIGTERM: the master's stop waits its grace before the SIGKILL, so that the master
        # is still ending its tasks when srun has long exited.
        command_template = "bash -c 'trap \"\" TERM; echo $$ > pid; sleep 300'"

    Stubborn.sync()
    (job_id,) = make_runnable([Stubborn.submit(workdir="s/0", save=False)])
    batch_job = BatchJob.objects.create(site_id=Stubborn.resolve_site_id(), project="local", queue="debug",
                                        num_nodes=1, wall_time_min=10, job_mode="serial")
    env = {"SLURM_JOB_NODELIST": "nid001234", "BALSAM_BATCH_JOB_ID": str(batch_job.id), "FAKE_SRUN_LOG": str(log),
           # the tasks' grace at the stop: 3 s
           "BALSAM_LAUNCHER_MARGIN_SEC": "6"}
    proc = start_launcher(path, "serial", 10, env)
    pid_file = path / "data" / "s" / "0" / "pid"
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None, Path(proc.console_path).read_text()[-3000:]
        time.sleep(0.05)
    wait_for_states([job_id], {"RUNNING"}, timeout=30)
    os.killpg(proc.pid, signal.SIGTERM)  # scancel: the launcher's process group, srun with it
    rc = finish(proc, 90)
    wait_for_states([job_id], {"RUN_TIMEOUT", "RUN_ERROR", "FAILED", "RUN_DONE"}, timeout=60)
    # The master outlives a launcher that did not wait for it: let it end (and log) before reading.
    (record,) = (path / "log").glob("*.serial.session")
    master_pid = json.loads(record.read_text())["pid"]
    _wait_gone(master_pid, 60)
    console = Path(proc.console_path).read_text()
    logs = console + "".join(p.read_text(errors="replace") for p in (path / "log").glob("*.log"))
    assert "HTTP 409" not in logs, logs[-4000:]
    assert "error" not in BatchJob.objects.get(id=batch_job.id).status_info, logs[-4000:]
    events = events_of([job_id])[job_id]
    assert [e.to_state for e in events][-2:] == ["RUNNING", "RUN_TIMEOUT"], [(e.to_state, e.data) for e in events]
    assert events[-1].data["reason"] == "launcher stopped (signal 15)", events[-1].data
    assert rc == 0, logs[-4000:]
    assert "--overlap" in log.read_text()


def test_workers_that_die_without_a_stop_are_reported_naming_srun(balsam_env, tmp_path: Path) -> None:
    """The workers' death (here srun refusing the step) while the launcher is not stopping is still
    the BatchJob's error; it names the launcher that ran them, srun, not mpiexec."""
    from balsam.api import BatchJob

    name, path, log = _site(tmp_path)
    batch_job = BatchJob.objects.create(site_id=int((path / ".balsam-site").read_text()), project="local",
                                        queue="debug", num_nodes=1, wall_time_min=10, job_mode="serial")
    env = {"SLURM_JOB_NODELIST": "nid001234", "BALSAM_BATCH_JOB_ID": str(batch_job.id), "FAKE_SRUN_LOG": str(log),
           "FAKE_SRUN_FAIL": "1"}
    proc = start_launcher(path, "serial", 10, env)
    assert finish(proc, 90) == 1
    error = BatchJob.objects.get(id=batch_job.id).status_info.get("error", "")
    assert error.startswith("serial workers died (srun exit 1): srun: error: Unable to create step"), error

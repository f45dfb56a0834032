"""The local scheduler's ``status`` command, which the site agent runs every ``sync_period``, reads
process identities (pid + start time) from ``/proc`` on Linux instead of importing psutil, and
imports nothing else it does not use (argparse, socket, subprocess, typing): 0.082 -> 0.042 s of
CPU per poll against 0.036 for the bare interpreter (docs/performance.md). What must not change:

- a start time read from /proc is psutil's ``create_time``, to the bit, for every kind of process
  (a zombie, a name with ")" in it), so records written by older versions (psutil's value) and by
  this one compare alike, and the submit side and the status side agree;
- a job's pid given to a later process (a reused pid) is not the job: not listed, not killed at its
  wall time, not killed by ``delete``;
- where /proc cannot answer (not Linux) psutil does, with the same answers.

Before the change the import test failed (psutil, argparse, socket, subprocess, typing on the
status path) and so did those using ``process_state`` or ``_kill_tree(pid, started)``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from site_test_utils import start_with_pid

LINUX = sys.platform.startswith("linux")
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
#: Start times this far apart are two processes (START_TIME_TOLERANCE_SEC is 0.5 s).
OFF = 0.8


@pytest.fixture
def procs() -> Iterator[list]:
    """Popen objects a test started; whatever still runs at the end is killed and reaped."""
    started: list = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start(procs: list, argv: "list[str]", **kw) -> subprocess.Popen:
    proc = subprocess.Popen(argv, **kw)
    procs.append(proc)
    return proc


def queue_cli(state_dir: Path, *args: str) -> str:
    """``python -m balsam.builtin.local_queue --state-dir DIR ARGS``, as the scheduler driver runs it
    (a fresh interpreter, with this test's PYTHONPATH: the tree under test)."""
    out = subprocess.run([sys.executable, "-m", "balsam.builtin.local_queue", "--state-dir", str(state_dir), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def write_record(state_dir: Path, record: dict, **job: object) -> None:
    """A jobs.json holding job 1 (running, wall time 10 min) with ``record``'s pid and start time."""
    now = time.time()
    base = {"script": str(state_dir / "job.sh"), "queue": "local", "project": "local", "num_nodes": 1,
            "wall_time_min": 10, "job_name": "j", "submit_time": now - 5, "start_time": now - 5, "state": "running"}
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "jobs.json").write_text(json.dumps({"next_id": 2, "jobs": {"1": dict(base, **record, **job)}}))


def wait_until(predicate, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail(f"not reached: {what}")


def is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- one identity, whoever reads it -------------------------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="/proc is Linux's")
def test_a_start_time_read_from_proc_is_psutils(tmp_path: Path, procs: list) -> None:
    from balsam.process_identity import process_start_time

    # A process name with ")" and spaces: /proc/<pid>/stat gives it in parentheses, unescaped.
    odd = tmp_path / "x) (y z"
    odd.symlink_to("/bin/sleep")
    named = start(procs, [str(odd), "120"])
    wait_until(lambda: psutil.Process(named.pid).name() == "x) (y z", "the symlinked sleep exec'd")
    zombie = start(procs, ["/bin/true"])
    wait_until(lambda: is_zombie(zombie.pid), "an unreaped child")
    for pid in (os.getpid(), os.getppid(), 1, named.pid, zombie.pid):
        assert process_start_time(pid) == psutil.Process(pid).create_time(), pid
    # A zombie has a start time but has exited: not running.
    assert process_start_time(zombie.pid, running=True) is None
    assert process_start_time(named.pid, running=True) == psutil.Process(named.pid).create_time()


@pytest.mark.skipif(not LINUX, reason="/proc is Linux's")
def test_no_such_process_and_not_a_pid_read_as_none(procs: list) -> None:
    from balsam.process_identity import process_start_time, process_state

    gone = start(procs, ["/bin/true"])
    gone.wait()
    for pid in (gone.pid, -1, 0, "1", 1.0):  # (None is the calling process to psutil, as before)
        assert process_start_time(pid) is None, pid  # type: ignore[arg-type]
        assert process_state(pid) is None, pid  # type: ignore[arg-type]


def test_psutil_answers_where_proc_does_not(monkeypatch: pytest.MonkeyPatch, procs: list) -> None:
    """Off Linux (here: /proc taken as absent) the same answers come from psutil."""
    from balsam import process_identity

    monkeypatch.setattr(process_identity, "_PROCFS", False)
    live = start(procs, SLEEPER)
    zombie = start(procs, ["/bin/true"])
    wait_until(lambda: is_zombie(zombie.pid), "an unreaped child")
    started = psutil.Process(live.pid).create_time()
    assert process_identity.process_start_time(live.pid) == started
    assert process_identity.process_state(live.pid) == (started, False)
    assert process_identity.process_state(zombie.pid) == (psutil.Process(zombie.pid).create_time(), True)
    assert process_identity.process_start_time(zombie.pid, running=True) is None
    zombie.wait()
    assert process_identity.process_state(zombie.pid) is None


# -- the status command: what it imports, what it tells -------------------------------------------------

STATUS_MODULES = r"""
import json, runpy, sys
sys.argv = ["local_queue", "--state-dir", sys.argv[1], "status"]
try:
    runpy.run_module("balsam.builtin.local_queue", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
print(json.dumps(sorted(sys.modules)))
"""

#: What the status path has no use for (each an import every poll of the agent).
NOT_ON_THE_STATUS_PATH = ("psutil", "argparse", "socket", "subprocess", "typing", "shutil", "hashlib")


@pytest.mark.skipif(not LINUX, reason="psutil answers off Linux")
def test_the_status_command_imports_no_psutil_nor_argparse(tmp_path: Path, procs: list) -> None:
    job = start(procs, SLEEPER, start_new_session=True)
    write_record(tmp_path / "q", {"pid": job.pid, "create_time": psutil.Process(job.pid).create_time()})
    out = subprocess.run([sys.executable, "-c", STATUS_MODULES, str(tmp_path / "q")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert list(json.loads(lines[0])) == ["1"]  # the job was checked (and found running)
    loaded = set(json.loads(lines[-1]))
    # Only those a bare interpreter here does not import already (site hooks may import some).
    bare = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=120)
    unwanted = sorted((loaded - set(json.loads(bare.stdout))) & set(NOT_ON_THE_STATUS_PATH))
    assert unwanted == []


def test_status_read_without_argparse_tells_what_argparse_reads(tmp_path: Path, procs: list) -> None:
    """``--state-dir DIR status`` (the driver's form) is read without argparse; other spellings go
    through argparse, to the same result."""
    job = start(procs, SLEEPER, start_new_session=True)
    write_record(tmp_path / "q", {"pid": job.pid, "create_time": psutil.Process(job.pid).create_time()})
    fast = json.loads(queue_cli(tmp_path / "q", "status"))
    assert list(fast) == ["1"]
    out = subprocess.run([sys.executable, "-m", "balsam.builtin.local_queue", f"--state-dir={tmp_path / 'q'}",
                          "status"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and list(json.loads(out.stdout)) == ["1"], out.stderr
    # A value that looks like an option is argparse's error, as before.
    out = subprocess.run([sys.executable, "-m", "balsam.builtin.local_queue", "--state-dir", "-q", "status"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "--state-dir" in out.stderr


def test_a_record_of_an_older_version_is_still_the_job(tmp_path: Path, procs: list) -> None:
    """Records written before (the start time psutil gave) name the same process now: listed by
    ``status``, and ``delete`` ends it."""
    job = start(procs, SLEEPER, start_new_session=True)
    write_record(tmp_path / "q", {"pid": job.pid, "create_time": psutil.Process(job.pid).create_time()})
    assert list(json.loads(queue_cli(tmp_path / "q", "status"))) == ["1"]
    # Reaped as it ends (as init reaps a real job's wrapper): a zombie child of this test reads as
    # running to delete's wait for the SIGTERM, which then waited out its 10 s.
    ended: list[int] = []
    reaper = threading.Thread(target=lambda: ended.append(job.wait(timeout=60)), daemon=True)
    reaper.start()
    queue_cli(tmp_path / "q", "delete", "1")
    reaper.join(60)
    assert ended == [-signal.SIGTERM]
    record = json.loads(queue_cli(tmp_path / "q", "history", "1"))["1"]
    assert record["native_state"] == "CANCELLED"


def test_a_job_submitted_here_is_found_by_the_status_command(tmp_path: Path) -> None:
    """The submit side records the start time with the function the status side compares with."""
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nexec sleep 120\n")
    script.chmod(0o755)
    job_id = queue_cli(tmp_path / "q", "submit", str(script)).strip()
    try:
        assert list(json.loads(queue_cli(tmp_path / "q", "status"))) == [job_id]
    finally:
        queue_cli(tmp_path / "q", "delete", job_id)
    assert json.loads(queue_cli(tmp_path / "q", "status")) == {}


# -- a pid given to another process ---------------------------------------------------------------------


def test_a_later_process_with_the_jobs_pid_is_neither_listed_nor_killed(tmp_path: Path, procs: list) -> None:
    """A record naming a live pid with a start time 0.8 s before that process started: not the job.
    Past the job's wall time it is not killed as the job either."""
    other = start(procs, SLEEPER, start_new_session=True)
    started = psutil.Process(other.pid).create_time()
    write_record(tmp_path / "q", {"pid": other.pid, "create_time": started - OFF},
                 start_time=time.time() - 3600, wall_time_min=1)
    assert json.loads(queue_cli(tmp_path / "q", "status")) == {}
    assert json.loads(queue_cli(tmp_path / "q", "history", "1"))["1"]["native_state"] == "LOST"
    assert other.poll() is None, "status killed a process that only got the job's pid"


def test_kill_tree_spares_a_process_that_got_the_pid_since(procs: list) -> None:
    from balsam.builtin.local_queue import LocalQueue

    other = start(procs, SLEEPER, start_new_session=True)
    started = psutil.Process(other.pid).create_time()
    LocalQueue._kill_tree(other.pid, started - OFF)
    assert other.poll() is None
    LocalQueue._kill_tree(other.pid, started)
    other.wait(timeout=60)  # ended (and reaped already by psutil's wait: no exit status to read here)
    assert not psutil.pid_exists(other.pid) or is_zombie(other.pid)


@pytest.mark.skipif(not (LINUX and os.geteuid() == 0 and os.access("/proc/sys/kernel/ns_last_pid", os.W_OK)),
                    reason="giving a pid again needs root and /proc/sys/kernel/ns_last_pid")
def test_a_reused_pid_is_not_the_job(tmp_path: Path, procs: list) -> None:
    """The job's process ends unrecorded (SIGKILL) and its pid goes to a new process: ``status``
    settles the job as LOST, and does not kill the newcomer although the job is past its wall time."""
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nexec sleep 120\n")
    script.chmod(0o755)
    state = tmp_path / "q"
    job_id = queue_cli(state, "submit", str(script), "--walltime", "1").strip()
    db = json.loads((state / "jobs.json").read_text())
    pid = db["jobs"][job_id]["pid"]
    os.killpg(pid, signal.SIGKILL)  # the job is its own process group
    for _ in range(500):  # reaped by whoever inherited it (the queue command that started it exited)
        if not psutil.pid_exists(pid):
            break
        time.sleep(0.02)
    else:
        pytest.skip(f"the killed job's process {pid} was not reaped here")
    # The newcomer must start later than the start-time tolerance after the job: a pid reused within
    # it cannot be told apart, by design. Where init reaps orphans at once (systemd, tini) the rewind
    # came 0.04 s after the job's start and status took the newcomer for the job.
    # (Slept in full: a recorded start is /proc's ticks after btime, whole seconds, so it cannot be
    # set against time.time().)
    time.sleep(OFF)
    newcomer = start_with_pid(pid, SLEEPER, start_new_session=True)
    procs.append(newcomer)
    db = json.loads((state / "jobs.json").read_text())
    db["jobs"][job_id]["start_time"] -= 3600  # past its wall time: a status taking the newcomer kills it
    (state / "jobs.json").write_text(json.dumps(db))
    assert json.loads(queue_cli(state, "status")) == {}
    assert json.loads(queue_cli(state, "history", job_id))[job_id]["native_state"] == "LOST"
    assert newcomer.poll() is None, "status killed the process that got the job's pid"

"""A job's run left running by a launcher killed together with its spawners is ended before the job
runs again on that host (``balsam.launcher.stale_run``).

The fault, reproduced with real processes: ``kill -9`` of the launcher and of its spawner processes
leaves the task running (it is in a session of its own, and only the spawner would end it). The
Session expires, the job comes back RUN_TIMEOUT, is re-queued, and the next launcher on the same
host started it again in the same workdir while the first run still wrote there: two runs at once.
Now whoever starts a task records the run on its ``job.out`` (host, pid = process group, start,
starter), and the next launcher that prepares the job ends that run first (SIGTERM, SIGKILL after
a grace), logging why. The record's checks (another host, a pid reused, a starter still alive) are
tested on real processes without a launcher below.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from balsam.launcher import spawner
from launcher_harness import start_launcher
from launcher_helpers import SESSION_EXPIRE_SEC, make_runnable, wait_for_states

TASK_SEC = 120


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _read_pid(path: Path, other_than: int = 0, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid = int(path.read_text())
            if pid != other_than:
                return pid
        except (FileNotFoundError, ValueError):
            pass
        assert time.monotonic() < deadline, f"no new pid in {path}"
        time.sleep(0.05)


def _spawner_pids(launcher_pid: int) -> list[int]:
    """The spawner processes a launcher started (its children running spawner.py)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == launcher_pid and b"spawner.py" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _print_logs(site_path: Path, lines: int = 300) -> None:
    """The last ``lines`` lines of each log of the site (launchers, spawners), to pytest's captured output."""
    for log in sorted((site_path / "log").glob("*.log")):
        try:
            text = log.read_text(errors="replace").splitlines()
        except OSError as exc:
            print(f"===== {log.name}: {exc}")
            continue
        print(f"===== {log.name} (last {min(lines, len(text))} of {len(text)} lines)")
        print("\n".join(text[-lines:]))


def _sleeper(site_name: str) -> Any:
    from balsam.api import ApplicationDefinition

    class StaleSleeper(ApplicationDefinition):
        site = site_name
        # exec: the pid written is the process the first run leaves behind.
        command_template = f"bash -c 'echo $$ > task.pid; exec sleep {TASK_SEC}'"

    StaleSleeper.sync()
    return StaleSleeper


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("job_mode", ["mpi", "serial"])
def test_a_run_left_by_a_launcher_killed_with_its_spawners_is_ended_before_the_job_runs_again(
        new_site: Any, job_mode: str) -> None:
    from balsam.api import Job

    name, path = new_site(idle_ttl_sec=60)
    app = _sleeper(name)
    ids = make_runnable([app.submit(workdir="stale", save=False)])
    pid_file = path / "data" / "stale" / "task.pid"
    first = start_launcher(path, job_mode, 5)
    second = None
    old = new = 0
    try:
        wait_for_states(ids, {"RUNNING"}, timeout=60)
        old = _read_pid(pid_file)
        time.sleep(1.0)  # the run is recorded once it has run 0.2 s (spawner.RECORD_AFTER_SEC)
        spawners = _spawner_pids(first.pid)
        assert spawners, "the launcher runs its tasks through spawner processes"
        for pid in spawners:  # every balsam process of the launcher, spawners first
            os.kill(pid, signal.SIGKILL)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        time.sleep(spawner.ORPHAN_GRACE_SEC + 1)
        assert _alive(old), "nothing should be left to end the first run"
        # The Session expires (SESSION_EXPIRE_SEC): RUN_TIMEOUT; the default handle_timeout re-queues.
        wait_for_states(ids, {"RUN_TIMEOUT"}, timeout=SESSION_EXPIRE_SEC + 30)
        Job.objects.filter(id=ids).update(state="RESTART_READY")
        second = start_launcher(path, job_mode, 5)
        new = _read_pid(pid_file, other_than=old)
        # The second run started only after the first had been ended: never two runs at once.
        assert not _alive(old), f"the first run (pid {old}) still runs beside the second (pid {new})"
        log = "\n".join(p.read_text(errors="replace") for p in (path / "log").glob("*.log"))
        assert "ending its process group before the job runs again" in log
        assert "job %d: its earlier run (pid " % ids[0] in log and ") has ended" in log
    except BaseException:
        _print_logs(path)  # a failure (one flake of the mpi case in 27 runs) shows what the launchers did
        raise
    finally:
        # Each may end between the check and the kill (the second launcher's run ends on its own):
        # a process gone by then is what the clean-up wants, no failure of the test.
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in (old, new):
            if pid and _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# -- the record's checks, on real processes ---------------------------------------------------------
# (imported here: the end-to-end test above also runs against a launcher without them, to show the fault)
def _stale_run() -> Any:
    from balsam.launcher import stale_run

    return stale_run


def node_clock() -> float:
    return spawner.node_clock()


def process_identity(pid: int) -> str:
    return spawner.process_identity(pid)


def run_record(*args: Any) -> str:
    return spawner.run_record(*args)


def RunRecords(**kw: Any) -> Any:  # noqa: N802 - the class of balsam.launcher.spawner
    return spawner.RunRecords(**kw)


def _task(workdir: Path) -> tuple[subprocess.Popen, float]:
    """A task as the spawner starts it (a session of its own, output to job.out), and its record."""
    started = node_clock()
    with open(workdir / "job.out", "wb") as out:
        proc = subprocess.Popen(["sleep", str(TASK_SEC)], stdout=out, stderr=out, start_new_session=True)
        return proc, started


def _record(workdir: Path, proc: subprocess.Popen, started: float, owner: str, job_id: int = 1) -> None:
    fd = os.open(workdir / "job.out", os.O_WRONLY)
    try:
        RunRecords(owner=owner).write(fd, str(workdir), proc.pid, started, job_id)
    finally:
        os.close(fd)


def _dead_owner() -> str:
    """The identity of a process that has exited."""
    gone = subprocess.Popen(["true"])
    owner = process_identity(gone.pid)
    gone.wait()
    return owner


def test_no_record_is_a_first_run_and_costs_one_failed_lookup(tmp_path: Path) -> None:
    (tmp_path / "job.out").write_bytes(b"")
    assert _stale_run().end_stale_run(1, tmp_path) is None
    assert _stale_run().end_stale_run(1, tmp_path / "missing") is None


def test_a_run_whose_starter_is_gone_is_ended_and_one_whose_starter_lives_is_left(tmp_path: Path) -> None:
    proc, started = _task(tmp_path)
    try:
        _record(tmp_path, proc, started, process_identity(os.getpid()))  # its starter (this test) lives
        assert _stale_run().end_stale_run(1, tmp_path).kind == "looked_after"
        assert proc.poll() is None
        _record(tmp_path, proc, started, _dead_owner())
        found = _stale_run().end_stale_run(1, tmp_path, grace=2.0)
        assert found is not None and found.kind == "ended" and found.record.pid == proc.pid
        assert proc.wait(5) == -signal.SIGTERM
        assert _stale_run().end_stale_run(1, tmp_path).kind == "gone"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_pid_now_naming_another_process_is_not_signalled(tmp_path: Path) -> None:
    proc, started = _task(tmp_path)
    try:
        # The record says the run started 100 s before this process did: the pid is someone else's.
        _record(tmp_path, proc, started - 100.0, _dead_owner())
        assert _stale_run().end_stale_run(1, tmp_path).kind == "gone"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_run_recorded_on_another_host_is_logged_as_unverifiable_and_left(tmp_path: Path, caplog: Any) -> None:
    proc, started = _task(tmp_path)
    try:
        fd = os.open(tmp_path / "job.out", os.O_WRONLY)
        os.setxattr(fd, spawner.RUN_RECORD_XATTR, run_record("elsewhere-node", proc.pid, started, _dead_owner()).encode())
        os.close(fd)
        with caplog.at_level("WARNING", logger="balsam.launcher.stale_run"):
            assert _stale_run().end_stale_run(7, tmp_path).kind == "elsewhere"
        assert proc.poll() is None
        assert "started on host elsewhere-node" in caplog.text and "cannot be checked" in caplog.text
    finally:
        proc.kill()
        proc.wait()


def test_a_file_system_without_extended_attributes_gets_the_record_as_a_link(tmp_path: Path, monkeypatch: Any) -> None:
    proc, started = _task(tmp_path)
    try:
        records = RunRecords(owner=_dead_owner())
        records.xattr = False  # as after the first ENOTSUP
        fd = os.open(tmp_path / "job.out", os.O_WRONLY)
        records.write(fd, str(tmp_path), proc.pid, started, 1)
        records.write(fd, str(tmp_path), proc.pid, started, 1)  # a relaunch replaces the link
        os.close(fd)
        assert os.readlink(tmp_path / spawner.RUN_RECORD_LINK).split()[2] == str(proc.pid)
        monkeypatch.delattr(os, "getxattr")
        assert _stale_run().end_stale_run(1, tmp_path, grace=2.0).kind == "ended"
        assert proc.wait(5) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_spawner_records_a_run_that_lasts_and_none_that_ends_at_once(tmp_path: Path) -> None:
    """Through a real spawner process: the record is written RECORD_AFTER_SEC after the start, only
    for a run still going then (the shortest tasks of serial mode pay no write)."""
    import threading

    from balsam.launcher.runner import SpawnerPool

    quick, slow = tmp_path / "quick", tmp_path / "slow"
    for workdir in (quick, slow):
        workdir.mkdir()
        (workdir / "job.out").write_bytes(b"")
    wake = threading.Event()
    pool = SpawnerPool(5, wake)
    try:
        pool.start(1, "true", quick, {})
        pool.start(2, "sleep 30", slow, {})
        # Written RECORD_AFTER_SEC into the run: waited for, since on a loaded host the spawner's own
        # start (a Python interpreter) can take longer than the fixed 1.2 s that stood in for it.
        deadline = time.monotonic() + 60
        while _stale_run().read_run_record(slow) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        record = _stale_run().read_run_record(slow)
        assert record is not None and record.host == os.uname().nodename
        assert spawner.proc_stat(record.pid)[1] == record.pid  # the task's process group
        assert record.owner == spawner.process_identity(pool.proc.pid)  # the spawner looks after it
        assert _stale_run().end_stale_run(2, slow).kind == "looked_after"
        assert _stale_run().read_run_record(quick) is None
    finally:
        pool.terminate_all(1.0)
        pool.close()

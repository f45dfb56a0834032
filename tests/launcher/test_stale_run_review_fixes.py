"""The stale-run check (``balsam.launcher.stale_run``) against the cases a review found, on real
processes: a container of the same host name (another pid namespace) numbering its own processes
from 1; a spawner that met a file system without extended attributes; a run whose first process
was killed with the launcher while its group lives on; two jobs sharing a workdir; records never
removed; stale runs that trap SIGTERM ended one grace each; a pid reused seconds later; another
user's run. Each case is written to run against the earlier implementation too (whose record had
no job id), where it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from balsam.launcher import spawner, stale_run

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, process groups, xattrs")


def _write(records: Any, target: Any, cwd: str, pid: int, started: float, job_id: int) -> None:
    """``RunRecords.write`` with the job id (the earlier record had none)."""
    try:
        records.write(target, cwd, pid, started, job_id)
    except TypeError:
        records.write(target, cwd, pid, started)


def _dead_owner() -> str:
    gone = subprocess.Popen(["true"])
    owner = spawner.process_identity(gone.pid)
    gone.wait()
    return owner


def _alive(pid: int) -> bool:
    stat = spawner.proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _until(predicate: Any, what: str, timeout: float = 60.0) -> None:
    """Waits for ``predicate()`` (a run the spawner records 0.2 s after it starts, a process a
    SIGKILL ends): a fixed sleep stood in for it, and a loaded CI host let the moment pass later."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _task(workdir: Path, argv: list, env: "dict | None" = None) -> tuple[subprocess.Popen, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "job.out").write_bytes(b"")
    started = spawner.node_clock()
    with open(workdir / "job.out", "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True, cwd=workdir, env=env)
    return proc, started


def _can(argv: list) -> bool:
    return shutil.which(argv[0]) is not None and subprocess.run(argv, capture_output=True).returncode == 0


_CHILD = textwrap.dedent("""
    import os, subprocess, sys, time
    from pathlib import Path
    from balsam.launcher import spawner, stale_run
    role, base = sys.argv[1], Path(sys.argv[2])
    work = base / role
    work.mkdir(exist_ok=True)
    (work / "job.out").write_bytes(b"")
    started = spawner.node_clock()
    with open(work / "job.out", "ab") as out:
        task = subprocess.Popen(["sleep", "60"], stdout=out, start_new_session=True)
    records = spawner.RunRecords(owner=spawner.process_identity(os.getpid()))
    try:
        records.write(str(work / "job.out"), str(work), task.pid, started, 1)
    except TypeError:
        records.write(str(work / "job.out"), str(work), task.pid, started)
    (base / f"{role}.pid").write_text(str(task.pid))
    if role == "A":
        while not (base / "done").exists():
            time.sleep(0.02)
    else:
        # The launcher in container B prepares job 1, whose record container A wrote.
        found = stale_run.end_stale_run(1, base / "A", grace=0.5)
        time.sleep(0.2)
        st = spawner.proc_stat(task.pid)
        (base / "B.result").write_text(f"{found and found.kind} {st is not None and st[0] not in 'ZX'}")
    task.kill()
""")


@pytest.mark.skipif(os.geteuid() != 0 or not _can(["unshare", "-pf", "--mount-proc", "true"]),
                    reason="needs unshare of a pid namespace (root)")
def test_a_record_of_another_pid_namespace_of_this_host_is_never_signalled(tmp_path: Path) -> None:
    """Two containers of one host name (separate pid namespaces, one file system) number their
    processes alike: B's own task has the pid A recorded, started within the slack. It was killed."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    tmp_path.chmod(0o755)
    cmd = ["unshare", "-pf", "--mount-proc", sys.executable, str(script)]
    a = subprocess.Popen([*cmd, "A", str(tmp_path)])
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "A.pid").exists():
            assert time.monotonic() < deadline and a.poll() is None, "container A did not start its task"
            time.sleep(0.02)
        time.sleep(0.05)  # B's first process starts in a later clock tick than A's (its owner differs)
        b = subprocess.run([*cmd, "B", str(tmp_path)], timeout=60)
        assert b.returncode == 0
        assert (tmp_path / "A.pid").read_text() == (tmp_path / "B.pid").read_text(), "same pid numbers expected"
        kind, b_alive = (tmp_path / "B.result").read_text().split()
        assert b_alive == "True", f"container B's own task was killed (end_stale_run said {kind})"
        assert kind == "elsewhere"
    finally:
        (tmp_path / "done").touch()
        try:
            a.wait(10)
        except subprocess.TimeoutExpired:
            a.kill()
            a.wait()


def test_the_record_names_the_pid_namespace_and_the_boot() -> None:
    record = stale_run.RunRecord.parse(spawner.RunRecords(owner="1:2").text(42, 5.0, 7))
    st = os.stat("/proc/self/ns/pid")
    assert record is not None and record.job_id == 7 and record.pid == 42
    assert record.namespace.split(":")[:2] == [str(st.st_dev), str(st.st_ino)]
    assert record.boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    # A record of the earlier format is read but never acted on.
    old = stale_run.RunRecord.parse(f"1 {spawner.this_host()} 42 5.000 1:2")
    assert old is not None and old.job_id is None


def test_an_old_format_record_is_not_acted_on(tmp_path: Path) -> None:
    proc, started = _task(tmp_path, ["sleep", "60"])
    try:
        os.setxattr(tmp_path / "job.out", spawner.RUN_RECORD_XATTR,
                    f"1 {spawner.this_host()} {proc.pid} {started:.3f} {_dead_owner()}".encode())
        assert stale_run.end_stale_run(1, tmp_path, grace=0.5).kind == "unverifiable"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


_MIXED = textwrap.dedent("""
    import os, signal, sys, threading, time
    from pathlib import Path
    from balsam.launcher.runner import SpawnerPool
    from balsam.launcher import spawner, stale_run
    nox, ext = Path(sys.argv[1]), Path(sys.argv[2])
    for d in (nox, ext):
        d.mkdir(parents=True, exist_ok=True); (d / "job.out").write_bytes(b"")
    def recorded(d):  # a link or the attribute, whichever this implementation wrote (its reader may miss one)
        try:
            os.getxattr(d / "job.out", spawner.RUN_RECORD_XATTR)
            return True
        except OSError:
            return os.path.lexists(d / spawner.RUN_RECORD_LINK)
    def wait_recorded(d):  # written RECORD_AFTER_SEC into the run: later on a loaded host
        deadline = time.monotonic() + 60
        while not recorded(d) and time.monotonic() < deadline:
            time.sleep(0.02)
    pool = SpawnerPool(5, threading.Event())
    pool.start(1, "sleep 60", nox, {})
    wait_recorded(nox)  # recorded as a link: no xattrs on ramfs
    pool.start(2, "sleep 60", ext, {})
    wait_recorded(ext)
    os.kill(pool.proc.pid, signal.SIGKILL)  # launcher and spawner killed
    pool.proc.wait()
    time.sleep(0.2)
    kinds = []
    for job_id, d in ((1, nox), (2, ext)):
        found = stale_run.end_stale_run(job_id, d, grace=1.0)
        kinds.append(str(found and found.kind))
    print("KINDS", *kinds)
    for d in (nox, ext):
        try:
            rec = stale_run.RunRecord.parse(os.readlink(d / spawner.RUN_RECORD_LINK))
        except OSError:
            try:
                rec = stale_run.read_run_record(d)
            except Exception:
                rec = None
        if rec is not None:
            try:
                os.killpg(rec.pid, signal.SIGKILL)
            except OSError:
                pass
""")


@pytest.mark.skipif(os.geteuid() != 0 or not _can(["unshare", "-m", "true"]), reason="needs a mount namespace (root)")
def test_a_spawner_that_met_a_file_system_without_xattrs_still_records_runs_elsewhere_findably(tmp_path: Path) -> None:
    """After one workdir without user xattrs (ramfs, like NFS) the spawner wrote every later record
    as a link, also on ext4, where the reader got ENODATA and never looked at the link: missed."""
    try:
        os.setxattr(tmp_path, "user.balsam.probe", b"1")
    except OSError:
        pytest.skip("tmp_path's file system has no user xattrs")
    script = tmp_path / "mixed.py"
    script.write_text(_MIXED)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'mount -t ramfs ramfs "{mnt}" && exec "{sys.executable}" "{script}" "{mnt}/nox" '
                                      f'"{tmp_path}/ext"'],
        capture_output=True, text=True, timeout=60)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("KINDS")]
    assert line, out.stdout + out.stderr
    assert line[0].split()[1:] == ["ended", "ended"], out.stdout + out.stderr


def test_a_run_whose_leader_was_killed_but_whose_group_lives_is_ended(tmp_path: Path) -> None:
    """``pkill -9 -f balsam`` kills a ``.balsam_command.N.sh`` leader too; the app lives on in its group."""
    script = tmp_path / ".balsam_command.7.sh"
    script.write_text("sleep 60\necho done\n")
    env = dict(os.environ, BALSAM_JOB_ID="7")
    leader, started = _task(tmp_path, ["/bin/bash", str(script)], env=env)
    app = 0
    try:
        deadline = time.monotonic() + 10
        while not app:
            members = [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != leader.pid
                       and (spawner.proc_stat(int(e)) or ("X", 0))[1] == leader.pid]
            app = members[0] if members else 0
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _write(spawner.RunRecords(owner=_dead_owner()), str(tmp_path / "job.out"), str(tmp_path), leader.pid, started, 7)
        leader.kill()
        leader.wait()
        assert _alive(app)
        found = stale_run.end_stale_run(7, tmp_path, grace=1.0)
        # A SIGKILL takes effect when the process next runs: at once on a quiet host, not always
        # within the 0.1 s this slept on a loaded one. A run left alone stays alive for 60 s.
        deadline = time.monotonic() + 30
        while _alive(app) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(app), f"the app (pid {app}) still runs: end_stale_run said {found and found.kind}"
        assert found.kind == "ended"
    finally:
        _kill_group(leader.pid)


def test_a_leader_gone_group_of_another_job_is_left(tmp_path: Path) -> None:
    script = tmp_path / ".balsam_command.8.sh"
    script.write_text("sleep 60\necho done\n")
    leader, started = _task(tmp_path, ["/bin/bash", str(script)], env=dict(os.environ, BALSAM_JOB_ID="9"))
    try:
        # The script's sleep must be in the group before its leader goes (0.3 s of sleep stood in).
        _until(lambda: any(e.isdigit() and int(e) != leader.pid and (spawner.proc_stat(int(e)) or ("X", 0))[1] == leader.pid
                           for e in os.listdir("/proc")), "the script's sleep")
        _write(spawner.RunRecords(owner=_dead_owner()), str(tmp_path / "job.out"), str(tmp_path), leader.pid, started, 8)
        leader.kill()
        leader.wait()
        # The record says job 8; the group's members were started for job 9: not that run.
        assert stale_run.end_stale_run(8, tmp_path, grace=0.5).kind == "gone"
        assert spawner.group_exists(leader.pid)
    finally:
        _kill_group(leader.pid)


def test_preparing_one_job_of_a_shared_workdir_leaves_the_other_jobs_run(tmp_path: Path) -> None:
    owner = _dead_owner()
    runs = {}
    for job_id in (101, 102):
        proc, started = _task(tmp_path, ["sleep", "60"]) if not runs else (None, 0.0)
        if proc is None:
            started = spawner.node_clock()
            with open(tmp_path / "job.out", "ab") as out:
                proc = subprocess.Popen(["sleep", "60"], stdout=out, start_new_session=True)
        _write(spawner.RunRecords(owner=owner), str(tmp_path / "job.out"), str(tmp_path), proc.pid, started, job_id)
        runs[job_id] = proc
    try:
        found = stale_run.end_stale_run(101, tmp_path, grace=0.5)  # the record is job 102's
        assert runs[102].poll() is None, f"job 102's run was ended while preparing job 101 ({found and found.kind})"
        assert found.kind == "other_job"
    finally:
        for proc in runs.values():
            proc.kill()
            proc.wait()


def test_a_reaped_run_leaves_no_record(tmp_path: Path) -> None:
    """Through a real spawner: a run that lasted past RECORD_AFTER_SEC is recorded, and its record
    removed when the spawner reaps it (a record left would say 'may still be running there')."""
    from balsam.launcher.runner import SpawnerPool

    done, other = tmp_path / "done", tmp_path / "other"
    for workdir in (done, other):
        workdir.mkdir()
        (workdir / "job.out").write_bytes(b"")
    pool = SpawnerPool(5, threading.Event())
    try:
        # Runs until the test has seen its record (a 0.8 s sleep, 0.5 s after the start request,
        # was over or not yet recorded when the spawner started it late on a loaded host).
        pool.start(1, f"while [ ! -e {tmp_path / 'go'} ]; do sleep 0.02; done", done, {})
        pool.start(2, "sleep 30", other, {})
        _until(lambda: stale_run.read_run_record(done) is not None, "the run's record")  # recorded while it ran
        _until(lambda: stale_run.read_run_record(other) is not None, "the other run's record")
        (tmp_path / "go").touch()
        deadline = time.monotonic() + 30
        while stale_run.read_run_record(done) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stale_run.read_run_record(done) is None, "the reaped run's record is still there"
        assert stale_run.read_run_record(other) is not None
    finally:
        pool.terminate_all(1.0)
        pool.close()
    assert stale_run.read_run_record(other) is None  # ended and reaped at the stop: removed too


def test_a_run_whose_children_outlive_it_keeps_its_record_until_they_are_gone(tmp_path: Path) -> None:
    """The record went as soon as the first process was reaped, while the children it left (given
    LEFTOVER_GRACE_SEC) still ran: a spawner killed in that window (with its launcher) left them
    running with no record, out of the next launcher's reach. It goes once the group is empty."""
    from balsam.launcher.runner import SpawnerPool

    (tmp_path / "job.out").write_bytes(b"")
    pool = SpawnerPool(5, threading.Event())
    leftovers: list[int] = []
    try:
        # The first process ends when the test says (a 0.6 s sleep was over, or not yet recorded,
        # at the fixed sleeps below when the spawner started it late on a loaded host).
        go = tmp_path / "go"
        pool.start(1, f"trap '' TERM; sleep 60 & while [ ! -e {go} ]; do sleep 0.02; done", tmp_path,
                   {"BALSAM_JOB_ID": "1"})
        _until(lambda: stale_run.read_run_record(tmp_path) is not None, "the run's record")
        record = stale_run.read_run_record(tmp_path)
        go.touch()
        # The first process ended and was reaped (gone from /proc); the child ignores SIGTERM.
        _until(lambda: spawner.proc_stat(record.pid) is None, f"the reap of the first process {record.pid}")
        leftovers = [int(e) for e in os.listdir("/proc")
                     if e.isdecimal() and (spawner.proc_stat(int(e)) or ("X", 0, 0))[1] == record.pid]
        assert leftovers, "the task's child should still run in its group"
        os.kill(pool.proc.pid, signal.SIGKILL)  # the spawner dies with its launcher
        time.sleep(0.2)
        assert stale_run.read_run_record(tmp_path) is not None, "the record went while the run's children ran"
        found = stale_run.end_stale_run(1, tmp_path, grace=0.5)
        assert found is not None and found.kind == "ended", found
        assert all((spawner.proc_stat(p) or ("X",))[0] in "ZX" for p in leftovers)
    finally:
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            pool.close()
        except Exception:
            pass


def test_a_run_the_launcher_reaps_itself_leaves_no_record(tmp_path: Path) -> None:
    from balsam.launcher.app_run import AppProcess

    (tmp_path / "job.out").write_bytes(b"")
    proc = AppProcess(3, "sleep 0.3", tmp_path, dict(os.environ))
    assert stale_run.read_run_record(tmp_path) is not None
    assert proc.wait(10) == 0
    assert stale_run.read_run_record(tmp_path) is None


def _trapping_runs(base: Path, count: int) -> list:
    owner = _dead_owner()
    runs = []
    for i in range(count):
        proc, started = _task(base / str(i), ["bash", "-c", "trap 'sleep 30' TERM; sleep 40 & wait"])
        _write(spawner.RunRecords(owner=owner), str(base / str(i) / "job.out"), str(base / str(i)), proc.pid, started, i)
        runs.append(proc)
    time.sleep(0.3)
    return runs


def test_stale_runs_of_a_batch_share_one_grace(tmp_path: Path) -> None:
    """Runs that trap SIGTERM: ended one prepare at a time, 3 of them held the acquire 3 graces."""
    runs = _trapping_runs(tmp_path, 3)
    try:
        began = time.monotonic()
        found = stale_run.end_stale_runs([(i, tmp_path / str(i)) for i in range(3)], grace=1.0)
        took = time.monotonic() - began
        assert {k: v.kind for k, v in found.items()} == {0: "ended", 1: "ended", 2: "ended"}
        assert took < 2.0, f"{took:.1f} s: one grace per run, not one for the batch"
        for proc in runs:
            assert proc.wait(5) is not None
    finally:
        for proc in runs:
            _kill_group(proc.pid)
            proc.wait()


def test_the_preparer_ends_a_batch_together_and_prepare_skips_those_jobs(tmp_path: Path, monkeypatch: Any) -> None:
    from balsam.launcher import app_run

    runs = _trapping_runs(tmp_path, 2)
    monkeypatch.setattr(stale_run, "STALE_RUN_GRACE_SEC", 1.0)
    monkeypatch.setattr(app_run, "end_stale_runs",
                        lambda items: stale_run.end_stale_runs(items, grace=1.0))
    calls = []
    monkeypatch.setattr(app_run, "end_stale_run", lambda *a, **k: calls.append(a))
    try:
        preparer = app_run.JobPreparer(tmp_path)
        began = time.monotonic()
        preparer.end_stale_runs([SimpleNamespace(id=i, workdir=str(i)) for i in range(2)])
        assert time.monotonic() - began < 2.0
        assert all(proc.wait(5) is not None for proc in runs)
        assert preparer._checked == {0, 1}
    finally:
        for proc in runs:
            _kill_group(proc.pid)
            proc.wait()


def test_a_pid_started_a_second_after_the_recorded_start_is_another_process(tmp_path: Path) -> None:
    """The spawn takes microseconds: the slack was 2 s, so a pid reused within 2 s was taken for the run."""
    proc, started = _task(tmp_path, ["sleep", "60"])
    try:
        _write(spawner.RunRecords(owner=_dead_owner()), str(tmp_path / "job.out"), str(tmp_path), proc.pid,
               started - 1.0, 1)
        assert stale_run.end_stale_run(1, tmp_path, grace=0.5).kind == "gone"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


_DENIED = textwrap.dedent("""
    import logging, os, sys
    logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
    from balsam.launcher import stale_run  # imported first: the interpreter's files may be root's alone
    os.setgid(65534); os.setuid(65534)
    found = stale_run.end_stale_run(1, sys.argv[1], grace=0.3)
    print("KIND", found and found.kind)
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to check as another user")
def test_a_run_another_user_owns_is_reported_as_permission_denied() -> None:
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="balsam-stale-run-"))  # pytest's is root's alone (0700)
    tmp_path.chmod(0o755)
    proc, started = _task(tmp_path, ["sleep", "60"])
    try:
        _write(spawner.RunRecords(owner=_dead_owner()), str(tmp_path / "job.out"), str(tmp_path), proc.pid, started, 1)
        out = subprocess.run([sys.executable, "-c", _DENIED, str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert "KIND denied" in out.stdout, out.stdout + out.stderr
        assert "permission denied" in out.stderr and "D state" not in out.stderr, out.stderr
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp_path, ignore_errors=True)

"""What a job can do to the launcher that runs it, and what the site's file system can do to a job.

- A NUL byte in a job's parameter or environment variable: no program can be given one, and
  ``posix_spawn`` raised ValueError in the spawner process, which died and took every other task's
  report with it (RUN_ERROR -1 "the spawner process exited unexpectedly", their processes left
  running). The launcher refuses such a job (FAILED, naming the parameter or variable); the spawner
  survives one that gets there anyway; and on any error of its own it ends its tasks before it exits.
- Processes a task leaves in its process group when its leader exits are ended (SIGTERM, then
  SIGKILL after the grace).
- A read-only (or full, failing) data directory: the jobs are given back unstarted, not FAILED, and
  the launcher stops acquiring after a few in a row (one ERROR naming the path and errno).
- Error texts: killed by a signal says so; a workdir removed says so; a tail line is clipped; a
  command line that is not UTF-8 is logged; a huge command line is logged clipped.

Real launchers against a real server where the launcher is involved; the pure pieces directly.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import events_of, make_runnable, wait_for_states

MODES = ["mpi", "serial"]
FINAL = {"RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT", "FAILED", "JOB_FINISHED", "POSTPROCESSED"}


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone_within(pids: list[int], timeout: float) -> bool:
    """Poll until none of ``pids`` runs (the timeout only keeps a broken run from hanging)."""
    deadline = time.monotonic() + timeout
    while any(map(_alive, pids)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _read_pids(paths: list[Path], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not all(p.exists() and p.read_text().strip() for p in paths):
        assert time.monotonic() < deadline, f"pid files not written: {paths}"
        time.sleep(0.05)
    return [int(p.read_text()) for p in paths]


def _logs(path: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (path / "log").glob("*"))


# -- F1: NUL bytes -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES)
def test_a_nul_in_a_parameter_or_variable_fails_that_job_alone(mode: str, new_site) -> None:
    """The NUL jobs are FAILED with the parameter's or variable's name; the job running beside them
    is untouched (it was RUN_ERROR -1, its process orphaned, when the spawner died of the NUL)."""
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Innocent(ApplicationDefinition):
        site = name
        command_template = "bash -c 'echo innocent-start; sleep 4; echo innocent-done'"

    class NulArg(ApplicationDefinition):
        site = name
        command_template = "echo {{ p }}"

    class NulEnv(ApplicationDefinition):
        site = name
        command_template = "bash -c 'echo $BADV'"
        environment_variables = {"BADV": "x\x00y"}

    class Long(ApplicationDefinition):
        site = name
        command_template = "echo {{ p }}"

    for app in (Innocent, NulArg, NulEnv, Long):
        app.sync()
    innocent = make_runnable([Innocent.submit(workdir="innocent", node_packing_count=4, save=False)])[0]
    proc = start_launcher(path, mode, 2)
    try:
        wait_for_states([innocent], {"RUNNING"}, timeout=60)
        bad = make_runnable([NulArg.submit(workdir="nul_arg", node_packing_count=4, p="a\x00b", save=False),
                             NulEnv.submit(workdir="nul_env", node_packing_count=4, save=False)])
        long = make_runnable([Long.submit(workdir="long", node_packing_count=4, p="y" * 20_000, save=False)])[0]
        jobs = wait_for_states([innocent, *bad, long], FINAL, timeout=60)
    finally:
        assert finish(proc) == 0
    assert str(jobs[innocent].state) in {"RUN_DONE", "JOB_FINISHED", "POSTPROCESSED"}, events_of([innocent])
    assert "innocent-done" in (path / "data/innocent/job.out").read_text()
    errors = {job_id: events_of([job_id])[job_id][-1] for job_id in bad}
    for job_id, reason in zip(bad, ["parameter 'p'", "environment variable 'BADV'"]):
        assert str(jobs[job_id].state) == "FAILED", errors[job_id]
        assert errors[job_id].from_state == "PREPROCESSED", errors[job_id]  # never started
        assert reason in errors[job_id].data["error"] and "NUL" in errors[job_id].data["error"], errors[job_id].data
    logs = _logs(path)
    assert "spawner process exited unexpectedly" not in logs
    # A 20,000-character argument is logged clipped (mpi mode logs every started command line).
    started = [ln for ln in logs.splitlines() if f"started job {long} " in ln]
    if mode == "mpi":
        assert started and all(len(ln) < 2_000 and "more characters)" in ln for ln in started), started


@pytest.fixture
def spawner_pool() -> Any:
    from balsam.launcher.runner import SpawnerPool

    pool = SpawnerPool(5, threading.Event())
    yield pool
    pool.close()


def _reap_until(pool: Any, count: int, timeout: float = 30.0, wake: "threading.Event | None" = None) -> list[Any]:
    """Reap until ``count`` tasks finished (the timeout only keeps a broken test from hanging)."""
    wake = wake or pool.wake
    done: list[tuple[int, int, str, float]] = []
    deadline = time.monotonic() + timeout
    while len(done) < count and time.monotonic() < deadline:
        wake.wait(0.1)
        wake.clear()
        done += pool.reap()
    return done


def test_the_spawner_survives_a_nul_that_reaches_it(spawner_pool: Any, tmp_path: Path) -> None:
    """A NUL the launcher did not refuse (a plugin's launch environment, say) fails that task alone."""
    pool = spawner_pool
    for name in ("ok", "nul_arg", "nul_env"):
        (tmp_path / name).mkdir()
    env = dict(os.environ)
    pool.start(1, "bash -c 'sleep 1; echo still-here'", tmp_path / "ok", env)
    pool.start(2, "echo a\x00b", tmp_path / "nul_arg", env)
    pool.start(3, "true", tmp_path / "nul_env", {**env, "BADV": "x\x00y"})
    done = {job_id: (rc, tail) for job_id, rc, tail, _ in _reap_until(pool, 3)}
    assert done[1] == (0, ""), done
    for job_id in (2, 3):
        rc, tail = done[job_id]
        assert rc != 0 and "could not start the job" in tail and "null" in tail, done
    assert "still-here" in (tmp_path / "ok" / "job.out").read_text()
    assert pool.proc.poll() is None  # the spawner still runs


def test_a_spawner_that_fails_ends_its_tasks_before_it_exits(spawner_pool: Any, tmp_path: Path) -> None:
    """Any error of the spawner's own (here a malformed request) ends its tasks: they were left
    running, orphans on CPUs the launcher then gave to other jobs."""
    pool = spawner_pool
    pid_file = tmp_path / "task.pid"
    pool.start(1, f"bash -c 'echo $$ > {pid_file}; exec sleep 300'", tmp_path, dict(os.environ))
    (pid,) = _read_pids([pid_file])
    try:
        pool._send(("s", 99))  # too few fields: the spawner's loop raises TypeError
        pool.proc.wait(30)
        assert _gone_within([pid], 20), "the task outlived its spawner"
    finally:
        _kill([pid])


def test_a_nul_in_the_command_line_is_refused_when_the_job_is_prepared(tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition
    from balsam.launcher.app_run import JobBuildError, JobPreparer

    class Echo(ApplicationDefinition):
        site = 1
        command_template = "echo {{ p }} {{ q }}"

    class Env(ApplicationDefinition):
        site = 1
        command_template = "true"
        environment_variables = {"GOOD": "1", "BADV": "x\x00y"}

    def job(**params: Any) -> Any:
        return types.SimpleNamespace(id=1, app_id=1, workdir="w", num_nodes=1, ranks_per_node=1, threads_per_rank=1,
                                     threads_per_core=1, gpus_per_rank=0, node_packing_count=1, launch_params={},
                                     parameters=params, serialized_parameters="", get_parameters=lambda: params)

    with pytest.raises(JobBuildError, match=r"parameter 'q' holds a NUL byte"):
        JobPreparer(tmp_path, load_app=lambda _app_id: Echo).prepare(job(p="fine", q="a\x00b"))
    with pytest.raises(JobBuildError, match=r"environment variable 'BADV' holds a NUL byte"):
        JobPreparer(tmp_path, load_app=lambda _app_id: Env).prepare(job())
    prepared = JobPreparer(tmp_path, load_app=lambda _app_id: Echo).prepare(job(p="a", q="b"))
    assert prepared.cmdline == "echo a b"


# -- F2: what a task leaves in its process group -------------------------------------------------------

LEFTOVERS = "bash -c '(sleep 301 & echo $! > bg1.pid); nohup sleep 302 >/dev/null 2>&1 & echo $! > bg2.pid; echo parent-exit'"


@pytest.mark.parametrize("kind", ["spawner", "in-process"])
def test_what_a_task_leaves_in_its_group_is_ended_when_it_exits(kind: str, tmp_path: Path) -> None:
    from balsam.launcher.runner import ProcessPool, SpawnerPool

    wake = threading.Event()
    pool = SpawnerPool(5, wake) if kind == "spawner" else ProcessPool(5, wake=wake)
    pids: list[int] = []
    try:
        pool.start(1, LEFTOVERS, tmp_path, dict(os.environ))
        done = _reap_until(pool, 1, wake=wake)
        assert [(j, rc) for j, rc, _, _ in done] == [(1, 0)]
        pids = _read_pids([tmp_path / "bg1.pid", tmp_path / "bg2.pid"])
        # The pool's own loop sends the SIGKILLs after the grace (reap calls in the in-process pool).
        deadline = time.monotonic() + 30
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            wake.wait(0.1)
            pool.reap()
        assert not any(map(_alive, pids)), "the task's background processes outlived it"
    finally:
        _kill(pids)
        if kind == "spawner":
            pool.close()
        else:
            pool.terminate_all(1.0)


@pytest.mark.slow
def test_a_serial_job_leaves_nothing_running_after_the_launcher(new_site) -> None:
    """The audit's case: RUN_DONE at once, and its two sleeps were alive after the launcher exited."""
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)

    class Leaves(ApplicationDefinition):
        site = name
        command_template = LEFTOVERS

    Leaves.sync()
    ids = make_runnable([Leaves.submit(workdir="leaves", save=False)])
    proc = start_launcher(path, "serial", 2)
    pids: list[int] = []
    try:
        wait_for_states(ids, FINAL, timeout=60)
        assert finish(proc) == 0
        pids = _read_pids([path / "data/leaves/bg1.pid", path / "data/leaves/bg2.pid"])
        assert _gone_within(pids, 15), "the job's background processes outlived the launcher"
    finally:
        _kill(pids)


# -- F3: the site's file system fails the workdirs ---------------------------------------------------

def test_site_faults_trip_after_a_few_in_a_row_and_a_success_resets_them(caplog: pytest.LogCaptureFixture) -> None:
    import errno

    from balsam.launcher.app_run import SiteFaults, WorkdirUnavailable

    def fault(path: str) -> WorkdirUnavailable:
        return WorkdirUnavailable(f"cannot create {path}", path, OSError(errno.EROFS, "Read-only file system", path))

    faults = SiteFaults(limit=3)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.app_run"):
        faults.fault(1, fault("/d/1"))
        faults.fault(2, fault("/d/2"))
        faults.ok()
        faults.fault(3, fault("/d/3"))
        faults.fault(4, fault("/d/4"))
        assert not faults.tripped
        faults.fault(5, fault("/d/5"))
        assert faults.tripped
        faults.fault(6, fault("/d/6"))
    assert faults.given_back == [1, 2, 3, 4, 5, 6]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "/d/5" in errors[0] and "errno 30" in errors[0], errors


def _mount_readonly_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(path)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr.decode(errors='replace').strip()}")


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES)
def test_a_read_only_data_directory_gives_the_jobs_back(mode: str, new_site) -> None:
    """Every job used to end FAILED ("Read-only file system"): the queue emptied. Now none is
    touched, the launcher stops acquiring after a few and ends when idle, and the jobs are
    runnable again once it is gone (its Session's release)."""
    from balsam.api import ApplicationDefinition, Job

    name, path = new_site(idle_ttl_sec=2)

    class Hello(ApplicationDefinition):
        site = name
        command_template = "echo hello"

    Hello.sync()
    ids = make_runnable([Hello.submit(workdir=f"w{i}", save=False) for i in range(8)])
    data = path / "data"
    _mount_readonly_tmpfs(data)
    try:
        proc = start_launcher(path, mode, 2)
        assert finish(proc, 90) == 0
    finally:
        subprocess.run(["umount", str(data)])
    jobs = {j.id: j for j in Job.objects.filter(id=ids)}
    assert {str(j.state) for j in jobs.values()} == {"PREPROCESSED"}, {i: events_of([i])[i][-1] for i in ids}
    logs = _logs(path)
    errors = [ln for ln in logs.splitlines() if "ERROR" in ln and "file system fails job workdirs" in ln]
    assert errors and "errno 30" in errors[0] and str(data) in errors[0], errors
    assert "FAILED" not in logs


# -- F4-F7: what errors and logs say -------------------------------------------------------------------

def _ended(tmp_path: Path, rc: int, output: "str | None") -> Any:
    from balsam.launcher.runner import finished_record
    from balsam.util import tail_file

    if output is not None:
        (tmp_path / "job.out").write_text(output)
    proc = types.SimpleNamespace(job_id=7, returncode=rc, workdir=tmp_path, end_time=1.0,
                                 tail=lambda n: tail_file(tmp_path / "job.out", n))
    return finished_record(proc, 5)


def test_a_job_killed_by_a_signal_says_so(tmp_path: Path) -> None:
    assert _ended(tmp_path, -9, "working\n")[2] == "working\nkilled by signal SIGKILL (9) (out of memory?)"
    assert _ended(tmp_path, -11, "")[2] == "killed by signal SIGSEGV (11)"
    assert _ended(tmp_path, 3, "plain failure\n")[2] == "plain failure"
    assert _ended(tmp_path, -1, "status lost\n")[2] == "status lost"  # -1: the pools' "unknown", not SIGHUP


def test_a_job_whose_workdir_is_gone_says_so(tmp_path: Path) -> None:
    gone = tmp_path / "removed"
    assert _ended(gone, 4, None)[2] == f"job.out missing: workdir {gone} no longer exists"


def test_a_tail_line_is_clipped(tmp_path: Path) -> None:
    from balsam.util import MAX_TAIL_LINE_CHARS, clip, tail_file

    (tmp_path / "job.out").write_text("short\n" + "x" * 64_000 + "\nlast\n")
    lines = tail_file(tmp_path / "job.out", 3).splitlines()
    assert lines[0] == "short" and lines[2] == "last"
    assert lines[1] == "x" * MAX_TAIL_LINE_CHARS + f"... ({64_000 - MAX_TAIL_LINE_CHARS} more characters)"
    assert clip("abc", 5) == "abc" and clip("abcdef", 2) == "ab... (4 more characters)"


def test_log_handlers_write_text_that_is_not_utf8(tmp_path: Path) -> None:
    """A command line with undecodable bytes (surrogate escapes) raised UnicodeEncodeError in both
    handlers: a traceback on the console and the line lost."""
    from balsam.config.schema import LoggingSettings
    from balsam.launcher.entry import ConsoleHandler
    from balsam.util import log_file_handler

    record = logging.LogRecord("balsam.test", logging.ERROR, __file__, 1, "started job %s: %s", (3, "echo bad\udcffbyte"),
                               None)
    file_handler = log_file_handler(tmp_path / "x.log", LoggingSettings(buffer_num_records=1, flush_period=0))
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    console = ConsoleHandler(stream)
    failures: list[BaseException] = []
    for handler in (file_handler, console):
        handler.handleError = lambda rec, failures=failures: failures.append(__import__("sys").exc_info()[1])  # type: ignore[method-assign]
        handler.handle(record)
        handler.flush()
    file_handler.close()
    assert not failures, failures
    assert "echo bad\\udcffbyte" in (tmp_path / "x.log").read_text()
    assert "echo bad\\udcffbyte" in stream.buffer.getvalue().decode()  # type: ignore[attr-defined]


def test_a_parallel_file_systems_hiccups_are_site_faults() -> None:
    import errno

    from balsam.launcher.app_run import SITE_FAULT_ERRNOS

    assert {errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EMFILE} <= SITE_FAULT_ERRNOS

"""The local queue answers "no jobs" (a fresh state directory) only where it truly is one.

The agent's scheduler module ends a BatchJob whose job "left the queue and has no history record"
(3 polls): a queue command that answers ``{}`` / ``null`` with exit status 0 for a state directory
it cannot see ends the BatchJobs of launchers that still run. Before:

- a state directory reached through a dangling symlink (scratch or NFS not mounted, a symlinked
  $BALSAM_HOME), or whose path is a regular file: ``status`` printed ``{}``, ``history`` null, exit 0
  (``Path.exists`` is False for those too);
- ``jobs.json`` and its lock deleted while a job ran: the same, its wrapper still running;
- the lock held by another queue command past its timeout, or ``cannot lock`` (ENOLCK: an NFS lock
  server): exit status 2, which the local scheduler reads as a refusal for good (``submit_failed``
  on the first try).

Now each is one line and exit status 1, a try like any other. Real components: the queue's own
entry point (``main``) on real directories, symlinks and processes; a real flock held by filelock.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
from filelock import FileLock

from balsam.builtin import local_queue
from balsam.builtin.local_scheduler import STATE_DIR_ENV, LocalScheduler
from balsam.scheduler import SchedulerError
from local_queue_testlib import count_scans, running_sleep_job  # tests/local_queue_testlib.py


def run(capsys: Any, state_dir: Path, *args: str) -> tuple[int, str, list[str]]:
    """The queue command's entry point: (exit status, stdout, stderr lines)."""
    code = local_queue.main(["--state-dir", str(state_dir), *args])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


READS = (("status",), ("history", "5"), ("find", "/nowhere/job.sh", "--name", "bj"), ("delete", "5"))


def assert_one_line_try(capsys: Any, state_dir: Path, says: str) -> None:
    """Every command that reads answers exit status 1 and ``says``, printing nothing on stdout."""
    for args in READS:
        code, out, err = run(capsys, state_dir, *args)
        assert (code, out, err) == (1, "", [f"local queue: {says}"]), args


def test_a_state_dir_behind_a_dangling_symlink_or_a_file_is_not_fresh(tmp_path: Path, capsys: Any) -> None:
    target = tmp_path / "scratch" / "lq"
    target.mkdir(parents=True)
    (target / "jobs").mkdir()
    (target / "jobs.json").write_text(json.dumps({"jobs": {}, "next_id": 5}))
    link = tmp_path / "link"
    link.symlink_to(target)
    assert run(capsys, link, "status")[:2] == (0, "{}\n")  # reachable: its records

    (tmp_path / "scratch").rename(tmp_path / "unmounted")  # the file system behind the link is gone
    assert_one_line_try(capsys, link, f"the state directory {link} is not reachable: {link} is a symlink to "
                                      f"'{target}' (No such file or directory): not mounted?")
    # The local scheduler's own poll (its default state directory, as $BALSAM_HOME gives it): a
    # failed poll, not an empty queue.
    with pytest.MonkeyPatch.context() as env:
        env.setenv(STATE_DIR_ENV, str(link))
        with pytest.raises(SchedulerError) as info:
            LocalScheduler().get_statuses()
    assert info.value.permanent is False and info.value.no_room is False and "not mounted?" in str(info.value)
    # A dangling symlink further up (a symlinked $BALSAM_HOME whose target is gone).
    home = tmp_path / "home"
    home.symlink_to(tmp_path / "scratch")
    gone = (f"the state directory {home / 'lq'} is not reachable: {home} is a symlink to "
            f"'{tmp_path / 'scratch'}' (No such file or directory): not mounted?")
    assert_one_line_try(capsys, home / "lq", gone)
    code, out, err = run(capsys, home / "lq", "submit", str(tmp_path / "job.sh"))
    assert code == 2 and "does not exist" in err[0]  # the script's own refusal comes first
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    code, out, err = run(capsys, home / "lq", "submit", str(script))
    assert code == 1 and err == [f"local queue: {gone}"]  # nothing made behind the dangling link
    assert not (tmp_path / "scratch").exists()

    # A regular file where the state directory is, or where one of its parents is.
    afile = tmp_path / "afile"
    afile.write_text("hello\n")
    assert_one_line_try(capsys, afile, f"the state directory {afile} is not a directory")
    assert_one_line_try(capsys, afile / "lq", f"cannot use the state directory {afile / 'lq'}: Not a directory")
    code, out, err = run(capsys, afile, "submit", str(script))
    assert code == 1 and err == [f"local queue: the state directory {afile} cannot be made: {afile} is not a directory"]

    # One truly not there (its nearest existing parent a directory, through a live symlink too) is
    # fresh: no jobs, nothing made.
    (tmp_path / "unmounted").rename(tmp_path / "scratch")
    for fresh in (tmp_path / "new" / "lq", home / "other"):
        assert run(capsys, fresh, "status") == (0, "{}\n", [])
        assert run(capsys, fresh, "history", "5") == (0, '{"5": null}\n', [])
        assert not fresh.exists()


@pytest.fixture
def wiped(tmp_path: Path, capsys: Any) -> Iterator[tuple[Path, int, int]]:
    """A state directory with a job running (``sleep``), its jobs.json and lock then deleted:
    (state dir, job id, the wrapper's pid), the job's process group killed at the end."""
    with running_sleep_job(tmp_path, capsys) as (state, _script, job_id, pid):
        (state / "jobs.json").unlink()
        (state / "jobs.json.lock").unlink()
        yield state, job_id, pid


def test_records_deleted_while_a_job_runs_are_not_a_fresh_directory(wiped: tuple[Path, int, int], capsys: Any) -> None:
    state, job_id, pid = wiped
    says = (f"{state / 'jobs.json'} and its lock are missing but the wrapper of job {job_id} (pid {pid}) still "
            f"runs: the records were deleted; restore them, or end those jobs and move {state} aside")
    assert_one_line_try(capsys, state, says)
    assert (state / "jobs").is_dir() and not (state / "jobs.json.lock").exists()  # nothing made

    # The job ended since (its wrapper gone): its exit file tells of it.
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    (state / "jobs" / f"{job_id}.exit").write_text("0 1\n")
    assert_one_line_try(capsys, state, f"{state / 'jobs.json'} and its lock are missing but 1 job files in "
                                       f"{state / 'jobs'} ({job_id}.exit): the records were deleted; restore them, "
                                       f"or end those jobs and move {state} aside")
    # Moved aside (the line's advice), the directory is fresh again; so is one whose jobs/ holds
    # nothing of a job.
    (state / "jobs" / f"{job_id}.exit").rename(state / "jobs" / "notes.txt")
    assert run(capsys, state, "status") == (0, "{}\n", [])


def test_the_lock_held_too_long_or_refused_is_a_try_not_a_refusal(tmp_path: Path, capsys: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "lq"
    local_queue.LocalQueue(state)
    (state / "jobs.json").write_text(json.dumps({"jobs": {}, "next_id": 5}))
    monkeypatch.setattr(local_queue, "LOCK_TIMEOUT_SEC", 0.1)
    lock = state / "jobs.json.lock"
    with FileLock(str(lock)):
        for args in READS:
            code, out, err = run(capsys, state, *args)
            assert (code, err) == (1, [f"local queue: {lock} is held by another queue command for more than 0.1 s"])

    def no_lock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(local_queue.fcntl, "flock", no_lock)
    code, out, err = run(capsys, state, "status")
    assert (code, err) == (1, [f"local queue: cannot lock {lock}: {os.strerror(errno.ENOLCK)}"])
    # A refusal for good is still 2 (an unknown job).
    monkeypatch.undo()
    assert run(capsys, state, "delete", "5") == (2, "", ["local queue: no local job 5"])


def test_submit_refuses_to_recreate_records_deleted_while_a_job_runs(wiped: tuple[Path, int, int], tmp_path: Path,
                                                                     capsys: Any) -> None:
    """Before: submit made jobs.json afresh (exit 0), after which status listed only the new job
    and history answered null for the one still running: the agent ended its launcher's BatchJob."""
    state, job_id, pid = wiped
    says = (f"{state / 'jobs.json'} and its lock are missing but the wrapper of job {job_id} (pid {pid}) still "
            f"runs: the records were deleted; restore them, or end those jobs and move {state} aside")
    other = tmp_path / "other.sh"
    other.write_text("#!/bin/sh\nexit 0\n")  # (before the fix it ran: nothing left running)
    other.chmod(0o755)
    assert run(capsys, state, "submit", str(other)) == (1, "", [f"local queue: {says}"])
    assert not (state / "jobs.json").exists() and not (state / "jobs.json.lock").exists()  # nothing made
    assert_one_line_try(capsys, state, says)  # status, history, ... still refuse
    # jobs.json alone deleted (the lock file still there): refused under the lock, nothing made.
    (state / "jobs.json.lock").touch()
    says = says.replace("and its lock are missing", "is missing")  # the line names only what is gone
    assert run(capsys, state, "submit", str(other)) == (1, "", [f"local queue: {says}"])
    assert not (state / "jobs.json").exists()


def test_a_directory_no_wrapper_was_started_from_is_not_scanned(tmp_path: Path, capsys: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: every status poll of a state directory holding only an empty jobs/ (a first submit
    that failed before its lock, e.g. no room) looked at every process of the user."""
    scans = count_scans(monkeypatch)
    state = tmp_path / "lq"
    (state / "jobs").mkdir(parents=True)
    assert run(capsys, state, "status") == (0, "{}\n", [])
    assert run(capsys, state, "history", "5") == (0, '{"5": null}\n', [])
    assert scans == []
    # Once submit started a wrapper here (its marker), a directory without records is scanned.
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    code, out, err = run(capsys, state, "submit", str(script))
    assert code == 0, err
    pid = json.loads((state / "jobs.json").read_text())["jobs"][out.strip()]["pid"]
    os.waitpid(pid, 0)  # our child: submit ran in this process
    assert (state / "jobs" / ".started").exists()
    for name in ("jobs.json", "jobs.json.lock", f"jobs/{out.strip()}.exit"):
        (state / name).unlink()
    assert run(capsys, state, "status") == (0, "{}\n", [])
    assert scans == [state]


def test_a_first_submit_racing_a_status_poll_is_not_missing_records(tmp_path: Path, capsys: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Status looks for the lock and jobs.json, then scans for wrappers: a first submit that made
    them and started its wrapper in between made a healthy queue answer exit 1 (before)."""
    state = tmp_path / "lq"
    (state / "jobs").mkdir(parents=True)
    (state / "jobs" / ".started").touch()  # left by the racing submit before its wrapper started
    record = {"pid": os.getpid(), "create_time": 0.0, "state": "running"}

    def racing_submit(self: local_queue.LocalQueue) -> list[tuple[int, int]]:
        # What the concurrent first submit did meanwhile: its lock, its records, its wrapper.
        (state / "jobs.json.lock").touch()
        (state / "jobs.json").write_text(json.dumps({"jobs": {"7": record}, "next_id": 8}))
        return [(7, os.getpid())]

    monkeypatch.setattr(local_queue.LocalQueue, "_live_wrappers", racing_submit)
    code, out, err = run(capsys, state, "history", "7")
    assert (code, err) == (0, []) and json.loads(out)["7"] is not None

"""A run that ends nonzero while the file system of its workdir is full failed for the site's
fault (its app could not write), not its own: it is reported RUN_TIMEOUT (the default
handle_timeout makes it RESTART_READY: it runs again), not RUN_ERROR (which the default
handle_error FAILED: a full ``data/`` failed the whole backlog in seconds), and the launcher stops
acquiring jobs until the file system has room again (balsam.launcher.runner.DiskWait).

The full disk is injected at ``os.statvfs`` for the workdir's path only (the real call for every
other path); the exits go through the real :func:`finished_record` and :func:`report_exit`, and
the pause through the real prefetch thread's loop, run on the test's thread.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from balsam.launcher import runner
from balsam.launcher.prefetch import Prefetcher
from balsam.states import JobState
from test_prefetch_release_units import Job, Lease, prepared


class Updater:
    def __init__(self) -> None:
        self.puts: list[tuple[int, JobState, dict]] = []

    def put(self, job_id: int, state: JobState, state_timestamp: Any = None, state_data: Optional[dict] = None,
            **fields: Any) -> None:
        self.puts.append((job_id, state, state_data or {}))


class Proc:
    """An ended task as the pools hand it to finished_record."""

    def __init__(self, job_id: int, workdir: Path, returncode: int, output: str) -> None:
        self.job_id, self.workdir, self.returncode, self.output = job_id, workdir, returncode, output

    def tail(self, n: int) -> str:
        return self.output


class Disk:
    """``os.statvfs`` with the file systems of the paths under ``full`` reading as full."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full: list[Path] = []
        self.real = os.statvfs
        monkeypatch.setattr(os, "statvfs", self)

    def __call__(self, path: Any) -> os.statvfs_result:
        st = self.real(path)
        if any(Path(path).is_relative_to(p) for p in self.full):
            return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, st.f_files, st.f_ffree,
                                      st.f_favail, st.f_flag, st.f_namemax))
        return st


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    wait = getattr(runner, "disk_wait", None)  # the process's one (the modes imported it), fresh for each test
    if wait is not None:
        wait.__init__()
    yield Disk(monkeypatch)
    if wait is not None:
        wait.__init__()


def _exit(job_id: int, workdir: Path, rc: int, output: str, updater: Updater) -> tuple[int, JobState, dict]:
    job_id, rc, tail, when = runner.finished_record(Proc(job_id, workdir, rc, output), 10)
    runner.report_exit(updater, job_id, rc, tail, when)
    return updater.puts[-1]


def test_a_run_ending_on_a_full_workdir_disk_runs_again_and_pauses_acquiring(
        tmp_path: Path, disk: Disk, caplog: pytest.LogCaptureFixture) -> None:
    updater = Updater()
    disk.full.append(tmp_path)
    with caplog.at_level(logging.INFO, logger="balsam.launcher.runner"):
        for job_id in (1, 2, 3):
            _id, state, data = _exit(job_id, tmp_path, 1, "write: No space left on device", updater)
            assert state == JobState.run_timeout, data
            assert f"the file system of {tmp_path} has 0 bytes free" in data["reason"]
            assert "runs again once there is room" in data["reason"]
    # One line per exit (the job's), and the pause logged once, not once per job.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "no more jobs are acquired" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert str(tmp_path) in warnings[0].getMessage() and "0 bytes free" in warnings[0].getMessage()
    assert runner.disk_wait.paused()
    runner.DISK_RECHECK_SEC, saved = 0.0, runner.DISK_RECHECK_SEC
    try:
        assert runner.disk_wait.paused(), "still full: still paused"
        disk.full.clear()  # room again
        with caplog.at_level(logging.INFO, logger="balsam.launcher.runner"):
            assert not runner.disk_wait.paused()
    finally:
        runner.DISK_RECHECK_SEC = saved
    assert "has room again" in caplog.records[-1].getMessage() and "3 runs were given back" in caplog.records[-1].getMessage()


def test_a_run_that_fails_with_room_on_its_disk_is_unchanged(tmp_path: Path, disk: Disk) -> None:
    """Its own failure: RUN_ERROR (the default handle_error fails it), no pause; also a job that
    printed "No space left" about another file system (full), and one that printed balsam's own
    note about its workdir while that has room (the fact is finished_record's statvfs, not the text)."""
    updater = Updater()
    elsewhere = tmp_path / "scratch"
    elsewhere.mkdir()
    disk.full.append(elsewhere)
    workdir = tmp_path / "w"
    workdir.mkdir()
    for output in ("Traceback: ValueError", f"cp: error writing '{elsewhere}/x': No space left on device",
                   f"No space left on device: the file system of {workdir} has 0 bytes free"):
        _id, state, data = _exit(5, workdir, 1, output, updater)
        assert state == JobState.run_error, (output, data)
        assert data["error"] == output
    assert not getattr(runner, "disk_wait", None) or not runner.disk_wait.paused()
    _id, state, _data = _exit(6, workdir, 0, "", updater)
    assert state == JobState.run_done


def test_a_quick_failure_relaunched_on_a_full_disk_is_still_given_back(tmp_path: Path, disk: Disk) -> None:
    """Serial mode's relaunch note comes after the full disk's: the exit is still the disk's."""
    disk.full.append(tmp_path)
    job_id, rc, tail, when = runner.finished_record(Proc(9, tmp_path, 1, "oops"), 10)
    (record,) = runner._note_relaunches([(job_id, rc, tail, when)], {9: 3}, runner.relaunch_rule())
    updater = Updater()
    runner.report_exit(updater, *record)
    assert updater.puts[-1][1] == JobState.run_timeout


def test_the_prefetcher_acquires_nothing_while_the_disk_is_full(tmp_path: Path, disk: Disk,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefetch thread's loop (on the test's thread) asks for no job while paused, and acquires
    again once the file system has room; the acquire then stops it."""
    disk.full.append(tmp_path)
    runner.report_exit(Updater(), *runner.finished_record(Proc(1, tmp_path, 1, ""), 10))
    lease = Lease()
    turns = {"paused": 0, "acquired_while_full": 0}
    real_paused = runner.disk_wait.paused

    def paused() -> bool:
        answer = real_paused()
        if answer:
            turns["paused"] += 1
            if turns["paused"] == 3:  # a few turns paused, then room
                turns["exhausted_while_paused"] = f.exhausted  # a pause, not the end of the launcher's work
                disk.full.clear()
                monkeypatch.setattr(runner, "DISK_RECHECK_SEC", 0.0)
        return answer

    monkeypatch.setattr(runner.disk_wait, "paused", paused)

    def acquire(count: int, **kw: Any) -> list[Job]:
        if disk.full:
            turns["acquired_while_full"] += 1
        f.stop()
        return []

    lease.acquire = acquire  # type: ignore[method-assign]
    f = Prefetcher(lambda: lease, lambda job: prepared(job.id), lambda demand: None, None, depth=4,
                   remaining_min=lambda: 60, retry_sec=0.0)
    f._run()
    # Exhausted while paused (nothing comes): a serial launcher ends at its idle time on a full disk.
    assert turns == {"paused": 3, "acquired_while_full": 0, "exhausted_while_paused": True}


def test_the_mpi_mode_asks_for_no_job_while_the_disk_is_full(tmp_path: Path, disk: Disk) -> None:
    from balsam.launcher.app_run import SiteFaults
    from balsam.launcher.modes import mpi

    disk.full.append(tmp_path)
    runner.report_exit(Updater(), *runner.finished_record(Proc(1, tmp_path, 1, ""), 10))

    class Loop:
        site_faults = SiteFaults()

    # The gate is the first thing _request_for looks at: nothing else of the loop is needed.
    assert mpi.MPIMode._request_for(Loop(), {}, running=False) is None  # type: ignore[arg-type]


def test_a_forged_disk_note_or_a_pseudo_file_system_pauses_nothing(tmp_path: Path, disk: Disk) -> None:
    """The disk fact is the statvfs of the job's own workdir, carried beside the tail: a job whose
    last line is balsam's note naming a full file system (not its workdir's), or /proc, /sys,
    /dev/pts (no blocks: not a file system that fills), fails as itself and pauses nothing."""
    full = tmp_path / "full"
    full.mkdir()
    disk.full.append(full)
    workdir = tmp_path / "w"
    workdir.mkdir()
    updater = Updater()
    for path in (full, "/proc", "/sys", "/dev/pts"):
        output = f"ValueError\nNo space left on device: the file system of {path} has 0 bytes free"
        _id, state, data = _exit(5, workdir, 1, output, updater)
        assert state == JobState.run_error, (path, data)
        runner.report_exit(updater, 5, 1, output)  # a plain tail (as from any other path): the same
        assert updater.puts[-1][1] == JobState.run_error, path
    assert not runner.disk_wait.paused()
    for path in ("/proc", "/sys", "/dev/pts"):
        assert runner.disk_full_note(path) == "", path


def test_the_disk_fact_survives_a_worker_ranks_report_and_a_relaunch_note(tmp_path: Path, disk: Disk) -> None:
    """A serial worker rank's exits reach the master pickled (mpi4py): the fact goes with them."""
    disk.full.append(tmp_path)
    record = runner.finished_record(Proc(3, tmp_path, 1, "oops"), 10)
    (record,) = runner._note_relaunches([pickle.loads(pickle.dumps(record))], {3: 1}, runner.relaunch_rule())
    assert record[2].disk_full == (str(tmp_path), runner.disk_full_note(tmp_path))
    updater = Updater()
    runner.report_exit(updater, *record)
    assert updater.puts[-1][1] == JobState.run_timeout


def test_a_launcher_started_on_a_full_disk_acquires_nothing_and_says_so_once(tmp_path: Path, disk: Disk,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """watch() before the first acquire: a new launcher on a still-full disk (a job that filled it
    itself would run, fill it and be given back, launcher after launcher) leases nothing and is
    exhausted (it ends at its idle time); the BatchJob hears once at the pause and once at its end,
    not once per run given back."""
    disk.full.append(tmp_path)
    notes: list[str] = []
    runner.disk_wait.watch(tmp_path, notes.append)
    assert runner.disk_wait.paused() and len(notes) == 1 and notes[0].startswith("paused at ") and str(tmp_path) in notes[0]
    for job_id in (1, 2):
        runner.report_exit(Updater(), *runner.finished_record(Proc(job_id, tmp_path, 1, ""), 10))
    assert len(notes) == 1
    lease = Lease()
    acquired: list[int] = []
    turns = [0]
    real_paused = runner.disk_wait.paused

    def paused() -> bool:
        turns[0] += 1
        if turns[0] == 3:
            f.stop()
        return real_paused()

    monkeypatch.setattr(runner.disk_wait, "paused", paused)
    lease.acquire = lambda count, **kw: acquired.append(count) or []  # type: ignore[method-assign]
    f = Prefetcher(lambda: lease, lambda job: prepared(job.id), lambda demand: None, None, depth=4,
                   remaining_min=lambda: 60, retry_sec=0.0)
    f._run()
    assert acquired == [] and f.exhausted
    monkeypatch.setattr(runner, "DISK_RECHECK_SEC", 0.0)
    disk.full.clear()
    assert not real_paused()
    assert len(notes) == 2 and notes[1].startswith("resumed at ") and "2 runs given back" in notes[1]
    runner.disk_wait.watch(tmp_path)  # room: no pause
    assert not real_paused() and len(notes) == 2

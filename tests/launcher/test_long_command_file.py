"""A shell line over Linux's 128 KiB cap on one exec argument runs as ``bash FILE`` from a script in
the job's workdir (:func:`balsam.launcher.app_run.shell_argv`): one file per start (jobs sharing a
workdir, or a re-run beside a run that goes on, never run each other's line), owner-only (the line
carries the job's ``export K=V`` environment), removed by the script itself as it runs, and by the
spawner when it never runs (dropped) or must run again (a relaunch writes it back)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from balsam.launcher import spawner
from balsam.launcher.app_run import shell_argv
from balsam.launcher.runner import ProcessPool, SpawnerPool

#: Shell syntax ($, ;, >) makes the line go through bash; the filler makes it too long for ``bash -c``.
FILLER = "y" * 140_000


def _long_line(exit_code: int = 0) -> str:
    return f'printf "%s\\n" "$LONG_LINE_VALUE" >> runs.txt; : {FILLER}; exit {exit_code}'


def _scripts(workdir: Path) -> list[str]:
    return sorted(p.name for p in workdir.iterdir() if p.name.startswith(".balsam_command"))


def _wait(pool: Any, count: int, timeout: float = 30.0) -> list[tuple[int, int, str, float]]:
    done: list[tuple[int, int, str, float]] = []
    deadline = time.monotonic() + timeout
    while len(done) < count and time.monotonic() < deadline:
        pool.wake.wait(0.1)
        pool.wake.clear()
        done += pool.reap()
    return done


def _pool(kind: str, relaunch: bool = False) -> Any:
    wake = threading.Event()
    if kind == "in-process":
        pool = ProcessPool(5, wake=wake, relaunch_quick_failures=relaunch)
        pool.wake = wake
        return pool
    # mpi mode's spawner keeps SIGPIPE ignored, serial mode's relaunches: both kinds of pool.
    return SpawnerPool(5, wake, sigpipe_ignored=kind == "spawner (mpi mode)", relaunch_quick_failures=relaunch)


def _close(pool: Any) -> None:
    if isinstance(pool, SpawnerPool):
        pool.close()
    else:
        pool.terminate_all(1.0)


def test_two_long_lines_in_one_workdir_get_their_own_owner_only_files(tmp_path: Path) -> None:
    first = shell_argv(f"echo one {FILLER}", str(tmp_path), "export SECRET_TOKEN=abc;")
    second = shell_argv(f"echo two {FILLER}", str(tmp_path), "export SECRET_TOKEN=abc;")
    assert first[0] == second[0] == "/bin/bash" and len(first) == len(second) == 2
    assert first[1] != second[1], "two jobs sharing a workdir wrote one script"
    for argv, word in ((first, "one"), (second, "two")):
        assert stat.S_IMODE(os.stat(argv[1]).st_mode) == 0o600  # the line carries the job's environment
        assert f"export SECRET_TOKEN=abc; echo {word} y" in Path(argv[1]).read_text()
    assert len(_scripts(tmp_path)) == 2  # no half-written leftovers


@pytest.mark.parametrize("kind", ["in-process", "spawner (serial mode)", "spawner (mpi mode)"])
def test_a_long_line_runs_and_its_script_is_gone_after_the_run(kind: str, tmp_path: Path) -> None:
    pool = _pool(kind)
    try:
        env = dict(os.environ, LONG_LINE_VALUE="ran")  # an export prefix (in-process) or env_set (spawner)
        pool.start(1, _long_line(), tmp_path, env)
        [(job_id, rc, tail, _)] = _wait(pool, 1)
        assert (job_id, rc) == (1, 0), tail
        assert (tmp_path / "runs.txt").read_text() == "ran\n"
        assert _scripts(tmp_path) == []
    finally:
        _close(pool)


@pytest.mark.parametrize("kind", ["in-process", "spawner (serial mode)"])
def test_a_relaunched_long_line_runs_again_each_time(kind: str, tmp_path: Path) -> None:
    """Serial mode relaunches a quick failure with the same argv: the script, gone after the first
    run, is written again (exit 1 is one of the relaunched codes: 4 runs in all)."""
    pool = _pool(kind, relaunch=True)
    try:
        pool.start(1, _long_line(exit_code=1), tmp_path, dict(os.environ, LONG_LINE_VALUE="again"))
        [(job_id, rc, tail, _)] = _wait(pool, 1)
        assert (job_id, rc) == (1, 1), tail
        assert (tmp_path / "runs.txt").read_text() == "again\n" * 4
        assert _scripts(tmp_path) == []
    finally:
        _close(pool)


def test_a_dropped_queued_long_line_leaves_no_script(tmp_path: Path) -> None:
    pool = _pool("spawner (serial mode)")
    ahead, behind = tmp_path / "ahead", tmp_path / "behind"
    ahead.mkdir()
    behind.mkdir()
    try:
        env = dict(os.environ)
        pool.start(1, "sleep 30", ahead, env)
        assert pool.queue_after(1, 2, _long_line(), behind, env)
        assert len(_scripts(behind)) == 1  # written by the launcher when it sends the request
        pool.cancel(2)
        deadline = time.monotonic() + 20
        dropped: list[int] = []
        while not dropped and time.monotonic() < deadline:
            pool.wake.wait(0.1)
            pool.wake.clear()
            pool.reap()
            dropped += pool.take_dropped()
        assert dropped == [2]
        assert _scripts(behind) == [] and not (behind / "runs.txt").exists()
        # And one still queued when the pool stops.
        assert pool.queue_after(1, 3, _long_line(), behind, env)
        pool.terminate_all(1.0)
        assert _scripts(behind) == []
    finally:
        _close(pool)


def test_a_queued_long_line_given_back_at_once_leaves_no_script(tmp_path: Path) -> None:
    """A request to queue behind a task the spawner does not know (ended long ago, or by a stop
    signal, or the deadline passed) is given back ("d"): its script must go with it."""
    [shell, script] = shell_argv(_long_line(), str(tmp_path), job_id=5)
    read_fd, write_fd = os.pipe()
    try:
        sp = spawner.Spawner(read_fd, write_fd)
        sp.queue(999, 5, [shell, script], str(tmp_path), str(tmp_path / "job.out"), {}, [])
        assert sp.events == [("d", 5)]
        assert _scripts(tmp_path) == []
        os.close(sp.devnull)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_the_scripts_of_tasks_queued_when_the_spawner_dies_are_removed(tmp_path: Path) -> None:
    pool = _pool("spawner (serial mode)")
    ahead, behind = tmp_path / "ahead", tmp_path / "behind"
    ahead.mkdir()
    behind.mkdir()
    try:
        env = dict(os.environ)
        pool.start(1, "sleep 3", ahead, env)  # outlives the spawner (its own session) for 3 s at most
        assert pool.queue_after(1, 2, _long_line(), behind, env)
        assert len(_scripts(behind)) == 1
        os.kill(pool.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        dropped: list[int] = []
        while not dropped and time.monotonic() < deadline:
            pool.wake.wait(0.1)
            pool.wake.clear()
            pool.reap()
            dropped += pool.take_dropped()
        assert dropped == [2]
        assert _scripts(behind) == []
    finally:
        _close(pool)


def test_a_long_line_start_sweeps_the_scripts_its_dead_launchers_left(tmp_path: Path) -> None:
    """A launcher SIGKILLed between writing a script and bash starting left it (or its .part): the
    job's next long-line start removes those of dead pids, never a live launcher's or another job's."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    own = f".{os.getpid()}."
    first = Path(shell_argv(f"echo one {FILLER}", str(tmp_path), job_id=7)[1]).name
    assert first.startswith(".balsam_command.7.") and own in first
    left = first.replace(own, f".{dead.pid}.")
    alive = first.replace(own, f".{os.getppid()}.")  # a live launcher's
    other_job = Path(shell_argv(f"echo two {FILLER}", str(tmp_path), job_id=8)[1]).name.replace(own, f".{dead.pid}.")
    for name in (left, left + ".part", alive, other_job):
        (tmp_path / name).write_text("x")
    shell_argv(f"echo three {FILLER}", str(tmp_path), job_id=7)
    names = _scripts(tmp_path)
    assert left not in names and left + ".part" not in names
    assert first in names and alive in names and other_job in names


def test_an_in_process_long_line_script_is_named_after_its_job(tmp_path: Path) -> None:
    pool = _pool("in-process")
    try:
        pool.start(42, f'printf "%s" "$0" > name.txt; : {FILLER}', tmp_path, dict(os.environ))
        [(job_id, rc, tail, _)] = _wait(pool, 1)
        assert (job_id, rc) == (42, 0), tail
        assert os.path.basename((tmp_path / "name.txt").read_text()).startswith(".balsam_command.42.")
    finally:
        _close(pool)

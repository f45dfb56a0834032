"""mpi mode starts its MPI launchers with SIGPIPE ignored; every other task gets the default back.

Why (runner.local_pool): MPICH's hydra ``mpiexec`` sometimes writes to its proxy after
the proxy has exited as a job ends, and under the default disposition that write killed
``mpiexec`` (exit -13) after a run that succeeded. The race itself is rare and timing-bound, so
these tests check its ingredients with real processes: a task that writes to a pipe nobody reads
any more (what hydra does) dies of SIGPIPE under the default and carries on when it is ignored,
in both pools (the spawner process and the in-process fallback); mpi mode's pool is the ignoring
kind; and the ranks under a real ``mpiexec`` started that way still get the default disposition.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from balsam.builtin.default_platform import find_mpiexec
from balsam.launcher.runner import ProcessPool, SpawnerPool

from launcher_helpers import mpi_mode

#: Writes to a pipe whose reader has exited, then exits 0 if it is still alive to do so.
LATE_WRITE = "exec 3> >(true); sleep 0.3; echo late >&3; exit 0"
#: SigIgn of the process, from /proc (a program exec'd directly: no shell between).
SIGIGN = "grep SigIgn /proc/self/status"
SIGPIPE_BIT = 1 << (int(signal.SIGPIPE) - 1)


def _pool(kind: str, sigpipe_ignored: bool) -> Any:
    wake = threading.Event()
    if kind == "spawner":
        return SpawnerPool(5, wake, sigpipe_ignored=sigpipe_ignored)
    return ProcessPool(5, wake=wake, sigpipe_ignored=sigpipe_ignored)


def _close(pool: Any) -> None:
    if isinstance(pool, SpawnerPool):
        pool.close()
    else:
        pool.terminate_all(1.0)


def _run(pool: Any, job_id: int, line: str, workdir: Path, timeout: float = 20.0) -> tuple[int, str]:
    """Start ``line`` and wait for its exit: (returncode, job.out)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pool.start(job_id, line, workdir, dict(os.environ))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for done_id, rc, _tail, _when in pool.reap():
            if done_id == job_id:
                return rc, (workdir / "job.out").read_text()
        time.sleep(0.02)  # the pools' reapers wake their owners; a short poll is enough here
    raise AssertionError(f"task {job_id} did not end in {timeout} s")


def _ignored(job_out: str) -> bool:
    [line] = [ln for ln in job_out.splitlines() if ln.startswith("SigIgn:")]
    return bool(int(line.split()[1], 16) & SIGPIPE_BIT)


@pytest.mark.parametrize("kind", ["spawner", "in-process"])
def test_a_late_write_kills_a_task_only_under_the_default_disposition(kind: str, tmp_path: Path) -> None:
    default, ignoring = _pool(kind, False), _pool(kind, True)
    try:
        rc, _ = _run(default, 1, LATE_WRITE, tmp_path / "default")
        assert rc == -signal.SIGPIPE  # what mpiexec's exit -13 was
        rc, out = _run(ignoring, 2, LATE_WRITE, tmp_path / "ignored")
        assert rc == 0 and "Broken pipe" in out  # the write failed with EPIPE; the task went on
        rc, out = _run(default, 3, SIGIGN, tmp_path / "direct-default")
        assert rc == 0 and not _ignored(out)
        rc, out = _run(ignoring, 4, SIGIGN, tmp_path / "direct-ignored")
        assert rc == 0 and _ignored(out)
    finally:
        _close(default)
        _close(ignoring)


def test_mpi_mode_starts_its_tasks_with_sigpipe_ignored_and_the_ranks_get_the_default(tmp_path: Path) -> None:
    mode = mpi_mode(tmp_path)
    try:
        assert mode.pool.sigpipe_ignored
        rc, out = _run(mode.pool, 1, SIGIGN, tmp_path / "launcher")
        assert rc == 0 and _ignored(out)  # what the MPI launcher process itself runs with
        # A real MPICH mpiexec started by that pool: its rank has the default disposition back.
        rc, out = _run(mode.pool, 2, f"{find_mpiexec()} -n 1 {SIGIGN}", tmp_path / "rank")
        assert rc == 0 and not _ignored(out)
    finally:
        _close(mode.pool)

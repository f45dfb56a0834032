"""Serial mode's quick-failure relaunch (Balsam 0.7's ``Worker.RETRY_CODES`` rule, in
:mod:`balsam.launcher.runner`): a task that exits with -11, 1, 255 or 12345 less than
``RETRY_WINDOW`` seconds after it started is started again on the same CPUs, up to ``MAX_RETRY``
times, before its exit is reported. Real processes, no server: every pool serial mode can run
(spawner, several spawners, in-process with and without the reaper thread); mpi mode's pools
(made without ``relaunch_quick_failures``) report every exit at once. The launcher end to end is
in ``test_launcher_e2e.py`` (``test_serial_mode_relaunches_quick_failures_as_balsam_07``)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from balsam.launcher import runner
from balsam.launcher.runner import ProcessPool, SpawnerPool, SpawnerShards
from balsam.launcher.spawner import SPAWN_FAILED, parse_relaunch_arg, relaunch_arg

#: Appends a line to ``runs`` in its workdir each time it runs (the count of runs).
COUNT = "echo run >> runs; "
#: Exits 1 the first time (leaves a marker), 0 after.
FLAKY = COUNT + "if [ -e tried ]; then echo second run ok; else touch tried; echo first run fails; exit 1; fi"

POOLS: dict[str, Callable[..., Any]] = {
    "spawner": lambda **kw: SpawnerPool(5, threading.Event(), **kw),
    "two spawners": lambda **kw: SpawnerShards(2, 5, threading.Event(), **kw),
    "in-process, reaper": lambda **kw: ProcessPool(5, wake=threading.Event(), **kw),
    "in-process, polled": lambda **kw: ProcessPool(5, **kw),
}


def _close(pool: Any) -> None:
    if isinstance(pool, ProcessPool):
        pool.terminate_all(1.0)
    else:
        pool.close()


@pytest.fixture(params=list(POOLS))
def make_pool(request: pytest.FixtureRequest) -> Any:
    """``make_pool(relaunch=True)``: a pool of the kind under test, closed at the end."""
    made: list[Any] = []

    def make(relaunch: bool = True) -> Any:
        made.append(POOLS[request.param](relaunch_quick_failures=relaunch))
        return made[-1]

    yield make
    for pool in made:
        _close(pool)


def _run(pool: Any, tasks: dict[int, str], tmp_path: Path, cpu_ids: Any = (), timeout: float = 30.0) -> dict[int, tuple[int, str]]:
    """Start ``tasks`` (job id -> command) each in a workdir of its own; reap until all reported:
    job id -> (returncode, tail)."""
    env = dict(os.environ)
    for job_id, cmd in tasks.items():
        workdir = tmp_path / str(job_id)
        workdir.mkdir(exist_ok=True)
        pool.start(job_id, cmd, workdir, env, cpu_ids)
    done: dict[int, tuple[int, str]] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(tasks) and time.monotonic() < deadline:
        time.sleep(0.01)
        for job_id, rc, tail, _when in pool.reap():
            assert job_id not in done, f"job {job_id} reported twice"
            done[job_id] = (rc, tail)
    assert set(done) == set(tasks), f"not reported: {set(tasks) - set(done)}"
    return done


def _runs(tmp_path: Path, job_id: int) -> int:
    path = tmp_path / str(job_id) / "runs"
    return path.read_text().count("run") if path.exists() else 0


def test_the_constants_are_balsam_07s() -> None:
    assert runner.RETRY_CODES == {-11, 1, 255, 12345} and SPAWN_FAILED == 12345
    assert runner.RETRY_WINDOW == 20 and runner.MAX_RETRY == 3


def test_the_rule_reaches_the_spawner_whole() -> None:
    arg = relaunch_arg(*runner.relaunch_rule())
    assert parse_relaunch_arg(["sigpipe-ignored", arg]) == (frozenset({-11, 1, 255, 12345}), 20.0, 3)
    assert parse_relaunch_arg(["sigpipe-ignored"]) is None


def test_a_task_that_fails_once_quickly_is_relaunched_and_succeeds(make_pool, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="balsam.launcher.runner")
    done = _run(make_pool(), {1: FLAKY, 2: COUNT + "echo fine"}, tmp_path)
    assert done == {1: (0, ""), 2: (0, "")}
    assert _runs(tmp_path, 1) == 2 and _runs(tmp_path, 2) == 1
    assert "second run ok" in (tmp_path / "1" / "job.out").read_text()  # job.out is the last run's (as 0.7)
    assert "job 1 exited 1 after" in caplog.text and "relaunching (1 of 3)" in caplog.text
    assert "job 1 finished after 1 relaunch" in caplog.text and "job 2" not in caplog.text


@pytest.mark.parametrize("code", [1, 255, -11])
def test_a_task_that_always_fails_quickly_runs_four_times_then_reports_its_error(make_pool, tmp_path: Path, code: int) -> None:
    cmd = COUNT + "echo failing; " + ("ulimit -c 0; kill -SEGV $$" if code == -11 else f"exit {code}")
    (rc, tail), = _run(make_pool(), {1: cmd}, tmp_path).values()
    assert rc == code and _runs(tmp_path, 1) == 1 + runner.MAX_RETRY
    assert tail.splitlines()[0] == "failing"
    assert "relaunched 3 times" in tail and f"the last run exited {code}" in tail


def test_a_task_that_cannot_start_is_relaunched_like_0_7s(make_pool, tmp_path: Path) -> None:
    """12345 is 0.7's code for a process that failed to start (ours too: SPAWN_FAILED)."""
    pool = make_pool()
    pool.start(1, "true", tmp_path / "missing", dict(os.environ))
    deadline, done = time.monotonic() + 20, []
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
        done = pool.reap()
    (job_id, rc, tail, _), = done
    assert (job_id, rc) == (1, SPAWN_FAILED)
    assert "relaunched 3 times" in tail and "the last run exited 12345" in tail
    if not isinstance(pool, ProcessPool):  # (the in-process pool's tail is job.out's, which cannot be written)
        assert "could not start the job" in tail


def test_a_command_line_over_the_kernels_limit_is_reported_at_once(make_pool, tmp_path: Path) -> None:
    """E2BIG (arguments over the kernel's ARG_MAX): starting the same line again fails the same way; it was
    started four times (three relaunches) before its failure was reported."""
    pool = make_pool()
    workdir = tmp_path / "1"
    workdir.mkdir()
    pool.start(1, "/bin/echo " + " ".join(["x" * 100_000] * 40), workdir, dict(os.environ))  # 4 MB of arguments
    deadline, done = time.monotonic() + 20, []
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
        done = pool.reap()
    (job_id, rc, tail, _), = done
    assert (job_id, rc) == (1, SPAWN_FAILED)
    assert "relaunched" not in tail
    assert "Argument list too long" in (workdir / "job.out").read_text()


def test_an_exit_code_not_in_the_list_is_reported_at_once(make_pool, tmp_path: Path) -> None:
    done = _run(make_pool(), {1: COUNT + "exit 2", 2: COUNT + "exit 3"}, tmp_path)
    assert done == {1: (2, ""), 2: (3, "")}
    assert _runs(tmp_path, 1) == 1 and _runs(tmp_path, 2) == 1


def test_a_failure_after_the_window_is_not_relaunched(make_pool, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "RETRY_WINDOW", 0.3)  # read when the pool is made
    done = _run(make_pool(), {1: COUNT + "sleep 0.6; exit 1", 2: COUNT + "exit 1"}, tmp_path)
    assert done[1] == (1, "") and _runs(tmp_path, 1) == 1
    assert done[2][0] == 1 and _runs(tmp_path, 2) == 4  # inside the window: relaunched


def test_the_window_counts_from_each_relaunch(make_pool, tmp_path: Path, monkeypatch) -> None:
    """As 0.7 (it reset the start time on each relaunch): three quick failures of 0.2 s each are
    all relaunched with a 0.5 s window, though together they take longer than the window."""
    monkeypatch.setattr(runner, "RETRY_WINDOW", 0.5)
    cmd = COUNT + 'sleep 0.2; [ "$(wc -l < runs)" -ge 4 ] || exit 1'
    assert _run(make_pool(), {1: cmd}, tmp_path)[1] == (0, "")
    assert _runs(tmp_path, 1) == 4


def test_mpi_modes_pools_report_every_failure_at_once(make_pool, tmp_path: Path) -> None:
    done = _run(make_pool(relaunch=False), {1: FLAKY}, tmp_path)
    assert done[1][0] == 1 and "relaunched" not in done[1][1] and _runs(tmp_path, 1) == 1


def test_a_relaunch_keeps_the_cpus_and_the_job_queued_behind_waits(tmp_path: Path) -> None:
    """Hand-over (serial mode's pool is a spawner): the task queued behind one that fails quickly
    starts once, after its last run, on the same CPU; every run is on that CPU."""
    cpu = sorted(os.sched_getaffinity(0))[-1]
    pool = SpawnerPool(5, threading.Event(), relaunch_quick_failures=True)
    try:
        env = dict(os.environ)
        trace = tmp_path / "trace"
        for job_id in (1, 2):
            (tmp_path / str(job_id)).mkdir()
        record = f"echo $BALSAM_T $(grep Cpus_allowed_list /proc/self/status | cut -f2) >> {trace}; "
        pool.start(1, record + COUNT + "sleep 0.05; exit 1", tmp_path / "1", dict(env, BALSAM_T="head"), [cpu])
        assert pool.queue_after(1, 2, record + COUNT + "true", tmp_path / "2", dict(env, BALSAM_T="next"))
        done: list = []
        deadline = time.monotonic() + 20
        while len(done) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
            done += pool.reap()
        assert sorted((j, rc) for j, rc, _, _ in done) == [(1, 1), (2, 0)]
        assert [after_and_job[:2] for after_and_job in pool.take_started()] == [(1, 2)]
        lines = trace.read_text().split("\n")[:-1]
        assert lines == [f"head {cpu}"] * 4 + [f"next {cpu}"]
    finally:
        pool.close()


def test_a_stop_ends_a_relaunched_task_as_a_victim(tmp_path: Path) -> None:
    pool = SpawnerPool(5, threading.Event(), relaunch_quick_failures=True)
    try:
        (tmp_path / "1").mkdir()
        pool.start(1, COUNT + 'if [ -e tried ]; then sleep 30; else touch tried; exit 1; fi', tmp_path / "1", dict(os.environ))
        deadline = time.monotonic() + 20
        while _runs(tmp_path, 1) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
            assert pool.reap() == []
        victims, finished = pool.terminate_all(1.0)
        assert victims == [1] and finished == []
    finally:
        pool.close()

"""The spawner process and its pool (:class:`balsam.launcher.runner.SpawnerPool`), and several
spawners sharing a node's CPUs (:class:`~balsam.launcher.runner.SpawnerShards`, the same tests):
real processes, no server. What a task gets (environment, workdir, job.out, its own session, CPUs),
exits, start failures, hand-over to a queued task, the stop, and a spawner that dies."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from balsam.launcher import runner
from balsam.launcher.runner import SpawnerPool, SpawnerShards, spawner_count
from balsam.launcher.spawner import SPAWN_FAILED


def _wait(pool: SpawnerPool, count: int, timeout: float = 20.0) -> list[tuple[int, int, str, float]]:
    """Reap until ``count`` tasks finished (the timeout only keeps a broken test from hanging)."""
    done: list[tuple[int, int, str, float]] = []
    deadline = time.monotonic() + timeout
    while len(done) < count and time.monotonic() < deadline:
        _wake(pool).wait(0.1)
        _wake(pool).clear()
        done += pool.reap()
    return done


@pytest.fixture(params=["one spawner", "two spawners"])
def pool(request: pytest.FixtureRequest) -> Any:
    pool = SpawnerPool(5, threading.Event()) if request.param == "one spawner" else SpawnerShards(2, 5, threading.Event())
    yield pool
    pool.close()


@pytest.fixture
def one_pool() -> Any:
    pool = SpawnerPool(5, threading.Event())
    yield pool
    pool.close()


def _wake(pool: Any) -> threading.Event:
    return pool.shards[0].wake if isinstance(pool, SpawnerShards) else pool.wake


def _procs(pool: Any) -> list:
    return [shard.proc for shard in pool.shards] if isinstance(pool, SpawnerShards) else [pool.proc]


#: Telling spawners (or pinned from not) apart needs two CPUs; CI and this VM have two.
NEEDS_TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")


@pytest.fixture
def two_spawners() -> Any:
    """Two spawners sharing this machine's CPUs, and two CPU ids: ``(pool, low, high)``."""
    pool = SpawnerShards(2, 5, threading.Event())
    yield (pool, *sorted(os.sched_getaffinity(0))[:2])
    pool.close()


def _workdir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def test_a_task_gets_its_environment_workdir_output_and_own_session(pool: SpawnerPool, tmp_path: Path) -> None:
    # A value that is not UTF-8 (as os.environ decodes one: surrogate escapes) reaches the task as its bytes.
    env = dict(os.environ, BALSAM_TEST_VALUE="a b'c", BALSAM_TEST_BYTES="caf\udce9")
    env.pop("HOME", None)
    workdir = _workdir(tmp_path, "1")
    (workdir / "job.out").write_text("old output\n")
    pool.start(1, 'echo "$BALSAM_TEST_VALUE|${HOME-unset}|$PWD"; ps -o sid= -p $$; echo $$; '
                  'printf %s "$BALSAM_TEST_BYTES" > bytes.out; exit 7', workdir, env)
    pool.start(2, "true", _workdir(tmp_path, "2"), env)
    done = {job_id: (rc, tail) for job_id, rc, tail, _ in _wait(pool, 2)}
    assert done[2] == (0, "")
    rc, tail = done[1]
    lines = (workdir / "job.out").read_text().split()
    assert rc == 7 and "old output" not in tail
    value, sid, pid = (workdir / "job.out").read_text().splitlines()
    assert value == f"a b'c|unset|{workdir}"
    assert int(sid) == int(pid)  # a session of its own: the stop kills its whole process group
    assert (workdir / "bytes.out").read_bytes() == b"caf\xe9"
    assert lines and not pool.running


def test_a_task_that_cannot_start_ends_with_the_reason(pool: SpawnerPool, tmp_path: Path) -> None:
    pool.start(1, "true", tmp_path / "missing", dict(os.environ))
    [(job_id, rc, tail, _)] = _wait(pool, 1)
    assert (job_id, rc) == (1, SPAWN_FAILED) and "could not start the job" in tail


def test_a_queued_task_starts_on_the_cpus_of_the_one_ahead_when_it_ends(pool: SpawnerPool, tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    env = dict(os.environ)
    pool.start(1, "sleep 0.2", _workdir(tmp_path, "1"), env, [cpu])
    assert pool.queue_after(1, 2, "grep Cpus_allowed_list /proc/self/status", _workdir(tmp_path, "2"), env)
    assert pool.queue_after(2, 3, "exit 4", _workdir(tmp_path, "3"), env)
    done = _wait(pool, 3)
    assert [(j, rc) for j, rc, _, _ in done] == [(1, 0), (2, 0), (3, 4)]
    assert [(a, j) for a, j, _ in pool.take_started()] == [(1, 2), (2, 3)]
    assert (tmp_path / "2" / "job.out").read_text().split()[-1] == str(cpu)
    assert not pool.queued and not pool.take_dropped()


def test_no_hand_over_after_a_termination_signal_and_cancel_gives_a_task_back(pool: SpawnerPool, tmp_path: Path) -> None:
    env = dict(os.environ)
    pool.start(1, "sleep 0.2; kill -TERM $$", _workdir(tmp_path, "1"), env)
    pool.queue_after(1, 2, "true", _workdir(tmp_path, "2"), env)
    pool.start(3, "sleep 30", _workdir(tmp_path, "3"), env)
    pool.queue_after(3, 4, "true", _workdir(tmp_path, "4"), env)
    pool.queue_after(4, 5, "true", _workdir(tmp_path, "5"), env)
    pool.cancel(4)  # drops 4 and what is queued behind it
    deadline = time.monotonic() + 20
    dropped: list[int] = []
    while len(dropped) < 3 and time.monotonic() < deadline:
        _wake(pool).wait(0.1)
        _wake(pool).clear()
        pool.reap()  # job 1's exit by SIGTERM is held back (the allocation may be ending)
        dropped += pool.take_dropped()
    assert sorted(dropped) == [2, 4, 5] and not pool.take_started() and not pool.queued
    victims, finished = pool.terminate_all(1.0)
    assert sorted(victims) == [1, 3] and finished == []  # 1 held, 3 running: both ended by the stop


def test_terminate_all_ends_running_tasks_and_forgets_queued_ones(pool: SpawnerPool, tmp_path: Path) -> None:
    env = dict(os.environ)
    pool.start(1, "sleep 30", _workdir(tmp_path, "1"), env)
    pool.start(2, "true", _workdir(tmp_path, "2"), env)
    pool.queue_after(1, 3, "true", _workdir(tmp_path, "3"), env)
    assert [j for j, *_ in _wait(pool, 1)] == [2]
    started = time.monotonic()
    victims, finished = pool.terminate_all(5.0)
    assert time.monotonic() - started < 4.0  # the wait ends once every group is empty
    assert victims == [1] and finished == [] and not pool.queued and not pool.take_started()
    assert [proc.returncode for proc in _procs(pool)] == [0] * len(_procs(pool))


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead and waiting for its parent to reap it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for_pid(path: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{path} not written in {timeout} s")


#: Tasks whose leader dies of the SIGTERM but whose child (same process group) survives it: a
#: child that ignores it, and an app that handles it (saves a checkpoint, say) under a bash line.
SURVIVING_CHILDREN = [
    "(trap '' TERM; exec sleep 300) & echo $! > child.pid; wait",
    f"{sys.executable} -c 'import os, signal, time; signal.signal(signal.SIGTERM, lambda *a: None); "
    "open(\"child.pid\", \"w\").write(str(os.getpid())); time.sleep(300)'; echo after",
]


def test_the_stop_kills_the_whole_process_group_after_the_grace(pool: SpawnerPool, tmp_path: Path) -> None:
    """SIGTERM to each task's group, then SIGKILL to the group after the grace even where the
    leader is gone: children that outlived the SIGTERM used to be left running."""
    env = dict(os.environ)
    workdirs = [_workdir(tmp_path, str(i)) for i in range(len(SURVIVING_CHILDREN))]
    for job_id, (cmd, workdir) in enumerate(zip(SURVIVING_CHILDREN, workdirs), 1):
        pool.start(job_id, cmd, workdir, env)
    children = [_wait_for_pid(workdir / "child.pid") for workdir in workdirs]
    time.sleep(0.2)  # the python child's handler is set once it wrote its pid; the trap before exec
    started = time.monotonic()
    victims, finished = pool.terminate_all(1.0)
    took = time.monotonic() - started
    assert sorted(victims) == [1, 2] and finished == []
    assert took >= 1.0  # the groups were not empty before the grace ended
    time.sleep(0.1)
    assert [pid for pid in children if _running(pid)] == []


def test_when_the_launcher_goes_the_spawner_ends_its_tasks(pool: SpawnerPool, tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, "1")
    pool.start(1, "echo $$; exec sleep 30", workdir, dict(os.environ))
    deadline = time.monotonic() + 20
    while not ((workdir / "job.out").exists() and (workdir / "job.out").read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = int((workdir / "job.out").read_text())
    pool.close()  # end of file on its request pipe
    assert 1 in [proc.returncode for proc in _procs(pool)]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_dead_spawner_reports_its_tasks_and_later_starts_run_in_process(one_pool: SpawnerPool, tmp_path: Path) -> None:
    pool = one_pool
    env = dict(os.environ)
    pool.start(1, "sleep 30", _workdir(tmp_path, "1"), env)
    pool.queue_after(1, 2, "true", _workdir(tmp_path, "2"), env)
    os.kill(pool.proc.pid, signal.SIGKILL)
    [(job_id, rc, tail, _)] = _wait(pool, 1)
    assert (job_id, rc) == (1, -1) and "spawner process exited unexpectedly" in tail
    assert pool.take_dropped() == [2] and not pool.can_queue
    pool.start(2, "exit 3", _workdir(tmp_path, "2b"), env)
    assert [(j, rc) for j, rc, _, _ in _wait(pool, 1)] == [(2, 3)]
    assert pool.terminate_all(1.0) == ([], [])


def test_a_queued_task_that_cannot_start_passes_its_cpus_on(pool: SpawnerPool, tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    env = dict(os.environ)
    pool.start(1, "sleep 0.2", _workdir(tmp_path, "1"), env, [cpu])  # still running when 2 is queued
    pool.queue_after(1, 2, "true", tmp_path / "missing", env)
    pool.queue_after(2, 3, "grep Cpus_allowed_list /proc/self/status", _workdir(tmp_path, "3"), env)
    done = {j: (rc, tail) for j, rc, tail, _ in _wait(pool, 3)}
    assert done[1] == (0, "") and done[2][0] == SPAWN_FAILED and "could not start the job" in done[2][1]
    assert done[3][0] == 0 and (tmp_path / "3" / "job.out").read_text().split()[-1] == str(cpu)
    assert [(a, j) for a, j, _ in pool.take_started()] == [(1, 2), (2, 3)]


def test_a_queue_request_that_comes_after_the_task_ended_starts_on_its_cpus(pool: SpawnerPool, tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    env = dict(os.environ)
    pool.start(1, "true", _workdir(tmp_path, "1"), env, [cpu])
    pool.start(2, "sh -c 'kill -TERM $$'", _workdir(tmp_path, "2"), env)
    assert [j for j, *_ in _wait(pool, 1)] == [1]  # 2's exit by SIGTERM is held back
    pool.queue_after(1, 3, "grep Cpus_allowed_list /proc/self/status", _workdir(tmp_path, "3"), env)
    pool.queue_after(2, 4, "true", _workdir(tmp_path, "4"), env)  # never behind a task killed by a stop signal
    assert [(j, rc) for j, rc, _, _ in _wait(pool, 1)] == [(3, 0)]
    assert [(a, j) for a, j, _ in pool.take_started()] == [(1, 3)]
    assert (tmp_path / "3" / "job.out").read_text().split()[-1] == str(cpu)
    dropped: list[int] = []
    deadline = time.monotonic() + 20  # 4 may have been queued while 2 still ran: dropped when it dies
    while not dropped and time.monotonic() < deadline:
        _wake(pool).wait(0.1)
        _wake(pool).clear()
        pool.reap()
        dropped += pool.take_dropped()
    assert dropped == [4] and not pool.take_started()


def _allowed_cpus(pid: int) -> set[int]:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Cpus_allowed_list:"))
    cpus: set[int] = set()
    for part in line.split(":", 1)[1].strip().split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


@NEEDS_TWO_CPUS
def test_the_spawner_pins_its_task_but_not_itself_while_it_waits(one_pool: SpawnerPool, tmp_path: Path) -> None:
    # Pinned to the last task's CPU, the spawner would react to an exit on another CPU only when
    # that task gave it a turn, and the freed CPU would sit idle meanwhile.
    pool, home, cpu = one_pool, os.sched_getaffinity(0), min(os.sched_getaffinity(0))
    workdir = _workdir(tmp_path, "1")
    pool.start(1, "grep Cpus_allowed_list /proc/self/status; sleep 30", workdir, dict(os.environ), [cpu])
    spawner = pool.proc.pid
    deadline = time.monotonic() + 20  # only keeps a broken test from hanging
    out = workdir / "job.out"
    while (not (out.exists() and out.read_text()) or _allowed_cpus(spawner) != home) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (workdir / "job.out").read_text().split()[-1] == str(cpu)  # the task: pinned
    assert _allowed_cpus(spawner) == home  # the spawner, waiting: back on every CPU


@NEEDS_TWO_CPUS
def test_shards_split_the_cpus_between_spawners_and_a_dead_one_takes_only_its_tasks(two_spawners: Any,
                                                                                     tmp_path: Path) -> None:
    pool, low, high = two_spawners
    env = dict(os.environ)
    assert len(pool.shards) == 1  # the second starts when a task first goes to it
    pool.start(1, "sleep 30", _workdir(tmp_path, "1"), env, [low])
    pool.start(2, "sleep 30", _workdir(tmp_path, "2"), env, [high])
    assert pool.queue_after(2, 3, "grep Cpus_allowed_list /proc/self/status", _workdir(tmp_path, "3"), env)
    spawners = {pid: shard.proc.pid for pid, shard in ((1, pool._shard_of[1]), (2, pool._shard_of[2]))}
    assert spawners[1] != spawners[2]  # neighbouring CPUs: different spawners
    assert pool._shard_of[3] is pool._shard_of[2]  # queued behind 2: 2's spawner, 2's CPU
    os.kill(spawners[1], signal.SIGKILL)
    [(job_id, rc, tail, _)] = _wait(pool, 1)
    assert (job_id, rc) == (1, -1) and "spawner process exited unexpectedly" in tail
    assert pool.can_queue and 2 in pool.running
    victims, finished = pool.terminate_all(1.0)
    assert victims == [2] and finished == []  # 3 never started


@pytest.mark.parametrize(("setting", "cpus", "count"), [
    (None, 2, 2), (None, 1, 1), (None, 104, runner.MAX_AUTO_SPAWNERS), ("1", 64, 1), ("6", 2, 6), ("many", 2, 2),
])
def test_how_many_spawners_a_node_runs(setting: "str | None", cpus: int, count: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if setting is None:
        monkeypatch.delenv(runner.SPAWNER_ENV, raising=False)
    else:
        monkeypatch.setenv(runner.SPAWNER_ENV, setting)
    assert spawner_count(cpus) == count


def test_a_spawner_that_cannot_start_leaves_its_cpus_to_the_first(tmp_path: Path) -> None:
    pool = SpawnerShards(3, 5, threading.Event())
    try:
        def refuse() -> SpawnerPool:
            raise OSError("no more processes")

        pool._new_pool = refuse
        env = dict(os.environ)
        for job_id in (1, 2, 3):  # CPU ids 0, 1, 2: the spawners 0, 1 and 2
            pool.start(job_id, "exit 0", _workdir(tmp_path, str(job_id)), env, [job_id - 1])
        assert sorted(j for j, *_ in _wait(pool, 3)) == [1, 2, 3]
        assert len(pool.shards) == 1
    finally:
        pool.close()


@NEEDS_TWO_CPUS
def test_each_spawner_starts_once_and_takes_tasks_queued_behind_an_ended_one(two_spawners: Any,
                                                                             tmp_path: Path) -> None:
    pool, low, high = two_spawners
    env = dict(os.environ)
    for job_id, cpu in enumerate((low, low, high, high, low), start=1):  # each ends before the next
        pool.start(job_id, "true", _workdir(tmp_path, str(job_id)), env, [cpu])
        assert [j for j, *_ in _wait(pool, 1)] == [job_id]
    assert len(pool.shards) == 2 and not pool.running  # idle spawners are reused, not started again
    # Queued behind a task that has ended (the request reached its spawner too late): it still
    # starts on that task's CPU, in that task's spawner.
    assert pool.queue_after(5, 6, "grep Cpus_allowed_list /proc/self/status", _workdir(tmp_path, "6"), env)
    assert [j for j, *_ in _wait(pool, 1)] == [6]
    assert [(a, j) for a, j, _ in pool.take_started()] == [(5, 6)]
    assert (tmp_path / "6" / "job.out").read_text().split()[-1] == str(low)

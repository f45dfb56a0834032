"""The built-in `local` scheduler with real background processes."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from balsam.builtin.local_queue import FIRST_ID_MAX, FIRST_ID_MIN
from balsam.builtin.local_scheduler import LocalScheduler
from balsam.scheduler import CommandResult, SchedulerError, SubmitRequest, subprocess_runner
from balsam.states import BatchJobState

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout=30.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/bash\n" + body)
    return path


def request(path: Path, **kw) -> SubmitRequest:
    return SubmitRequest(script_path=path, project="local", queue="local", num_nodes=1, wall_time_min=5, **kw)


@pytest.fixture
def scheduler(tmp_path) -> LocalScheduler:
    return LocalScheduler(state_dir=tmp_path / "state")


def test_submit_runs_the_script_and_it_finishes(scheduler, tmp_path):
    go = tmp_path / "go"
    path = script(
        tmp_path,
        "job.sh",
        f'echo "job $BALSAM_LOCAL_JOB_ID in $PWD"\necho oops >&2\nwhile [ ! -e {go} ]; do sleep 0.05; done\nexit 3\n',
    )
    job_id = scheduler.submit(request(path))
    # a new directory's ids start at a drawn point, not at 1 (tests/site/test_local_scheduler_ids.py)
    assert FIRST_ID_MIN <= job_id < FIRST_ID_MAX
    statuses = scheduler.get_statuses()
    assert list(statuses) == [job_id]
    status = statuses[job_id]
    assert status.state == BatchJobState.running
    assert (status.queue, status.project, status.num_nodes, status.wall_time_min) == ("local", "local", 1, 5)
    assert scheduler.get_history(job_id) is None  # still running: no history yet
    go.touch()
    wait_for(lambda: job_id not in scheduler.get_statuses())
    history = scheduler.get_history(job_id)
    assert history.state == BatchJobState.finished
    assert history.native_state == "FAILED" and history.message == "exit status 3"
    assert history.start_time <= history.end_time <= dt.datetime.now(dt.timezone.utc)
    output = Path(f"{path}.output").read_text()
    assert output == f"job {job_id} in {tmp_path}\noops\n"


def test_ids_increase_and_only_own_jobs_are_listed(scheduler, tmp_path):
    stranger = subprocess.Popen(["sleep", "30"])  # one of the user's processes, not a job
    try:
        path = script(tmp_path, "quick.sh", "exit 0\n")
        ids = [scheduler.submit(request(path)) for _ in range(3)]
        assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
        wait_for(lambda: not scheduler.get_statuses())
        assert all(scheduler.get_history(i).native_state == "COMPLETED" for i in ids)
        assert scheduler.get_history(ids[0] - 1) is None
    finally:
        stranger.kill()
        stranger.wait()


def test_delete_kills_the_whole_process_tree(scheduler, tmp_path):
    pids = tmp_path / "pids"
    path = script(tmp_path, "tree.sh", f"sleep 300 &\necho $! >> {pids}\necho $$ >> {pids}\nwait\n")
    job_id = scheduler.submit(request(path))
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2)
    processes = [psutil.Process(int(p)) for p in pids.read_text().split()]
    assert all(p.is_running() for p in processes)
    scheduler.delete_job(job_id)
    gone, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive
    assert job_id not in scheduler.get_statuses()
    history = scheduler.get_history(job_id)
    assert history.native_state == "CANCELLED"
    scheduler.delete_job(job_id)  # deleting a finished job again is harmless


def test_a_restarted_agent_still_knows_its_jobs(tmp_path):
    go = tmp_path / "go"
    path = script(tmp_path, "job.sh", f"while [ ! -e {go} ]; do sleep 0.05; done\n")
    first = LocalScheduler(state_dir=tmp_path / "state")
    job_id = first.submit(request(path))
    again = LocalScheduler(subprocess_runner, state_dir=tmp_path / "state")
    assert list(again.get_statuses()) == [job_id]
    go.touch()
    wait_for(lambda: not again.get_statuses())
    assert again.get_history(job_id).native_state == "COMPLETED"


def test_an_earlier_submission_is_found_by_script_and_name(scheduler, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mine = script(tmp_path / "a", "qlaunch00007.sh", "sleep 0.1\n")
    other = script(tmp_path / "b", "qlaunch00007.sh", "sleep 0.1\n")
    assert scheduler.find_submitted(request(mine, job_name="qlaunch00007")) == []
    first = scheduler.submit(request(mine, job_name="qlaunch00007"))
    second = scheduler.submit(request(other, job_name="qlaunch00007"))
    assert scheduler.find_submitted(request(mine, job_name="qlaunch00007")) == [first]
    assert scheduler.find_submitted(request(other, job_name="qlaunch00007")) == [second]
    wait_for(lambda: first not in scheduler.get_statuses())
    assert scheduler.find_submitted(request(mine, job_name="qlaunch00007")) == [first]  # ended: still found


def test_default_construction_uses_balsam_home(tmp_path, monkeypatch):
    monkeypatch.delenv("BALSAM_LOCAL_SCHEDULER_DIR", raising=False)
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    scheduler = LocalScheduler()
    assert scheduler.state_dir == tmp_path / "home" / "local-scheduler"
    job_id = scheduler.submit(request(script(tmp_path, "j.sh", "exit 0\n")))
    assert (tmp_path / "home" / "local-scheduler" / "jobs.json").exists()
    wait_for(lambda: not scheduler.get_statuses())
    assert scheduler.get_history(job_id).native_state == "COMPLETED"


def test_refusals_and_errors_are_scheduler_errors(scheduler, tmp_path):
    with pytest.raises(SchedulerError, match="asked for 2 nodes") as info:
        scheduler.submit(SubmitRequest(script_path=tmp_path / "x.sh", project="local", queue="local",
                                       num_nodes=2, wall_time_min=5))
    assert info.value.permanent
    with pytest.raises(SchedulerError, match="batch script .*missing.sh does not exist"):
        scheduler.submit(request(tmp_path / "missing.sh"))
    with pytest.raises(SchedulerError, match="could not delete job 42: local queue: no local job 42") as info:
        scheduler.delete_job(42)
    assert info.value.permanent


def test_garbage_status_output_is_a_clear_error(scheduler):
    now = dt.datetime.now(dt.timezone.utc)
    with pytest.raises(SchedulerError, match="local scheduler status is not JSON"):
        scheduler.parse_status(CommandResult(("x",), 0, "<html>", ""), now)
    with pytest.raises(SchedulerError, match="status entry '7' is malformed"):
        scheduler.parse_status(CommandResult(("x",), 0, '{"7": {"queue": "local"}}', ""), now)
    with pytest.raises(SchedulerError, match="could not list its jobs: boom"):
        scheduler.parse_status(CommandResult(("x",), 1, "", "boom\n"), now)


def test_commands_go_through_the_injected_runner(tmp_path):
    seen = []

    def recording_runner(command):
        seen.append(command.args)
        return subprocess_runner(command)

    scheduler = LocalScheduler(recording_runner, state_dir=tmp_path / "state")
    job_id = scheduler.submit(request(script(tmp_path, "j.sh", "exit 0\n")))
    wait_for(lambda: not scheduler.get_statuses())
    scheduler.get_history(job_id)
    verbs = [args[5] for args in seen]
    assert verbs[0] == "submit" and "status" in verbs and verbs[-1] == "history"
    assert all(args[1:4] == ("-m", "balsam.builtin.local_queue", "--state-dir") for args in seen)


def test_damaged_job_records_are_a_clear_permanent_error(scheduler, tmp_path):
    scheduler.state_dir.mkdir(parents=True)
    (scheduler.state_dir / "jobs.json").write_text("{not json")
    with pytest.raises(SchedulerError, match=r"could not list its jobs: local queue: .*jobs.json is not valid JSON") as info:
        scheduler.get_statuses()
    assert info.value.permanent

"""The Cobalt driver against the fake Cobalt (real qsub/qstat/qdel/nodelist processes on PATH)."""

from __future__ import annotations

import getpass
from pathlib import Path

import pytest

from balsam.scheduler import SchedulerError, SubmitRequest
from balsam.states import BatchJobState
from balsam_scheduler_cobalt import CobaltScheduler

from fake_env import ended, fake_batch_env, wait_for


@pytest.fixture
def cobalt(tmp_path, monkeypatch) -> CobaltScheduler:
    for key, value in fake_batch_env("fake_cobalt", tmp_path / "server", FAKE_BATCH_SECONDS_PER_MINUTE="3",
                                     FAKE_COBALT_PROJECTS="proj,other", FAKE_COBALT_BACKFILL="0:45:00").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("QSTAT_HEADER", "JobId:User:State")  # a user's own header must not matter
    return CobaltScheduler(user=getpass.getuser())


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / "qsubmit" / f"{name}.sh"
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)
    return path


def _request(script: Path, **kw) -> SubmitRequest:
    fields = dict(script_path=script, project="proj", queue="debug", num_nodes=2, wall_time_min=5)
    fields.update(kw)
    return SubmitRequest(**fields)


def _running(cobalt, jobid):
    status = cobalt.get_statuses().get(jobid)
    return status is not None and status.state is BatchJobState.running


def test_submit_run_history_backfill(cobalt, tmp_path):
    # The job holds its nodes until the test has seen them busy: with a fixed sleep, a loaded machine let the job
    # end (qstat still says "exiting", mapped to running) before nodelist answered, and the nodes showed idle.
    # The wait is bounded (12 s, under the 15 s wall time) and then fails the job, so a broken test cannot hang.
    release = tmp_path / "release"
    script = _script(tmp_path, "qlaunch00001", 'echo "id=$COBALT_JOBID size=$COBALT_JOBSIZE part=$COBALT_PARTNAME"; '
                                               'cat $COBALT_NODEFILE\n'
                                               f'while [ ! -e "{release}" ]; do (( SECONDS < 12 )) || exit 3; sleep 0.05; done')
    assert [(w.num_nodes, w.wall_time_min) for w in cobalt.get_backfill_windows()["debug"]] == [(2, 45)]
    jobid = cobalt.submit(_request(script))
    status = wait_for(lambda: cobalt.get_statuses().get(jobid), 10, "the job in qstat")
    assert status.num_nodes == 2 and status.queue == "debug" and status.project == "proj" and status.wall_time_min == 5
    wait_for(lambda: _running(cobalt, jobid), 10, "the job to run")
    assert cobalt.get_backfill_windows() == {}  # both nodes busy
    release.touch()
    wait_for(lambda: jobid not in cobalt.get_statuses(), 15, "the job to leave the queue")
    history = cobalt.get_history(jobid, script)
    assert history.state is BatchJobState.finished and history.start_time <= history.end_time
    assert "exit code of 0" in history.message
    assert f"id={jobid} size=2 part=localhost,127.0.0.1" in script.with_suffix(".output").read_text()


def test_refusals_and_project_discovery(cobalt, tmp_path):
    script = _script(tmp_path, "qlaunch00002", "true")
    with pytest.raises(SchedulerError, match="Projects available: proj other"):
        cobalt.submit(_request(script, project="nope"))
    with pytest.raises(SchedulerError, match="not a valid queue name"):
        cobalt.submit(_request(script, queue="nope"))
    assert cobalt.discover_projects() == ["proj", "other"]


def test_walltime_and_deletes(cobalt, tmp_path):
    long, waiting, running = (_script(tmp_path, f"qlaunch0000{i}", "sleep 60") for i in (3, 4, 5))
    first = cobalt.submit(_request(long, wall_time_min=1))  # a fake minute is 3 s here
    second = cobalt.submit(_request(waiting))
    wait_for(lambda: _running(cobalt, first), 10, "the first job to run")
    assert cobalt.get_statuses()[second].state is BatchJobState.queued
    cobalt.delete_job(second)
    timed_out = wait_for(lambda: ended(cobalt.get_history(first, long)), 20, "the wall-time kill")
    assert "exceeded its walltime" in timed_out.message and timed_out.state is BatchJobState.finished
    deleted = cobalt.get_history(second, waiting)
    assert deleted.state is BatchJobState.finished and deleted.start_time is None
    third = cobalt.submit(_request(running, num_nodes=1))
    wait_for(lambda: _running(cobalt, third), 10, "the third job to run")
    cobalt.delete_job(third)
    killed = wait_for(lambda: ended(cobalt.get_history(third, running)), 15, "the deleted job's end")
    assert "killed by user" in killed.message and killed.start_time is not None

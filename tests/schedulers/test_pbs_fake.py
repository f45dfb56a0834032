"""The PBS driver against the fake PBS server (real qsub/qstat/qdel/pbsnodes processes on PATH)."""

from __future__ import annotations

import getpass
import os
import time
from pathlib import Path

import pytest

from balsam.scheduler import SchedulerError, SubmitRequest
from balsam.states import BatchJobState
from balsam_scheduler_pbs import PBSScheduler
from balsam_scheduler_pbs.scheduler import CLOCK_SLACK_SEC

from fake_env import ended, fake_batch_env, wait_for


@pytest.fixture
def pbs(tmp_path, monkeypatch) -> PBSScheduler:
    for key, value in fake_batch_env("fake_pbs", tmp_path / "server", FAKE_BATCH_SECONDS_PER_MINUTE="3",
                                     FAKE_BATCH_KEEP_SEC="4").items():
        monkeypatch.setenv(key, value)
    return PBSScheduler(user=getpass.getuser())


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / "qsubmit" / f"{name}.sh"
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)
    return path


def _request(script: Path, **kw) -> SubmitRequest:
    fields = dict(script_path=script, project="proj", queue="debug", num_nodes=2, wall_time_min=5, job_name=script.stem)
    fields.update(kw)
    return SubmitRequest(**fields)


def test_submit_run_and_history(pbs, tmp_path):
    script = _script(tmp_path, "qlaunch00001",
                     'echo "id=$PBS_JOBID workdir=$PBS_O_WORKDIR queue=$PBS_QUEUE"; tr "\\n" " " < $PBS_NODEFILE; echo; sleep 1.5')
    jobid = pbs.submit(_request(script, optional_params={"filesystems": "home:grand"}))
    status = wait_for(lambda: pbs.get_statuses().get(jobid), 10, "the job in qstat")
    assert status.num_nodes == 2 and status.queue == "debug" and status.project == "proj" and status.wall_time_min == 5
    # One poll per try: the 1.5 s job may leave between two polls (KeyError), or run and leave
    # between tries on a loaded machine (its history below says it ran).
    wait_for(lambda: (s := pbs.get_statuses().get(jobid)) is None or s.state is BatchJobState.running,
             10, "the job to run")
    wait_for(lambda: jobid not in pbs.get_statuses(), 15, "the job to leave the queue")
    history = pbs.get_history(jobid, script)
    assert history.state is BatchJobState.finished and history.native_state == "F (Exit_status 0)"
    assert history.start_time is not None and history.end_time >= history.start_time
    output = script.with_suffix(".output").read_text()
    assert f"id={jobid}.fakepbs workdir={script.parent} queue=debug" in output
    assert "localhost 127.0.0.1" in output


def test_refused_submission_says_why(pbs, tmp_path):
    script = _script(tmp_path, "qlaunch00002", "true")
    with pytest.raises(SchedulerError, match="Unknown queue") as info:
        pbs.submit(_request(script, queue="nosuchqueue"))
    assert info.value.permanent
    with pytest.raises(SchedulerError, match="resource limits"):
        pbs.submit(_request(script, num_nodes=99))


def test_walltime_kill_delete_and_backfill(pbs, tmp_path, monkeypatch):
    # The deleted job's record must outlive the first job's walltime (12 s), or it is forgotten first.
    monkeypatch.setenv("FAKE_BATCH_KEEP_SEC", "60")
    long = _script(tmp_path, "qlaunch00003", "sleep 60")
    waiting = _script(tmp_path, "qlaunch00004", "sleep 60")
    # A fake minute is 3 s here: 12 s for the checks below before the walltime kill frees the nodes.
    first = pbs.submit(_request(long, wall_time_min=4))
    second = pbs.submit(_request(waiting))
    wait_for(lambda: (s := pbs.get_statuses().get(first)) is not None and s.state is BatchJobState.running,
             10, "the first job to run")
    statuses = pbs.get_statuses()
    assert statuses[second].state is BatchJobState.queued  # both nodes are busy
    assert pbs.get_backfill_windows() == {}
    pbs.delete_job(second)  # deleted while queued
    histories = wait_for(lambda: (h := pbs.get_histories({first: long, second: waiting})) and all(map(ended, h.values())) and h,
                         40, "both jobs to end")
    assert histories[second].state is BatchJobState.finished and histories[second].start_time is None
    assert "walltime" in histories[first].message and histories[first].native_state == "F (Exit_status -29)"
    windows = pbs.get_backfill_windows()
    assert [(w.num_nodes, w.wall_time_min) for w in windows["*"]] == [(2, 60)]


def test_delete_running_job_and_forgotten_history(pbs, tmp_path):
    script = _script(tmp_path, "qlaunch00005", "echo started; sleep 60")
    jobid = pbs.submit(_request(script, num_nodes=1))
    wait_for(lambda: pbs.get_statuses().get(jobid) and pbs.get_statuses()[jobid].state is BatchJobState.running,
             10, "the job to run")
    pbs.delete_job(jobid)
    history = wait_for(lambda: ended(pbs.get_history(jobid, script)), 15, "the deleted job's history")
    assert history.state is BatchJobState.finished and history.native_state == "F (Exit_status 271)"
    pbs.delete_job(jobid)  # deleting a job that is gone is not an error
    time.sleep(4.5)  # the fake server forgets finished jobs after FAKE_BATCH_KEEP_SEC=4
    forgotten = pbs.get_history(jobid, script)
    assert forgotten.native_state == "Unknown Job Id" and forgotten.state is BatchJobState.finished
    never = pbs.get_history(jobid + 100, tmp_path / "qsubmit" / "qlaunch09999.sh")
    assert never.state is BatchJobState.submit_failed


def test_site_defaults_discover_the_queues(pbs):
    queues = pbs.site_defaults()["scheduler"]["allowed_queues"]
    assert queues == {q: {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 10} for q in ("debug", "prod")}


def test_find_submitted_adopts_its_job_on_a_server_whose_clock_is_behind(pbs, tmp_path, monkeypatch):
    """The PBS server's clock 5 s behind the file system's: the job qsub'ed right after its script
    was written is dated (ctime) before the script, and is still this submission's job."""
    monkeypatch.setenv("FAKE_BATCH_BACKDATE_SEC", "5")
    script = _script(tmp_path, "qlaunch00003", "sleep 30")
    request = _request(script, num_nodes=1)
    jobid = pbs.submit(request)
    assert pbs.find_submitted(request) == [jobid]
    pbs.delete_job(jobid)


def test_find_submitted_ignores_an_older_job_of_the_same_name(pbs, tmp_path, monkeypatch):
    """An earlier site database's BatchJob 1 left a finished qlaunch00001 in the job history; the new
    BatchJob 1's interrupted submission must not adopt it (it would be marked finished unrun)."""
    monkeypatch.setenv("FAKE_BATCH_KEEP_SEC", "600")  # the old job stays in the history
    # the old job was submitted beyond the clock slack before the script is rewritten: the fake
    # server dates it back (ctime) instead of the test waiting that long
    monkeypatch.setenv("FAKE_BATCH_BACKDATE_SEC", str(CLOCK_SLACK_SEC + 60))
    script = _script(tmp_path, "qlaunch00001", "true")
    old_written = time.time() - CLOCK_SLACK_SEC - 60
    os.utime(script, (old_written, old_written))  # the old script, written before its job
    request = _request(script, num_nodes=1)
    old = pbs.submit(request)
    monkeypatch.setenv("FAKE_BATCH_BACKDATE_SEC", "0")
    wait_for(lambda: old not in pbs.get_statuses(), 15, "the old job to finish")
    assert pbs.get_history(old, script).state is BatchJobState.finished
    script.write_text("#!/bin/bash\necho new\n")
    assert pbs.parse_find(pbs.run(pbs.render_find(request, pbs.user)), request) == [old]  # qselect: by name only
    assert pbs.find_submitted(request) == []  # the interrupted qsub never reached the server
    new = pbs.submit(request)  # it did, this time
    assert pbs.find_submitted(request) == [new]
    pbs.delete_job(new)

"""The ``agent_daemon`` teardown (:func:`site_test_utils.stop_agent_and_end_batch_jobs`) ends the
scheduler job of a submit the agent's stop cut off: the submit command queued the job, the stop
ended the command before it printed the id, so the BatchJob has no scheduler_id, only the
``.submitting`` marker (or, after a SIGKILL between the submit and its PATCH, the id in the
``.scheduler_id`` marker). The teardown deleted only the recorded scheduler_ids, then marked the
BatchJob finished: the job ran on after the test (its launcher into the next tests). It now marks
the BatchJobs ``pending_deletion`` and runs one cycle of the site's scheduler module, whose
deletion path finds such jobs (markers, the driver's lookup by name) and deletes them.

On the fake PBS of tests/fixtures (qsub, qselect, qdel), whose jobs run ``sleep <mark>``."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
from pathlib import Path

import psutil
import pytest

from balsam.config.drivers import site_scheduler
from balsam.scheduler import SubmitRequest
from balsam.site.modules.scheduler import SUBMIT_TOKEN
from balsam.testing.fakebatch import fake_batch_env
from site_test_utils import batch_job, create_batch_job, stop_agent_and_end_batch_jobs, wait_for

FAKE = Path(__file__).resolve().parents[1] / "fixtures" / "fake_pbs"
PBS = {"scheduler": {"name": "pbs", "allowed_projects": ["proj"],
                     "allowed_queues": {"debug": {"max_nodes": 1, "max_walltime": 30, "max_queued_jobs": 5}}}}


def _sleeps(mark: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["cmdline"] == ["sleep", mark] and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def _fake_jobs(server: Path) -> dict:
    state = server / "state.json"
    return json.loads(state.read_text())["jobs"] if state.exists() else {}


@pytest.fixture
def pbs_site(make_site, tmp_path, monkeypatch):
    """A site on the fake PBS whose job script runs ``sleep <mark>``; the fake jobs and their
    processes are ended after the test whatever it left."""
    mark = f"{random.randint(100000, 999999)}.5"
    server = tmp_path / "server"
    for key, value in fake_batch_env(FAKE, server).items():
        monkeypatch.setenv(key, value)
    site = make_site(overrides=PBS)
    Path(site.job_template_path).write_text(f"#!/bin/bash\nexec sleep {mark}\n")
    yield site, server, mark
    for job_id, job in _fake_jobs(server).items():
        if job.get("status") != "finished":
            subprocess.run([str(FAKE / "qdel"), str(job_id)], capture_output=True, timeout=60)
    for process in _sleeps(mark):
        process.kill()


def _assert_ended(client, server: Path, mark: str, batch_job_id: int) -> None:
    jobs = _fake_jobs(server)
    assert jobs, "the fake PBS has no job: the test set nothing up"
    wait_for(lambda: all(job["status"] == "finished" for job in _fake_jobs(server).values()), timeout=30,
             what="the fake PBS jobs to end")
    wait_for(lambda: not _sleeps(mark), timeout=30, what="the job's process to end")
    assert batch_job(client, batch_job_id)["state"] == "finished"


def test_a_submit_the_agents_stop_cut_off_has_its_job_ended(pbs_site, agent_daemon, client, tmp_path, monkeypatch):
    site, server, mark = pbs_site
    # qsub queues the job at once, then never prints its id (a hung PBS server): the agent's stop,
    # after its 1 s wait, ends it; the job stays queued, known only by the .submitting marker.
    monkeypatch.setenv("BALSAM_AGENT_STOP_WAIT_SEC", "1")
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    queued = tmp_path / "queued"
    (wrap / "qsub").write_text(f'#!/bin/sh\nid=$("{FAKE}/qsub" "$@")\necho "$id" > {queued}\nexec sleep {mark}0\n')
    (wrap / "qsub").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrap}{os.pathsep}{os.environ['PATH']}")
    agent_daemon(site)
    bj = create_batch_job(client, site.site_id, project="proj", queue="debug")["id"]
    try:
        wait_for(queued.exists, timeout=60, what="qsub to queue the job")
        stop_agent_and_end_batch_jobs(client, site)
        _assert_ended(client, server, mark, bj)
        row = batch_job(client, bj)
        assert row["scheduler_id"] == int(queued.read_text().split(".")[0]), row  # found, deleted, recorded
    finally:
        for process in _sleeps(f"{mark}0"):
            process.kill()


def _submitted_by_hand(client, site, how: str) -> tuple[int, int]:
    """A BatchJob whose submission a killed agent left half done: its submit token stored, its
    script written and queued on the fake PBS, the id in the ``.scheduler_id`` marker (``how`` =
    "scheduler_id": killed before the PATCH) or only a ``.submitting`` marker (killed before the
    id was printed). Returns (BatchJob id, scheduler id)."""
    bj = create_batch_job(client, site.site_id, project="proj", queue="debug")["id"]
    token = f"{random.getrandbits(64):016x}"
    client.patch("/batch-jobs/", json=[{"id": bj, "status_info": {SUBMIT_TOKEN: token}}])
    script = Path(site.site_path) / "qsubmit" / f"qlaunch{bj:05d}.sh"
    script.parent.mkdir(exist_ok=True)
    script.write_text(Path(site.job_template_path).read_text())
    script.chmod(0o755)
    request = SubmitRequest(script_path=script, project="proj", queue="debug", num_nodes=1, wall_time_min=5,
                            job_name=script.stem)
    if how == "scheduler_id":
        scheduler_id = site_scheduler(site.settings).submit(request)
        script.with_name(script.name + ".scheduler_id").write_text(f"{scheduler_id} {token}\n")
    else:
        script.with_name(script.name + ".submitting").write_text(
            f"{dt.datetime.now(dt.timezone.utc).isoformat()} {token}\n")
        scheduler_id = site_scheduler(site.settings).submit(request)
    return bj, scheduler_id


@pytest.mark.parametrize("how", ["scheduler_id", "submitting"])
def test_a_job_known_only_by_its_submit_marker_is_ended(pbs_site, client, how):
    site, server, mark = pbs_site
    bj, scheduler_id = _submitted_by_hand(client, site, how)
    assert batch_job(client, bj)["scheduler_id"] is None
    stop_agent_and_end_batch_jobs(client, site)  # no agent runs: the stop finds none
    _assert_ended(client, server, mark, bj)
    assert batch_job(client, bj)["scheduler_id"] == scheduler_id

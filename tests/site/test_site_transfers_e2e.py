"""Transfers end to end on a real site: the real uvicorn server, the site agent daemon with its
``transfers`` module and the built-in ``local`` backend, real launchers started by the local
scheduler from the job template.

- 200 jobs each stage a file in, run (``tr`` upper-cases it) and stage the result out: all
  JOB_FINISHED, every output at its destination with the right content.
- kill -9 of the agent in the middle of the stage-ins and again in the middle of the stage-outs:
  after a restart every job is staged exactly once per direction (one READY -> STAGED_IN and one
  -> JOB_FINISHED event each), every file is complete, no partial file is left.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from site_test_utils import all_done, create_batch_job, events, finish_jobs, state_counts, wait_for

pytestmark = [pytest.mark.slow]


def stager_app(site_id: int):
    from balsam.api import ApplicationDefinition

    class Upper(ApplicationDefinition):
        site = site_id
        command_template = "tr a-z A-Z < input.txt > result.txt"
        transfers = {
            "input": {"required": True, "direction": "in", "local_path": "input.txt"},
            "result": {"required": True, "direction": "out", "local_path": "result.txt"},
        }

    Upper.sync()
    return Upper


def test_200_jobs_stage_in_run_and_stage_out(make_site, agent_daemon, client, tmp_path) -> None:
    from balsam.api import Job

    remote = tmp_path / "remote"
    (remote / "in").mkdir(parents=True)
    site = make_site(overrides={"transfers": {"transfer_locations": {"shared": "local://"}, "service_period": 1}})
    app = stager_app(site.site_id)
    n = 200
    for i in range(n):
        (remote / "in" / f"{i}.txt").write_text(f"input number {i}\n")
    jobs = Job.objects.bulk_create([
        Job(f"e2e/{i}", app, node_packing_count=16,
            transfers={"input": f"shared:{remote}/in/{i}.txt", "result": f"shared:{remote}/out/{i}.txt"})
        for i in range(n)
    ])
    assert state_counts(client, site_id=site.site_id) == {"READY": n}
    agent_daemon(site)
    create_batch_job(client, site.site_id, "serial")
    wait_for(lambda: all_done(client, n, site_id=site.site_id), timeout=600, interval=1.0, what=f"{n} jobs")
    assert state_counts(client, site_id=site.site_id) == {"JOB_FINISHED": n}
    for i in range(n):
        assert (remote / "out" / f"{i}.txt").read_text() == f"INPUT NUMBER {i}\n"
    items = client.get("/transfers/", params={"site_id": site.site_id, "limit": 1000})
    assert items["count"] == 2 * n and {it["state"] for it in items["results"]} == {"done"}
    path = [(e["from_state"], e["to_state"]) for e in events(client, job_id=jobs[0].id)]
    assert path[0] == ("CREATED", "READY") and ("READY", "STAGED_IN") in path
    assert ("POSTPROCESSED", "JOB_FINISHED") in path


def _kill_agent_when(site, client, predicate, what: str) -> None:
    from balsam.site.agent import read_pid_file

    wait_for(predicate, timeout=120, interval=0.05, what=what)
    _host, pid = read_pid_file(Path(site.site_path))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(pid), timeout=30, what="the killed agent to disappear")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of this test is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_mid_transfer_loses_and_doubles_nothing(make_site, agent_daemon, client, tmp_path) -> None:
    from balsam.api import Job

    remote = tmp_path / "remote"
    (remote / "in").mkdir(parents=True)
    # No processing module: jobs stay in STAGED_IN, so the states count the transfers alone.
    site = make_site(overrides={"processing": None, "transfers": {
        "transfer_locations": {"shared": "local://"}, "service_period": 1,
        "transfer_batch_size": 5, "max_concurrent_transfers": 1,
    }})
    app = stager_app(site.site_id)
    n = 60
    payload = os.urandom(256 * 1024)
    for i in range(n):
        (remote / "in" / f"{i}.txt").write_bytes(payload + str(i).encode())
    jobs = Job.objects.bulk_create([
        Job(f"kill/{i}", app, transfers={"input": f"shared:{remote}/in/{i}.txt", "result": f"shared:{remote}/out/{i}.txt"})
        for i in range(n)
    ])
    ids = [j.id for j in jobs]
    data = Path(site.data_path)

    # Stage-in: 5 files a task, one task at a time -> 12+ cycles; kill the agent after a few.
    agent_daemon(site)
    _kill_agent_when(site, client, lambda: 10 <= state_counts(client, site_id=site.site_id)["STAGED_IN"] < n,
                     "some but not all stage-ins")
    staged_at_kill = state_counts(client, site_id=site.site_id)["STAGED_IN"]
    assert staged_at_kill < n
    agent_daemon(site)
    wait_for(lambda: state_counts(client, site_id=site.site_id)["STAGED_IN"] == n, timeout=300, what="all stage-ins")
    for i, job in enumerate(jobs):
        assert (data / job.workdir / "input.txt").read_bytes() == payload + str(i).encode()

    # Stage-out: the jobs "ran"; kill the agent again in the middle of the stage-outs.
    for i, job in enumerate(jobs):
        (data / job.workdir / "result.txt").write_bytes(b"result " + str(i).encode())
    finish_jobs(client, site.site_id, ids)
    _kill_agent_when(site, client, lambda: 10 <= state_counts(client, site_id=site.site_id)["JOB_FINISHED"] < n,
                     "some but not all stage-outs")
    agent_daemon(site)
    wait_for(lambda: state_counts(client, site_id=site.site_id)["JOB_FINISHED"] == n, timeout=300, what="all stage-outs")

    outputs = sorted((remote / "out").iterdir())
    assert [p.name for p in outputs] == sorted(f"{i}.txt" for i in range(n))  # nothing extra, nothing partial
    for i in range(n):
        assert (remote / "out" / f"{i}.txt").read_bytes() == b"result " + str(i).encode()
    assert not list(data.rglob("*.balsam-partial-*"))
    moves = Counter((e["job_id"], e["from_state"], e["to_state"]) for e in events(client, site_id=site.site_id))
    for job_id in ids:
        assert moves[(job_id, "READY", "STAGED_IN")] == 1
        assert moves[(job_id, "POSTPROCESSED", "JOB_FINISHED")] == 1
    items = client.get("/transfers/", params={"site_id": site.site_id, "limit": 1000})["results"]
    assert len(items) == 2 * n and {it["state"] for it in items} == {"done"}
    log = "\n".join(p.read_text() for p in (Path(site.site_path) / "log").glob("*agent*"))
    assert "transfers" in log


def test_a_missing_input_fails_its_job_with_the_reason_on_a_real_site(make_site, agent_daemon, client, tmp_path) -> None:
    """The agent daemon retries a missing file max_attempts times, then the job is FAILED with the
    reason (never left waiting in READY), while its neighbour runs to the end."""
    from balsam.api import Job

    remote = tmp_path / "remote"
    (remote / "in").mkdir(parents=True)
    (remote / "in" / "ok.txt").write_text("fine\n")
    site = make_site(overrides={"transfers": {"transfer_locations": {"shared": "local://"}, "service_period": 1,
                                              "max_attempts": 2, "retry_backoff_sec": 1}})
    app = stager_app(site.site_id)
    ok, missing = Job.objects.bulk_create([
        Job("f/ok", app, transfers={"input": f"shared:{remote}/in/ok.txt", "result": f"shared:{remote}/out/ok.txt"}),
        Job("f/missing", app, transfers={"input": f"shared:{remote}/in/nope.txt", "result": f"shared:{remote}/out/x.txt"}),
    ])
    agent_daemon(site)
    create_batch_job(client, site.site_id, "serial")
    wait_for(lambda: all_done(client, 2, site_id=site.site_id), timeout=180, interval=1.0, what="both jobs")
    states = {r["id"]: r["state"] for r in client.get("/jobs/", params={"site_id": site.site_id})["results"]}
    assert states == {ok.id: "JOB_FINISHED", missing.id: "FAILED"}
    assert (remote / "out" / "ok.txt").read_text() == "FINE\n"
    last = events(client, job_id=missing.id)[-1]
    assert (last["from_state"], last["to_state"]) == ("READY", "FAILED")
    assert last["data"]["attempts"] == 2 and "no such file or directory" in last["data"]["message"]

"""The elastic queue end to end on the real Slurm (shared/ci/start-slurm.sh) and the fake PBS:
a burst makes BatchJobs appear (sized from the driver's backfill windows) and run the jobs, the
empty backlog lets the launchers drain and nothing new is submitted, and a BatchJob stuck in the
queue past ``max_queue_wait_time_min`` is cancelled.

PBS reports free nodes that belong to no queue under the key ``*``: Balsam 0.7 looked only at the
submit queue's windows there (and its PBS/Slurm drivers reported none), so it never fired."""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from elastic_test_utils import idle_after_the_drain, needs_module_sections, runnable_jobs
from e2e_helpers import FAST, deep_merge, end_site, new_user, selected, wait_batch_job, wait_jobs_done
from fake_env import fake_batch_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

#: One fake PBS/Cobalt node, this host: serial mode checks that its workers run one per node, and
#: several fake nodes would all be this host.
FAKE_NODES = socket.gethostname()
#: project, nodes, and the wall time of the elastic BatchJobs: min(window - pad 2, max_wall_time_min 30)
#: (Slurm: partition without a limit; PBS: backfill_window_min 60; Cobalt: the fake's 30-minute backfill)
SCHEDULERS = {
    "slurm": {"project": "root", "nodes": 4, "wall": 30},
    "pbs": {"project": "proj", "nodes": 1, "wall": 30},
    "cobalt": {"project": "proj", "nodes": 1, "wall": 28},
}


def blocker_command(kind: str, nodes: int, script: Path) -> list[str]:
    """Someone else's job holding every fake node for 15 minutes."""
    if kind == "pbs":
        return ["qsub", "-q", "debug", "-l", f"select={nodes}", "-l", "walltime=00:15:00", str(script)]
    return ["qsub", "-q", "debug", "-n", str(nodes), "-t", "15", "-A", "proj", str(script)]


def _kinds(*fakes: str) -> list:
    return [pytest.param("slurm", marks=[pytest.mark.slurm,
                                         pytest.mark.skipif(shutil.which("sbatch") is None, reason="no Slurm here")]),
            *fakes]


def _agent_log(path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((path / "log").glob("agent_*.log")))


def _start_elastic_site(root: Path, client: Any, setenv: Any, kind: str, elastic: dict,
                        **fake_settings: str) -> tuple[Path, int, dict]:
    """A site under ``root`` on that scheduler with the elastic queue on and its agent running
    (``fake_settings``: FAKE_BATCH_* settings of a fake scheduler, put in the environment with
    ``setenv``); returns (path, site_id, tags)."""
    from balsam.plugins.manager import reset_plugin_manager
    from balsam.site.site_ops import init_site, start_agent

    if kind != "slurm":
        for key, value in fake_batch_env(f"fake_{kind}", root / f"{kind}-server", FAKE_BATCH_NODES=FAKE_NODES,
                                         FAKE_COBALT_PROJECTS="proj", **fake_settings).items():
            setenv(key, value)
    reset_plugin_manager()
    spec = SCHEDULERS[kind]
    tags = {"campaign": f"elastic-{uuid.uuid4().hex[:8]}"}
    name = f"elastic-{kind}-{uuid.uuid4().hex[:6]}"
    path = root / name
    settings = deep_merge(FAST, {
        "filter_tags": tags,
        # The launchers drain 1 s after their last job, not FAST's 3 s: the bursts wait for it
        # (every BatchJob finished) and it is no less a drain.
        "launcher": {"idle_ttl_sec": 1},
        "scheduler": {"allowed_queues": {"debug": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 10}},
                      "allowed_projects": [spec["project"]]},
        "elastic_queue": {"service_period": 2, "submit_queue": "debug", "submit_project": spec["project"],
                          "job_mode": "serial", "min_wall_time_min": 10, "wall_time_pad_min": 2,
                          "max_wall_time_min": 30, "max_num_nodes": spec["nodes"], "max_queued_jobs": 2, **elastic},
    })
    site_id = init_site(path, name, "default", client, settings_overrides=settings, scheduler_name=kind)
    start_agent(path)
    return path, site_id, tags


def _stop_elastic_site(client: Any, path: Path, site_id: int) -> None:
    """Its BatchJobs deleted, then its agent stopped."""
    end_site(client, path, site_id)


@pytest.fixture
def elastic_site(balsam_env, tmp_path, monkeypatch) -> Iterator[Any]:
    """``start(kind, elastic_settings, **fake_settings) -> (path, site_id, client, tags)``: a site on
    that scheduler with the elastic queue on and its agent running (``fake_settings``: FAKE_BATCH_*
    settings of a fake scheduler); BatchJobs deleted and the agent stopped after."""
    from balsam.client import load_client

    started: list[tuple[Path, int]] = []
    client = load_client()

    def start(kind: str, elastic: dict, **fake_settings: str) -> tuple[Path, int, Any, dict]:
        path, site_id, tags = _start_elastic_site(tmp_path, client, monkeypatch.setenv, kind, elastic, **fake_settings)
        started.append((path, site_id))
        return path, site_id, client, tags

    yield start
    for path, site_id in started:
        _stop_elastic_site(client, path, site_id)


#: The test whose Slurm case waits out a whole minute of queueing with no node in use.
STALE_SLURM_TEST = "test_a_batch_job_queued_past_the_limit_is_cancelled[slurm]"


@pytest.fixture(scope="module", autouse=True)
def slurm_stale_request(request, _live_server_obj, tmp_path_factory) -> Iterator[Any]:
    """The Slurm case of :func:`test_a_batch_job_queued_past_the_limit_is_cancelled`, started when
    this module starts (if that test is to run here): Slurm's queued time counts whole minutes, so
    its request must wait in the queue a minute at least, and the other tests of the module (the
    bursts and the fake PBS's case; that test runs last) run meanwhile instead of after it, the CI's
    time. It holds no node (one more than the cluster has: it never starts), and a request that
    never starts claims no window of another site's elastic queue (backfill.unclaimed_windows), so
    the Slurm burst runs on the same idle nodes as alone. Its own user, site and agent; yields
    ``(path, client, stuck BatchJob)`` for the test to check, None when it is not to run here."""
    if not selected(request, STALE_SLURM_TEST) or shutil.which("sbatch") is None:
        yield None
        return
    from balsam.client import load_client

    root = tmp_path_factory.mktemp("elastic-stale-slurm")
    with new_user(_live_server_obj.url, root / "balsam-home"):
        client = load_client()
        path, site_id, tags = _start_elastic_site(root, client, None, "slurm", {"max_queue_wait_time_min": 0})
        try:
            stuck, _blocker = _submit_a_stuck_request("slurm", path, site_id, client, tags)
            yield path, client, stuck
        finally:
            _stop_elastic_site(client, path, site_id)


@pytest.mark.parametrize("kind", _kinds("pbs", "cobalt"))
def test_a_burst_gets_batch_jobs_that_run_it_then_the_launchers_drain(kind, elastic_site) -> None:
    path, site_id, client, tags = elastic_site(kind, {"max_queue_wait_time_min": 10})
    made, rows = _run_a_burst(path, site_id, client, tags, "backfill")
    assert all(1 <= b["num_nodes"] <= 3 and b["wall_time_min"] == SCHEDULERS[kind]["wall"] for b in made), made
    log = _agent_log(path)
    submits = [ln for ln in log.splitlines() if "[backfill] submit" in ln]
    assert submits and "runnable=12 runnable_footprint=3 " in submits[0], submits
    assert "window=" in submits[0] and "nothing: no backfill window" not in log.split(submits[0])[0], log[-4000:]


@needs_module_sections
def test_simple_blocks_on_the_fake_pbs(elastic_site) -> None:
    """strategy: simple from settings.yml: 3 one-node blocks for a footprint of 3, none wider."""
    path, site_id, client, tags = elastic_site("pbs", {
        "strategy": "simple", "max_queued_jobs": 4,
        "strategy_options": {"nodes_per_block": 1, "wall_time_min": 20, "max_blocks": 3}})
    made, _rows = _run_a_burst(path, site_id, client, tags, "simple")
    assert all(b["num_nodes"] == 1 and b["wall_time_min"] == 20 for b in made) and 1 <= len(made) <= 3, made
    actions = [ln.split("[simple] ", 1)[1].split(": ", 1)[0] for ln in _agent_log(path).splitlines() if "[simple] submit" in ln]
    submitted = sum(action.count("submit 1 nodes x 20 min") for action in actions)
    assert submitted == len(made), _agent_log(path)[-4000:]


def _run_a_burst(path: Path, site_id: int, client: Any, tags: dict, strategy: str) -> tuple[list, dict]:
    """12 jobs packed 4 to a node (a footprint of 3 nodes) run to the end; the launchers drain and
    nothing new is submitted. Returns the BatchJobs made and the jobs' rows."""
    from balsam.api import ApplicationDefinition, Job

    class Burst(ApplicationDefinition):
        site = site_id
        command_template = "sleep 1; echo burst {{ i }}"

    Burst.sync()
    jobs = Job.objects.bulk_create([Burst.submit(workdir=f"burst/{i}", i=i, node_packing_count=4, tags=tags, save=False)
                                    for i in range(12)])
    Job.objects.bulk_create([Burst.submit(workdir="not-ours/0", i=0, tags={"campaign": "someone-else"}, save=False)])
    rows = wait_jobs_done(client, [j.id for j in jobs], 240)
    assert {r["state"] for r in rows.values()} == {"JOB_FINISHED"}, _agent_log(path)[-4000:]

    made = client.get("/batch-jobs/", params={"site_id": site_id})["results"]
    assert made, _agent_log(path)[-4000:]
    assert all(b["filter_tags"] == tags and b["queue"] == "debug" and b["job_mode"] == "serial" for b in made), made

    # the backlog is empty: the launchers leave after idle_ttl_sec, and nothing new is submitted
    for b in made:
        wait_batch_job(client, b["id"], {"finished"}, 120)
    wait_for(lambda: idle_after_the_drain(_agent_log(path), strategy), 30, "an idle decision after the drain")
    assert len(client.get("/batch-jobs/", params={"site_id": site_id})["results"]) == len(made)
    assert all(r["batch_job_id"] in {b["id"] for b in made} for r in rows.values())
    return made, rows


@pytest.mark.parametrize("kind", _kinds())
def test_batch_jobs_that_lease_nothing_are_spaced_out(kind, elastic_site) -> None:
    """The audit's reproduction on the real Slurm: the default platform (which names no GPU before
    it runs), elastic_queue.node_gpus not set, 2 jobs of gpus_per_rank 1. The launchers on the
    GPU-less nodes never lease them (max_gpus_per_node 0); each BatchJob leaves having run nothing.
    Before: 9 BatchJobs of 2 nodes x 30 min in 50 s, for as long as the agent ran, no word why. Now,
    after 2 such BatchJobs, one ERROR names the likely causes and submissions are spaced out (the
    churn guard, balsam_elastic.churn)."""
    from balsam.api import ApplicationDefinition, Job

    path, site_id, client, tags = elastic_site(kind, {})

    class NeedsGpu(ApplicationDefinition):
        site = site_id
        command_template = "echo gpu {{ i }}"

    NeedsGpu.sync()
    jobs = Job.objects.bulk_create([NeedsGpu.submit(workdir=f"gpu/{i}", i=i, gpus_per_rank=1, tags=tags, save=False)
                                    for i in range(2)])
    said = "ended without leasing any of the 2 runnable job(s)"
    wait_for(lambda: said in _agent_log(path), 180, "the churn guard's ERROR")
    made = client.get("/batch-jobs/", params={"site_id": site_id})["results"]
    log = _agent_log(path)
    assert len(made) <= 3, (made, log[-4000:])
    assert "backing off after 2 BatchJob(s) in a row ended having leased no job" in log.split(said, 1)[1], log[-4000:]
    assert log.count(said) == 1
    states = {j["state"] for j in client.get("/jobs/", params={"id": [j.id for j in jobs]})["results"]}
    assert states == {"PREPROCESSED"}, states


# queued_time_min counts whole minutes: on the real Slurm this takes a minute at least; the fake PBS
# reports its jobs submitted two minutes before they were (FAKE_BATCH_BACKDATE_SEC), so that its
# qstat output carries the queued time at once. The module does the same on every driver.
def _submit_a_stuck_request(kind: str, path: Path, site_id: int, client: Any, tags: dict) -> tuple[dict, Any]:
    """A BatchJob of the elastic queue that cannot start, with a job for it to run; returns it and
    the fake scheduler's blocker job (None on Slurm)."""
    nodes = SCHEDULERS[kind]["nodes"]
    blocker = None
    if kind == "slurm":
        # one node more than the cluster has: sbatch accepts it, Slurm never starts it
        wanted = nodes + 1
    else:
        # PBS and Cobalt refuse a job wider than the machine: keep every node busy with someone else's job
        script = path / "blocker.sh"
        script.write_text("#!/bin/sh\nsleep 600\n")
        script.chmod(0o755)
        blocker = subprocess.run(blocker_command(kind, nodes, script), capture_output=True, text=True, check=True,
                                 cwd=path).stdout.strip().splitlines()[-1]
        wanted = 1
    try:
        # A job for it to run: with an empty backlog a request not started yet is cancelled as unneeded
        # before it is stale. Its reserved nodes cover the job, so no other request is submitted.
        runnable_jobs(client, SimpleNamespace(site_id=site_id), 1, tags=tags)
        # stamped as the module's own request: it never cancels a BatchJob it did not create
        stuck = client.post("/batch-jobs/", json={"site_id": site_id, "project": SCHEDULERS[kind]["project"],
                                                  "queue": "debug", "num_nodes": wanted, "wall_time_min": 5,
                                                  "job_mode": "serial", "filter_tags": tags,
                                                  "status_info": {"elastic_request": "backfill"}})
    except BaseException:
        if blocker:
            subprocess.run(["qdel", blocker], capture_output=True)
        raise
    return stuck, blocker


# queued_time_min counts whole minutes: on the real Slurm this takes a minute at least (started with
# the module: slurm_stale_request); the fake PBS reports its jobs submitted two minutes before they
# were (FAKE_BATCH_BACKDATE_SEC), so that its qstat output carries the queued time at once. The
# module does the same on every driver. The Slurm case last: the module's minute runs meanwhile.
@pytest.mark.parametrize("kind", list(reversed(_kinds("pbs"))))
def test_a_batch_job_queued_past_the_limit_is_cancelled(kind, elastic_site, slurm_stale_request) -> None:
    blocker = None
    if kind == "slurm" and slurm_stale_request is not None:
        path, client, stuck = slurm_stale_request
    else:
        path, site_id, client, tags = elastic_site(kind, {"max_queue_wait_time_min": 0},
                                                   **({} if kind == "slurm" else {"FAKE_BATCH_BACKDATE_SEC": "120"}))
        stuck, blocker = _submit_a_stuck_request(kind, path, site_id, client, tags)
    try:
        # (the fake PBS's job may be cancelled before this looks: the agent's log below says it was queued)
        wait_batch_job(client, stuck["id"], {"queued", "pending_deletion", "finished"}, 60)
        done = wait_batch_job(client, stuck["id"], {"finished"}, 180)  # queued_time_min counts whole minutes
    finally:
        if blocker:
            subprocess.run(["qdel", blocker], capture_output=True)
    log = _agent_log(path)
    assert f"cancel BatchJob {stuck['id']}" in log, log[-4000:]
    line = next(ln for ln in log.splitlines() if f"cancel BatchJob {stuck['id']}" in ln)
    assert "queued past max_queue_wait_time_min" in line and "stale=queued>0min" in line, line
    if kind == "slurm":
        assert done["status_info"]["scheduler_state"].startswith("CANCELLED"), done["status_info"]

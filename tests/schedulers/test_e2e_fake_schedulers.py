"""End to end on the fake PBS and Cobalt servers: site agent -> qsub -> launcher on the fake nodes
-> qstat -x / .cobaltlog history, deletion through pending_deletion, a wall-time kill."""

from __future__ import annotations

import socket
import sys

import pytest

from e2e_helpers import agent_log, batch_job, create_site, wait_batch_job, wait_jobs_done
from fake_env import fake_batch_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

KINDS = {"pbs": "fake_pbs", "cobalt": "fake_cobalt"}
SETTINGS = {
    "allowed_queues": {
        "debug": {"max_nodes": 3, "max_walltime": 60, "max_queued_jobs": 10},
        "nosuchqueue": {"max_nodes": 3, "max_walltime": 60, "max_queued_jobs": 10},
    },
    "allowed_projects": ["proj"],
    "optional_batch_job_params": {"linger": "", "filesystems": "", "attrs": ""},
}
#: -x linger=SECONDS keeps the allocation busy after the launcher exits
LINGER = '{% if optional_params.get("linger") %}sleep {{ optional_params["linger"] }}\n{% endif %}'
#: Three fake nodes, all this host under different names (hydra starts local hosts without ssh).
NODES = f"localhost,127.0.0.1,{socket.gethostname()}"


@pytest.fixture
def fake_minute() -> str:
    """Seconds in a fake wall-time minute (a test parametrizes it to provoke wall-time kills)."""
    return "60"


@pytest.fixture(params=sorted(KINDS))
def fake_site(request, fake_minute, balsam_env, tmp_path, monkeypatch):
    from balsam.client import load_client
    from balsam.plugins.manager import get_plugin_manager, reset_plugin_manager
    from balsam.site.site_ops import start_agent, stop_agent

    kind = request.param
    for key, value in fake_batch_env(KINDS[kind], tmp_path / "batch-server", FAKE_BATCH_NODES=NODES,
                                     FAKE_BATCH_SECONDS_PER_MINUTE=fake_minute, FAKE_COBALT_PROJECTS="proj").items():
        monkeypatch.setenv(key, value)
    reset_plugin_manager()
    driver = get_plugin_manager().load_driver("scheduler", kind)
    template = driver.default_job_template.replace("exec {{ launcher_cmd }}", "{{ launcher_cmd }}") + LINGER
    name, path, site_id = create_site(tmp_path, kind, SETTINGS, template)
    start_agent(path)
    client = load_client()
    yield kind, name, path, site_id, client
    active = client.get("/batch-jobs/", params={"site_id": site_id, "state": ["pending_submission", "queued", "running"]})
    if active["results"]:
        client.patch("/batch-jobs/", json=[{"id": b["id"], "state": "pending_deletion"} for b in active["results"]])
        wait_for(lambda: not client.get("/batch-jobs/", params={"site_id": site_id, "state": ["pending_deletion"]})["results"],
                 60, "teardown deletions")
    stop_agent(path, timeout=30, force=True)


def _new_batch_job(client, site_id: int, **fields) -> dict:
    body = {"site_id": site_id, "project": "proj", "queue": "debug", "num_nodes": 1, "wall_time_min": 5,
            "job_mode": "mpi", **fields}
    return client.post("/batch-jobs/", json=body)


def test_campaign_in_mpi_and_serial_mode(fake_site):
    from balsam.api import ApplicationDefinition, Job

    kind, name, path, site_id, client = fake_site
    job_id_var = "PBS_JOBID" if kind == "pbs" else "COBALT_JOBID"
    program = path / "mpi_hello.py"
    program.write_text(
        "import os, socket\nfrom mpi4py import MPI\ncomm = MPI.COMM_WORLD\ntotal = comm.allreduce(comm.rank)\n"
        "os.write(1, f'rank {comm.rank} of {comm.size} sum {total}\\n'.encode())\n"
    )

    class MpiHello(ApplicationDefinition):
        site = name
        command_template = f"{sys.executable} {program}"

    class Where(ApplicationDefinition):
        site = name
        command_template = f"echo task {{{{ i }}}} in ${job_id_var}"

    MpiHello.sync()
    Where.sync()
    mpi_jobs = Job.objects.bulk_create([MpiHello.submit(workdir=f"mpi/{i}", num_nodes=2, ranks_per_node=2, save=False,
                                                        tags={"mode": "mpi"}) for i in range(2)])
    serial_jobs = Job.objects.bulk_create([Where.submit(workdir=f"serial/{i}", i=i, save=False, tags={"mode": "serial"})
                                           for i in range(5)])
    mpi_batch = _new_batch_job(client, site_id, num_nodes=2, job_mode="mpi", filter_tags={"mode": "mpi"},
                               optional_params={"filesystems": "home:grand"} if kind == "pbs" else {"attrs": "mcdram=cache"})
    serial_batch = _new_batch_job(client, site_id, num_nodes=1, job_mode="serial", filter_tags={"mode": "serial"})
    refused = _new_batch_job(client, site_id, queue="nosuchqueue")

    failed = wait_batch_job(client, refused["id"], {"submit_failed"}, 60)
    assert ("Unknown queue" if kind == "pbs" else "not a valid queue name") in failed["status_info"]["error"]

    rows = wait_jobs_done(client, [j.id for j in mpi_jobs + serial_jobs], 180)
    assert {r["state"] for r in rows.values()} == {"JOB_FINISHED"}, agent_log(path)
    for i in range(2):
        out = (path / "data" / f"mpi/{i}" / "job.out").read_text()
        assert sorted(ln for ln in out.splitlines() if ln.startswith("rank")) == [
            f"rank {r} of 4 sum 6" for r in range(4)], out
    serial_scheduler_id = batch_job(client, serial_batch["id"])["scheduler_id"]
    for i in range(5):
        assert f"task {i} in {serial_scheduler_id}" in (path / "data" / f"serial/{i}" / "job.out").read_text()

    for batch in (mpi_batch, serial_batch):
        done = wait_batch_job(client, batch["id"], {"finished"}, 120)
        info = done["status_info"]
        assert info["scheduler_state"] == ("F (Exit_status 0)" if kind == "pbs" else "finished"), info
        assert done["start_time"] and done["end_time"] and done["start_time"] <= done["end_time"]
    script = (path / "qsubmit" / f"qlaunch{mpi_batch['id']:05d}.sh").read_text()
    assert ("#PBS -l filesystems=home:grand" if kind == "pbs" else "#COBALT --attrs mcdram=cache") in script


# 4-second minutes: the 1-minute BatchJob is killed 4 s after it starts, and the 10-minute one still
# has 40 s to be seen running and deleted.
@pytest.mark.parametrize("fake_minute", ["4"])
def test_deletion_and_walltime_kill(fake_site):
    kind, name, path, site_id, client = fake_site
    doomed = _new_batch_job(client, site_id, wall_time_min=10, optional_params={"linger": "600"})
    short = _new_batch_job(client, site_id, wall_time_min=1, optional_params={"linger": "600"})  # 4 s here
    wait_batch_job(client, doomed["id"], {"running"}, 60)
    client.patch("/batch-jobs/", json=[{"id": doomed["id"], "state": "pending_deletion"}])
    deleted = wait_batch_job(client, doomed["id"], {"finished"}, 60)
    assert deleted["start_time"] and deleted["end_time"]
    if kind == "pbs":
        assert deleted["status_info"]["scheduler_state"] == "F (Exit_status 271)", deleted["status_info"]
    else:
        assert "killed by user" in deleted["status_info"]["scheduler_message"], deleted["status_info"]
    killed = wait_batch_job(client, short["id"], {"finished"}, 90)
    message = killed["status_info"]["scheduler_message"]
    assert ("exceeded limit" if kind == "pbs" else "exceeded its walltime") in message, killed["status_info"]
    assert killed["start_time"] and killed["end_time"]

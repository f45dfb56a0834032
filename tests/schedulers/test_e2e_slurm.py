"""End to end on the real Slurm: site agent -> sbatch -> launcher on the allocated nodes -> sacct."""

from __future__ import annotations

import contextlib
import getpass
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from balsam_scheduler_slurm import SlurmScheduler

from e2e_helpers import agent_log, batch_job, create_site, end_site, new_user, selected, wait_batch_job, wait_jobs_done
from fake_env import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.mpi]

SLURM_SETTINGS = {
    "allowed_queues": {"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 10}},
    "allowed_projects": ["root"],
    "optional_batch_job_params": {"reservation": "", "constraint": "", "linger": ""},
}
#: The Slurm default template, plus a `-x linger=SECONDS` option that keeps the allocation busy
#: after the launcher (to provoke a wall-time TIMEOUT).
LINGER_TEMPLATE = SlurmScheduler.default_job_template.replace("exec {{ launcher_cmd }}", "{{ launcher_cmd }}") + (
    '{% if optional_params.get("linger") %}sleep {{ optional_params["linger"] }}\n{% endif %}'
)


@contextlib.contextmanager
def running_slurm_site(tmp_path: Path, settings: dict):
    """A site on the real Slurm with its agent running; its BatchJobs are deleted at the end."""
    from balsam.client import load_client
    from balsam.plugins.manager import reset_plugin_manager
    from balsam.site.site_ops import start_agent

    reset_plugin_manager()
    name, path, site_id = create_site(tmp_path, "slurm", settings, LINGER_TEMPLATE)
    start_agent(path)
    client = load_client()
    try:
        yield name, path, site_id, client
    finally:
        end_site(client, path, site_id)


@pytest.fixture
def slurm_site(balsam_env, tmp_path):
    with running_slurm_site(tmp_path, SLURM_SETTINGS) as site:
        yield site


def _new_batch_job(client, site_id: int, **fields) -> dict:
    body = {"site_id": site_id, "project": "root", "queue": "debug", "num_nodes": 2, "wall_time_min": 5,
            "job_mode": "mpi", **fields}
    return client.post("/batch-jobs/", json=body)


def test_campaign_runs_across_allocated_nodes_in_mpi_and_serial_mode(slurm_site):
    from balsam.api import ApplicationDefinition, Job

    name, path, site_id, client = slurm_site

    program = path / "mpi_hello.py"
    program.write_text(
        "import os\nfrom mpi4py import MPI\n"
        "comm = MPI.COMM_WORLD\ntotal = comm.allreduce(comm.rank)\n"
        "os.write(1, f'rank {comm.rank} of {comm.size} on {os.environ.get(\"SLURMD_NODENAME\")} sum {total}\\n'.encode())\n"
    )

    class MpiHello(ApplicationDefinition):
        site = name
        command_template = f"{sys.executable} {program}"

    class Where(ApplicationDefinition):
        site = name
        command_template = "echo task {{ i }} job $SLURM_JOB_ID on $SLURMD_NODENAME"

    MpiHello.sync()
    Where.sync()
    mpi_jobs = Job.objects.bulk_create([MpiHello.submit(workdir=f"mpi/{i}", num_nodes=2, ranks_per_node=1, save=False,
                                                        tags={"mode": "mpi"}) for i in range(2)])
    serial_jobs = Job.objects.bulk_create([Where.submit(workdir=f"serial/{i}", i=i, save=False, tags={"mode": "serial"})
                                           for i in range(6)])
    mpi_batch = _new_batch_job(client, site_id, job_mode="mpi", filter_tags={"mode": "mpi"})
    serial_batch = _new_batch_job(client, site_id, job_mode="serial", filter_tags={"mode": "serial"})
    refused = _new_batch_job(client, site_id, num_nodes=1, optional_params={"reservation": "no-such-reservation"})

    failed = wait_batch_job(client, refused["id"], {"submit_failed"}, 60)
    assert "reservation" in failed["status_info"]["error"].lower(), failed["status_info"]

    rows = wait_jobs_done(client, [j.id for j in mpi_jobs + serial_jobs], 180)
    assert {r["state"] for r in rows.values()} == {"JOB_FINISHED"}, agent_log(path)
    for i in range(2):
        out = (path / "data" / f"mpi/{i}" / "job.out").read_text()
        lines = sorted(ln for ln in out.splitlines() if ln.startswith("rank "))
        assert [ln.split()[:3] for ln in lines] == [["rank", "0", "of"], ["rank", "1", "of"]], out
        assert all(ln.endswith("sum 1") for ln in lines), out
        assert len({ln.split(" on ")[1].split()[0] for ln in lines}) == 2, out  # one rank on each allocated node
    serial_out = [(path / "data" / f"serial/{i}" / "job.out").read_text() for i in range(6)]
    serial_batch_now = batch_job(client, serial_batch["id"])
    assert all(f"job {serial_batch_now['scheduler_id']} on node" in o for o in serial_out), serial_out

    for batch in (mpi_batch, serial_batch):
        done = wait_batch_job(client, batch["id"], {"finished"}, 120)
        assert done["status_info"]["scheduler_state"] == "COMPLETED", done["status_info"]
        assert done["start_time"] and done["end_time"] and done["start_time"] <= done["end_time"]
        script = path / "qsubmit" / f"qlaunch{batch['id']:05d}.sh"
        assert script.exists() and script.with_suffix(".output").exists()
        sacct = SlurmScheduler(user=getpass.getuser()).get_history(done["scheduler_id"])
        assert sacct.start_time.isoformat().startswith(done["start_time"][:19].replace(" ", "T"))


def test_a_job_slurm_can_never_start_shows_the_reason_and_can_be_deleted(balsam_env, tmp_path):
    """8 nodes on a 4-node cluster: the site allows it (max_nodes 16), sbatch accepts it, and it
    waits forever; the BatchJob must say why (Slurm's pending reason) and still be deletable."""
    roomy = {**SLURM_SETTINGS, "allowed_queues": {"debug": {"max_nodes": 16, "max_walltime": 60, "max_queued_jobs": 10}}}
    with running_slurm_site(tmp_path, roomy) as (name, path, site_id, client):
        too_big = _new_batch_job(client, site_id, num_nodes=8, wall_time_min=5)
        waiting = wait_for(
            lambda: (b := batch_job(client, too_big["id"]))["status_info"].get("scheduler_reason") and b,
            60, "the Slurm pending reason in status_info", interval=0.5,
        )
        assert waiting["state"] == "queued", waiting
        reason = waiting["status_info"]["scheduler_reason"]
        assert reason in ("PartitionNodeLimit", "PartitionConfig"), waiting["status_info"]  # Slurm's words
        scheduler_id = waiting["scheduler_id"]
        # The site's queue snapshot is written apart from the BatchJob's update: wait for it too.
        queued = wait_for(lambda: client.get(f"/sites/{site_id}")["queued_jobs"].get(str(scheduler_id)), 30,
                          f"Slurm job {scheduler_id} in Site.queued_jobs", interval=0.5)
        assert queued["message"] == reason

        client.patch("/batch-jobs/", json=[{"id": too_big["id"], "state": "pending_deletion"}])
        deleted = wait_batch_job(client, too_big["id"], {"finished"}, 60)
        assert deleted["status_info"]["scheduler_state"].startswith("CANCELLED"), deleted["status_info"]
        wait_for(lambda: str(scheduler_id) not in client.get(f"/sites/{site_id}")["queued_jobs"], 30,
                 f"Slurm job {scheduler_id} to leave Site.queued_jobs")


#: An app that saves a checkpoint when it gets SIGTERM (a marker file in its workdir), as the
#: launcher's stop promises it may (docs/launcher.md, "Timeouts and shutdown").
CHECKPOINTING_APP = '''
import pathlib, signal, sys, time
def checkpoint(signum, frame):
    time.sleep(0.5)  # a checkpoint takes a moment: a SIGKILL right behind the SIGTERM would cut it
    pathlib.Path("checkpoint.txt").write_text(f"saved at signal {signum}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, checkpoint)
pathlib.Path("started.txt").write_text("running\\n")
time.sleep(600)
'''


def _start_perlmutter_checkpoint_run(name: str, path: Path, site_id: int, client) -> tuple[int, dict, Path]:
    """The Perlmutter checkpoint case of the test below, started: its settings (platform
    perlmutter-gpu), the app, its Job and a 1-minute BatchJob; returns (job id, BatchJob, workdir)."""
    from balsam.api import ApplicationDefinition

    settings = yaml.safe_load((path / "settings.yml").read_text())
    # This cluster's nodes: 2 logical CPUs, no GPUs, no craynetwork gres.
    settings["launcher"]["platform"] = "perlmutter-gpu"
    settings["launcher"]["platform_options"] = {"cpu_ids": "0", "gpu_ids": "", "srun": "srun", "single_rank_gres": ""}
    (path / "settings.yml").write_text(yaml.safe_dump(settings))
    program = path / "checkpointing_app.py"
    program.write_text(CHECKPOINTING_APP)

    class Checkpointing(ApplicationDefinition):
        site = name
        command_template = f"{sys.executable} {program}"

    Checkpointing.sync()
    job = Checkpointing.submit(workdir="ckpt/0", num_nodes=1, ranks_per_node=1)
    batch = _new_batch_job(client, site_id, num_nodes=1, wall_time_min=1, job_mode="mpi")
    return job.id, batch, path / "data" / "ckpt" / "0"


WALLTIME_TEST = "test_pending_deletion_scancels_and_walltime_timeout_is_recorded_and_perlmutter_apps_get_sigterm"


@pytest.fixture(scope="module", autouse=True)
def walltime_cases(request, _live_server_obj, tmp_path_factory):
    """The cases of the test below, started when this module starts (if that test is to run here;
    it is the module's last): each waits out a 1-minute Slurm wall time, and the module's other
    tests run meanwhile instead of after it, the CI's time. The pending_deletion case runs to its
    end here, before them: its BatchJob would hold a third node that the campaign's two 2-node
    BatchJobs wait for; the two 1-minute ones leave two of the 4 nodes free, so the campaign's run
    one after the other, each on two nodes as alone. Their own user, sites and agents."""
    if not selected(request, WALLTIME_TEST):
        yield None
        return
    root = tmp_path_factory.mktemp("slurm-walltime")
    with new_user(_live_server_obj.url, root / "balsam-home"), \
            running_slurm_site(root, SLURM_SETTINGS) as (_, _, site_id, client), \
            running_slurm_site(root, SLURM_SETTINGS) as (pm_name, pm_path, pm_site_id, _):
        # Perlmutter case first: its 1-minute wall time runs while the cases below are checked.
        job_id, batch, workdir = _start_perlmutter_checkpoint_run(pm_name, pm_path, pm_site_id, client)

        # a launcher with nothing to run but a long idle_ttl is not an option here: linger instead
        doomed = _new_batch_job(client, site_id, num_nodes=1, wall_time_min=10, optional_params={"linger": "600"})
        timeout = _new_batch_job(client, site_id, num_nodes=1, wall_time_min=1, optional_params={"linger": "600"})
        wait_batch_job(client, doomed["id"], {"running"}, 60)
        client.patch("/batch-jobs/", json=[{"id": doomed["id"], "state": "pending_deletion"}])
        deleted = wait_batch_job(client, doomed["id"], {"finished"}, 60)
        yield SimpleNamespace(client=client, deleted=deleted, timeout=timeout, job_id=job_id, batch=batch,
                              workdir=workdir, pm_path=pm_path)


def test_pending_deletion_scancels_and_walltime_timeout_is_recorded_and_perlmutter_apps_get_sigterm(walltime_cases):
    """Two cases that each wait out a 1-minute Slurm wall time, run side by side (one wait, not two:
    the CI's time), each on its own site and agent, started with the module (walltime_cases):

    - pending_deletion scancels a running BatchJob (CANCELLED), and a BatchJob that outlives its
      wall time is recorded as Slurm's TIMEOUT (default platform);
    - mpi mode on the Perlmutter platform (srun steps): at the launcher's wall-time stop the app
      must get SIGTERM and have the grace to save its checkpoint. srun does not forward a SIGTERM
      sent to its process group: it SIGKILLed the step's tasks at once (sacct 0:9), so the app's
      handler never ran; the platform now sends it with ``scancel --signal=TERM`` to the job's step.
    """
    from balsam.api import EventLog

    case = walltime_cases
    client, deleted, workdir, pm_path = case.client, case.deleted, case.workdir, case.pm_path
    assert deleted["status_info"]["scheduler_state"].startswith("CANCELLED"), deleted["status_info"]
    assert deleted["start_time"] and deleted["end_time"]

    wait_for(lambda: (workdir / "started.txt").exists(), 120, "the app to start", interval=0.5)
    timed_out = wait_batch_job(client, case.timeout["id"], {"finished"}, 180)
    assert timed_out["status_info"]["scheduler_state"] == "TIMEOUT", timed_out["status_info"]
    assert timed_out["start_time"] and timed_out["end_time"]

    # (the Python API as the cases' user: the fixture's environment)
    done = wait_batch_job(client, case.batch["id"], {"finished"}, 150)
    states = [e.to_state for e in EventLog.objects.filter(job_id=[case.job_id])]
    assert "RUN_TIMEOUT" in states, (states, agent_log(pm_path))
    assert (workdir / "checkpoint.txt").exists(), (done["status_info"], agent_log(pm_path))
    assert (workdir / "checkpoint.txt").read_text() == "saved at signal 15\n"

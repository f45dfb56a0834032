"""Balsam 0.7 app hooks run by the processing module against a real API server: a hook that
builds its client with ``SiteConfig().client`` (what 0.7's docs tell hook authors to do), and a
"transfer-only" app whose preprocess skips the run by setting POSTPROCESSED."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from balsam.site.modules.processing import ProcessingModule
from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from site_test_utils import events, job_rows, state_path

LOCATIONS = {"files": "file://"}


def run_until(step, predicate, cycles: int = 600) -> None:
    for _ in range(cycles):
        step()
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("the jobs did not reach the expected states")


@pytest.fixture
def site(make_site):
    return make_site(overrides={"transfers": {"transfer_locations": LOCATIONS}})


@pytest.fixture
def processing(site, client):
    module = ProcessingModule(site, site.settings.processing, client)
    yield module
    module.close()


def processing_step(module: ProcessingModule):
    def step() -> None:
        module.run_cycle()
        module.flush()

    return step


def test_a_preprocess_that_skips_the_run_stages_out_then_finishes(site, client, processing, tmp_path) -> None:
    from balsam.api import ApplicationDefinition, Job, JobState

    site_id = site.site_id

    class TransferOnly(ApplicationDefinition):  # 0.7: a stage-out without a run
        site = site_id
        command_template = "true"
        transfers = {"payload": {"required": False, "direction": "out", "local_path": "payload.txt"}}

        def preprocess(self):
            Path("payload.txt").write_text(f"payload of job {self.job.id}\n")  # the hook runs in the workdir
            self.job.state = JobState.postprocessed

    TransferOnly.sync()
    remote = tmp_path / "remote"
    remote.mkdir()
    staged, bare = Job.objects.bulk_create([
        Job("xfer/1", TransferOnly, transfers={"payload": f"files:{remote}/payload.txt"}),
        Job("xfer/2", TransferOnly),
    ])
    run_until(processing_step(processing),
              lambda: all(r["state"] != "STAGED_IN" for r in job_rows(client, id=[staged.id, bare.id])))
    rows = {r["id"]: r for r in job_rows(client, id=[staged.id, bare.id])}
    # Without the skip the hook's POSTPROCESSED was refused and the job FAILED.
    assert rows[staged.id]["state"] == "POSTPROCESSED"
    items = client.get("/transfers/", params={"job_id": [staged.id]})["results"]
    assert [(i["direction"], i["state"]) for i in items] == [("out", "pending")]
    assert rows[bare.id]["state"] == "JOB_FINISHED"  # nothing to stage out
    assert state_path(events(client, job_id=bare.id)) == ["STAGED_IN", "POSTPROCESSED", "JOB_FINISHED"]

    transfers = TransfersModule(site, TransfersOptions(transfer_locations=LOCATIONS, service_period=1,
                                                       retry_backoff_sec=0), client)
    try:
        run_until(transfers.run_cycle, lambda: job_rows(client, id=[staged.id])[0]["state"] == "JOB_FINISHED")
    finally:
        transfers.close()
    assert (remote / "payload.txt").read_text() == f"payload of job {staged.id}\n"
    assert state_path(events(client, job_id=staged.id)) == ["STAGED_IN", "POSTPROCESSED", "JOB_FINISHED"]
    assert processing.updater is not None and processing.updater.dropped == []


def test_a_hook_creates_a_job_through_site_config_client(site, client, monkeypatch) -> None:
    """The hook runs as in a processing worker (``run_hooks``, the worker's entry), in this process:
    the module's forkserver keeps the environment of the first test that started it, so its
    workers would read another test's login."""
    from balsam.api import ApplicationDefinition, Job
    from balsam.site.hooks_runner import run_hooks

    site_id = site.site_id
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)  # the hook finds its site from its workdir

    class Spawner(ApplicationDefinition):
        site = site_id
        command_template = "echo {{ x }}"

        def postprocess(self):
            from balsam.config import SiteConfig

            client = SiteConfig().client  # as Balsam 0.7's docs tell hook authors to do
            ChildJob = client.Job
            ChildJob.objects.create(workdir=self.job.workdir / "child", app_id=self.job.app_id,
                                    parameters={"x": 2}, tags={"spawned_by": str(self.job.id)})
            self.job.state = "POSTPROCESSED"

    parent = Spawner.submit("spawn/1", x=1)
    # What the processing module and a launcher do: preprocess, lease, run, report RUN_DONE.
    client.patch("/jobs/", json=[{"id": parent.id, "state": "PREPROCESSED"}])
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})
    for state in ("RUNNING", "RUN_DONE"):
        client.patch("/jobs/", json=[{"id": parent.id, "state": state}])
    client.delete(f"/sessions/{session}")
    record = client.get(f"/jobs/{parent.id}")
    updates = run_hooks(client.get(f"/apps/{parent.app_id}"), [record], False, str(site.data_path))
    assert updates[0]["state"] == "POSTPROCESSED", updates[0].get("state_data")
    client.patch("/jobs/", json=updates)
    assert job_rows(client, id=[parent.id])[0]["state"] == "JOB_FINISHED"
    children = Job.objects.filter(tags={"spawned_by": str(parent.id)})
    assert [(str(c.workdir), c.get_parameters(), c.state.value) for c in children] == [("spawn/1/child", {"x": 2}, "STAGED_IN")]

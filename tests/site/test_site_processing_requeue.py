"""The processing module keeps the jobs it leased when a cycle fails half-way through dispatching
them (an API outage while an app loads): they stay in its backlog and are dispatched next cycle.
Before, they were dropped from the backlog while its session still held them, so no one ran their
hooks until the agent restarted."""

from __future__ import annotations

from balsam.site.modules.processing import ProcessingModule
from site_test_utils import job_rows


def test_jobs_of_a_failed_dispatch_are_dispatched_next_cycle(make_site, client, monkeypatch) -> None:
    import pytest

    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    module = ProcessingModule(site, site.settings.processing, client)
    try:
        site_id = site.site_id

        class Echo(ApplicationDefinition):
            site = site_id
            command_template = "echo {{ word }}"

        Echo.sync()
        ids = [j.id for j in Job.objects.bulk_create([Job(f"echo/{i}", Echo, parameters={"word": "w"}) for i in range(5)])]
        real_info, calls = module.apps.info, []

        def info_once_down(app_id):
            calls.append(app_id)
            if len(calls) == 2:  # the second job: its app's record expired and the API is away
                raise ConnectionError("API unreachable")
            return real_info(app_id)

        monkeypatch.setattr(module.apps, "info", info_once_down)
        with pytest.raises(ConnectionError):
            module.run_cycle()  # the agent logs it and backs off
        assert sorted(j["id"] for j in module.backlog) == sorted(ids)
        module.run_cycle()
        module.flush()
        assert {r["state"] for r in job_rows(client, id=ids)} == {"PREPROCESSED"}
        assert module.backlog == []
    finally:
        module.close()


def test_a_hook_that_kills_its_worker_fails_its_job_alone(make_site, client) -> None:
    """One job's postprocess ends its worker process (os._exit): the pool breaks, and every job
    of the chunk (16 per chunk) used to fail with it. Each is now run again alone: only that job
    fails, with the reason, and the others are postprocessed."""
    from pathlib import Path

    from balsam.api import ApplicationDefinition, Job
    from site_test_utils import events

    site = make_site()
    module = ProcessingModule(site, site.settings.processing, client)
    try:
        site_id = site.site_id

        class Fragile(ApplicationDefinition):
            site = site_id
            command_template = "true"

            def postprocess(self):
                if self.job.data.get("kill"):
                    import os

                    os._exit(3)
                self.job.state = "POSTPROCESSED"

        Fragile.sync()
        jobs = Job.objects.bulk_create([Job(f"f/{i}", Fragile, data={"kill": i == 2}) for i in range(5)])
        ids = [j.id for j in jobs]
        session = client.post("/sessions/", json={"site_id": site_id})["id"]
        client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids])
        client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})
        client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in ids])
        for job in jobs:
            (Path(site.data_path) / str(job.workdir)).mkdir(parents=True, exist_ok=True)
        client.patch("/jobs/", json=[{"id": i, "state": "RUN_DONE"} for i in ids])
        client.delete(f"/sessions/{session}")

        import time

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            module.run_cycle()
            module.flush()
            states = {r["id"]: r["state"] for r in job_rows(client, id=ids)}
            if all(s in ("JOB_FINISHED", "FAILED") for s in states.values()):
                break
            time.sleep(0.2)
        assert states == {i: ("FAILED" if i == ids[2] else "JOB_FINISHED") for i in ids}
        failed = [e for e in events(client, job_id=ids[2]) if e["to_state"] == "FAILED"][0]
        assert "the hook worker process died" in failed["data"]["message"]
        assert module.alone == set()
    finally:
        module.close()

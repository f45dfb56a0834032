"""A hook that saves its job's new state itself and then goes on: raises, or sets another state, or
is a Balsam 0.7 postprocess saving JOB_FINISHED; against a real server and real hook workers.

Once the hook's save moved the job, the processing session no longer holds it: the FAILED of a
hook that raised afterwards, or the state it set after its save, was refused (HTTP 409: an ERROR,
and a WARNING at the stop) and the job stayed in the saved state. A 0.7 postprocess's saved
JOB_FINISHED was refused by the server (RUN_DONE -> JOB_FINISHED; 0.7's server took any state)
and failed the job."""

from __future__ import annotations

import logging

from balsam.site.modules.processing import ProcessingModule
from site_test_utils import events, job_rows, process_until, state_path

MODES = {  # the job's data "mode": the state its hook runs in
    "save_then_raise": "STAGED_IN",
    "save_then_fail": "RUN_TIMEOUT",
    "finished_07": "RUN_DONE",
}


def test_a_hooks_changes_after_its_own_save_are_kept(make_site, client, caplog) -> None:
    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    sid = site.site_id

    class Saver(ApplicationDefinition):
        site = sid
        command_template = "echo hi"

        def preprocess(self):
            self.job.state = "PREPROCESSED"
            self.job.save()
            raise RuntimeError("after the save")

        def handle_timeout(self):
            self.job.state = "RESTART_READY"
            self.job.save()
            self.job.state = "FAILED"
            self.job.state_data = {"message": "out of retries"}

        def postprocess(self):
            self.job.state = "JOB_FINISHED"  # Balsam 0.7
            self.job.save()

    Saver.sync()
    jobs = Job.objects.bulk_create([Job(f"p/{mode}", Saver, data={"mode": mode}) for mode in MODES])
    ids = {mode: job.id for mode, job in zip(MODES, jobs)}
    ran = [ids[mode] for mode, state in MODES.items() if state != "STAGED_IN"]
    client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ran])
    session = client.post("/sessions/", json={"site_id": sid})["id"]
    client.post(f"/sessions/{session}", json={"max_num_jobs": 50, "filter_tags": {}})
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in ran])
    client.patch("/jobs/", json=[{"id": ids[mode], "state": state} for mode, state in MODES.items() if mode in ran
                                 or state != "STAGED_IN"])
    client.delete(f"/sessions/{session}")

    module = ProcessingModule(site, site.settings.processing, client)
    with caplog.at_level(logging.INFO):
        try:
            process_until(module, lambda: all(r["state"] in ("FAILED", "JOB_FINISHED")
                                              for r in job_rows(client, id=list(ids.values()))))
        finally:
            module.close()
    rows = {r["id"]: r for r in job_rows(client, id=list(ids.values()))}
    assert rows[ids["save_then_raise"]]["state"] == "FAILED"
    failed = events(client, job_id=ids["save_then_raise"])[-1]
    assert "RuntimeError: after the save" in failed["data"]["error"], failed
    assert state_path(events(client, job_id=ids["save_then_fail"]))[-2:] == ["RESTART_READY", "FAILED"]
    assert events(client, job_id=ids["save_then_fail"])[-1]["data"] == {"message": "out of retries"}
    assert state_path(events(client, job_id=ids["finished_07"]))[-3:] == ["RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"]
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [], problems

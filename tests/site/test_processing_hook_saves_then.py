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


# The hook runs as in a processing worker (``run_hooks``, the worker's entry), in this process: what
# is checked is the worker's update and the server's record, and real hook workers cost seconds.

def _launcher_takes(job_id: int, site_id: int) -> None:
    """What a launcher does with an acquirable job: lease it under its session, report RUNNING (the
    session's id in a tag, for the test's RUN_DONE)."""
    from balsam.client.default import get_default_client

    client = get_default_client()
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    client.post(f"/sessions/{session}", json={"max_num_jobs": 5, "filter_tags": {}})
    client.patch("/jobs/", json=[{"id": job_id, "state": "RUNNING", "session_id": session,
                                  "tags": {"session": str(session)}}])


def _run_hook(client, job_id: int, data_path) -> dict:
    from balsam.site.hooks_runner import run_hooks

    record = client.get(f"/jobs/{job_id}")
    return run_hooks(client.get(f"/apps/{record['app_id']}"), [record], False, str(data_path))[0]


def test_a_hooks_later_change_is_not_applied_once_a_launcher_took_the_saved_job(make_site, client) -> None:
    """A saved PREPROCESSED (or RESTART_READY) is acquirable at once: a launcher leased the job and
    reported RUNNING while the hook went on; the hook's later FAILED (it raised, or set it) went
    without a session, over the launcher's run (RUNNING -> FAILED, the launcher's RUN_DONE refused).
    Now it is applied only while the job is still in the state the hook saved."""
    from balsam.api import ApplicationDefinition, Job
    from balsam.site import hooks_runner

    site = make_site()
    sid = site.site_id

    class Taken(ApplicationDefinition):
        site = sid
        command_template = "echo hi"

        def preprocess(self):
            self.job.state = "PREPROCESSED"
            self.job.save()
            _launcher_takes(self.job.id, self.job.data["site"])
            raise RuntimeError("input generation failed after the save")

        def handle_timeout(self):
            self.job.state = "RESTART_READY"
            self.job.save()
            _launcher_takes(self.job.id, self.job.data["site"])
            self.job.state = "FAILED"

    Taken.sync()
    pre, timeout = Job.objects.bulk_create([Job(f"t/{i}", Taken, data={"site": sid}) for i in range(2)])
    client.patch("/jobs/", json=[{"id": timeout.id, "state": "PREPROCESSED"}])
    session = client.post("/sessions/", json={"site_id": sid})["id"]
    client.post(f"/sessions/{session}", json={"max_num_jobs": 5, "filter_tags": {}})
    client.patch("/jobs/", json=[{"id": timeout.id, "state": state} for state in ("RUNNING", "RUN_TIMEOUT")])
    client.delete(f"/sessions/{session}")

    for job, saved in ((pre, "PREPROCESSED"), (timeout, "RESTART_READY")):
        update = _run_hook(client, job.id, site.data_path)
        row = job_rows(client, id=[job.id])[0]
        assert row["state"] == "RUNNING", state_path(events(client, job_id=job.id))
        reason = update[hooks_runner.NOT_APPLIED_KEY]  # the agent logs it (one WARNING)
        assert update[hooks_runner.SAVED_KEY] and f"the job is no longer {saved} (now RUNNING" in reason, update
        # The launcher's run goes on: its RUN_DONE is taken.
        client.patch("/jobs/", json=[{"id": job.id, "state": "RUN_DONE", "session_id": int(row["tags"]["session"])}])
        assert job_rows(client, id=[job.id])[0]["state"] == "RUN_DONE"


class _Odd:
    """Built lazily (the API's classes are imported by the tests): the preprocess of data["mode"]."""

    @staticmethod
    def app(site_id: int):
        from balsam.api import ApplicationDefinition

        class Odd(ApplicationDefinition):
            site = site_id
            command_template = "echo hi"

            def preprocess(self):
                if self.job.data["mode"] == "running":
                    self.job.state = "PREPROCESSED"
                    self.job.save()
                    self.job.state = "RUNNING"
                else:
                    self.job.state = "STAGED_IN"  # not ready yet (0.7 took that)
                    self.job.save()

        Odd.sync()
        return Odd


def test_a_state_set_after_the_save_is_checked(make_site, client) -> None:
    """A preprocess that saves PREPROCESSED, then sets RUNNING: the RUNNING went unchecked (a job
    that no launcher runs, RUNNING for ever); it fails as a RUNNING left unsaved does."""
    from balsam.api import Job

    site = make_site()
    job = Job.objects.create("o/running", _Odd.app(site.site_id), data={"mode": "running"})
    _run_hook(client, job.id, site.data_path)
    assert state_path(events(client, job_id=job.id))[-2:] == ["PREPROCESSED", "FAILED"]
    assert "preprocess set RUNNING" in events(client, job_id=job.id)[-1]["data"]["message"]


def test_a_save_of_the_state_the_job_has_is_no_save(make_site, client) -> None:
    """A preprocess that saves the state its job has (STAGED_IN): the server takes it as no change
    and the job stays the processing session's lease, but it counted as the hook's save: the module
    sent nothing and the job stayed STAGED_IN, leased for the agent's life. It fails as an unchanged
    state does, under the session."""
    from balsam.api import Job
    from balsam.site.hooks_runner import SAVED_KEY

    site = make_site()
    job = Job.objects.create("o/same", _Odd.app(site.site_id), data={"mode": "same"})
    update = _run_hook(client, job.id, site.data_path)
    assert SAVED_KEY not in update and update.get("state") == "FAILED", update
    assert "preprocess left the job STAGED_IN" in update["state_data"]["message"]


def test_an_app_that_cannot_be_loaded_fails_its_jobs(tmp_path) -> None:
    """No app class (its record could not be loaded): the hook's exception handler read the save
    watcher, set only once the job object was built (UnboundLocalError: the worker's whole chunk lost)."""
    from balsam.site.hooks_runner import run_hooks

    jobs = [{"id": i, "state": "STAGED_IN", "workdir": f"w/{i}"} for i in (7, 8)]
    updates = run_hooks(None, jobs, False, str(tmp_path))
    assert [(u["id"], u["state"]) for u in updates] == [(7, "FAILED"), (8, "FAILED")], updates
    assert "the app could not be loaded" in updates[0]["state_data"]["error"]

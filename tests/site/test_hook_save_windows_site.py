"""A hook that saves its job's new state itself (``self.job.state = "PREPROCESSED"; self.job.save()``,
as Balsam 0.7 apps do) and then changes the job again, while a launcher acquires the saved job: on
SQLite and on PostgreSQL, against real servers, a real processing module and real hook workers.

The hook worker saves the later changes with one update by filter, applied only while the job is
still in the state the hook saved. A job a launcher has acquired but not yet reported RUNNING is
still in that state: the later change (a FAILED) applied, ended the launcher's lease, and its
RUNNING was refused (409): the run it was starting was lost, the job failed by a hook that had
already handed it on. Now the update also requires that no session holds the job
(``leased=false``), and what was not saved is said in balsam.log and one agent WARNING.

The launcher is its real HTTP calls (POST /sessions/, the acquire, RUNNING and RUN_DONE under its
session), made by the hook itself between its save and its later change: the interleaving is fixed
by the hook's code, not by timing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from balsam.site.modules.processing import ProcessingModule
from site_test_utils import events, job_rows, process_until, state_path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def live_server(request: pytest.FixtureRequest) -> str:
    """The live server of tests/conftest.py on SQLite, then on PostgreSQL (balsam_env, client and
    make_site use it)."""
    attr, name = (("_balsam_live_server", "_live_server_obj") if request.param == "sqlite"
                  else ("_balsam_live_server_pg", "_live_server_pg_obj"))
    server = request.getfixturevalue(name)
    setattr(request.node, attr, server)
    return server.url


#: The file of the job's workdir where the hook notes the launcher's session (the hook's cwd).
SESSION_FILE = "launcher_session"


def _launcher_acquires(job_id: int, site_id: int) -> None:
    """What a launcher does first with an acquirable job: a session of its own, the acquire. Its
    RUNNING comes later (the test sends it, as the launcher would once the run starts)."""
    from balsam.client.default import get_default_client

    client = get_default_client()
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    acquired = [job["id"] for job in client.post(f"/sessions/{session}", json={"max_num_jobs": 5, "filter_tags": {}})]
    assert job_id in acquired, (job_id, acquired)
    Path(SESSION_FILE).write_text(str(session))


def _app(site_id: int) -> Any:
    from balsam.api import ApplicationDefinition

    class Acquired(ApplicationDefinition):
        site = site_id
        command_template = "echo hi"

        def preprocess(self):
            self.job.state = "PREPROCESSED"
            self.job.save()
            _launcher_acquires(self.job.id, self.job.data["site"])
            raise RuntimeError("input generation failed after the save")

        def handle_timeout(self):
            self.job.state = "RESTART_READY"
            self.job.save()
            _launcher_acquires(self.job.id, self.job.data["site"])
            self.job.state = "FAILED"
            self.job.state_data = {"message": "out of retries"}

    Acquired.sync()
    return Acquired


def _timed_out(client: Any, site_id: int, job_id: int) -> None:
    """``job_id`` RUN_TIMEOUT, as a launcher leaves it (its session gone)."""
    client.patch("/jobs/", json=[{"id": job_id, "state": "PREPROCESSED"}])
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    client.post(f"/sessions/{session}", json={"max_num_jobs": 5, "filter_tags": {}})
    client.patch("/jobs/", json=[{"id": job_id, "state": state, "session_id": session} for state in ("RUNNING", "RUN_TIMEOUT")])
    client.delete(f"/sessions/{session}")


def _launcher_runs(client: Any, site: Any, job: Any, saved: str) -> None:
    """The job is still the launcher's: in the saved state, its RUNNING and RUN_DONE taken."""
    row = job_rows(client, id=[job.id])[0]
    assert row["state"] == saved, state_path(events(client, job_id=job.id))
    session = int((site.data_path / job.workdir / SESSION_FILE).read_text())
    client.patch("/jobs/", json=[{"id": job.id, "state": state, "session_id": session} for state in ("RUNNING", "RUN_DONE")])
    assert state_path(events(client, job_id=job.id))[-3:] == [saved, "RUNNING", "RUN_DONE"]


def test_a_hooks_later_change_leaves_a_job_a_launcher_acquired(make_site, client) -> None:
    """The hook as its worker runs it (``run_hooks``, the worker's entry, in this process): its
    later FAILED is not applied to the job the launcher acquired, the worker's update says why."""
    from balsam.api import Job
    from balsam.site.hooks_runner import NOT_APPLIED_KEY, SAVED_KEY, run_hooks

    site = make_site()
    sid = site.site_id
    app = _app(sid)
    pre, timeout = Job.objects.bulk_create([Job(f"w/{i}", app, data={"site": sid}) for i in range(2)])
    _timed_out(client, sid, timeout.id)
    for job, saved in ((pre, "PREPROCESSED"), (timeout, "RESTART_READY")):
        record = client.get(f"/jobs/{job.id}")
        (update,) = run_hooks(client.get(f"/apps/{record['app_id']}"), [record], False, str(site.data_path))
        _launcher_runs(client, site, job, saved)
        assert update[SAVED_KEY] and f"a launcher acquired it (now {saved}, leased)" in update[NOT_APPLIED_KEY], update
        log = (site.data_path / job.workdir / "balsam.log").read_text()
        assert "were not saved: a launcher acquired it" in log, log


def test_the_processing_module_leaves_the_launchers_job_and_warns(make_site, client, caplog) -> None:
    """The same through the site agent's processing module and its real hook worker processes: the
    job stays the launcher's, one WARNING names what was not saved, nothing is refused."""
    from balsam.api import Job

    site = make_site()
    sid = site.site_id
    app = _app(sid)
    pre, timeout = Job.objects.bulk_create([Job(f"m/{i}", app, data={"site": sid}) for i in range(2)])
    _timed_out(client, sid, timeout.id)
    module = ProcessingModule(site, site.settings.processing, client)
    saved = {pre.id: "PREPROCESSED", timeout.id: "RESTART_READY"}

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    def done() -> bool:  # both hooks' results handled (or a job moved on: the assertions say how)
        named = "".join(warned())
        return (all(f"{i}" in named for i in saved)
                or any(r["state"] != saved[r["id"]] for r in job_rows(client, id=list(saved))))

    with caplog.at_level(logging.INFO):
        try:
            process_until(module, done)
        finally:
            module.close()
    rows = {r["id"]: r["state"] for r in job_rows(client, id=list(saved))}
    assert rows == saved, {i: state_path(events(client, job_id=i)) for i in saved}
    problems = warned()
    assert problems and all("were not saved: a launcher acquired it" in p for p in problems), problems
    for job in (pre, timeout):
        _launcher_runs(client, site, job, saved[job.id])


#: What a server older than the ``leased`` filter answers (recorded from one: the valid filters listed).
OLD_SERVER_422 = [{"loc": ["query", "leased"], "type": "value_error",
                   "msg": "unknown filter parameter (valid: app_id, batch_job_id, id, id__gt, last_update_after, "
                          "last_update_before, ordering, parent_id, pending_file_cleanup, site_id, state, state__ne, "
                          "tags, workdir__contains)"}]


def test_a_server_older_than_the_filter_gets_the_update_by_state_alone(make_site, client, monkeypatch) -> None:
    """Against a server that refuses ``leased`` (422, recorded above; emulated in front of the real
    server for the requests that carry it), the hook's later change is saved by state alone, as
    before, with a line in balsam.log: not lost, and the job is not left in the saved state."""
    from balsam.api import Job
    from balsam.client import RESTClient
    from balsam.client.rest import APIError
    from balsam.site.hooks_runner import NOT_APPLIED_KEY, run_hooks

    real_put = RESTClient.put

    def older_put(self: Any, path: str, json: Any = None, params: Any = None, **kw: Any) -> Any:
        if path == "/jobs/" and params and "leased" in params:
            raise APIError("PUT", f"{self.api_root}{path}", 422, OLD_SERVER_422)
        return real_put(self, path, json=json, params=params, **kw)

    monkeypatch.setattr(RESTClient, "put", older_put)
    site = make_site()
    sid = site.site_id
    job = Job.objects.create("o/0", _app(sid), data={"site": sid})
    record = client.get(f"/jobs/{job.id}")
    (update,) = run_hooks(client.get(f"/apps/{record['app_id']}"), [record], False, str(site.data_path))
    assert NOT_APPLIED_KEY not in update, update
    assert state_path(events(client, job_id=job.id))[-2:] == ["PREPROCESSED", "FAILED"]
    log = (site.data_path / job.workdir / "balsam.log").read_text()
    assert "the server is older than the 'leased' filter" in log, log


def test_a_hook_that_saves_running_then_raises_fails_its_job(make_site, client, caplog) -> None:
    """Only a state a launcher acquires takes ``leased=false``: a preprocess that saves RUNNING
    (STAGED_IN -> RUNNING is a valid move) keeps the processing module's session as the job's holder
    (a RUNNING sent without a session keeps the lease), so with the filter its later FAILED (the
    hook raised after the save) matched nothing, the agent blamed a launcher that did not exist, and
    the job went RUN_TIMEOUT at the module's close, to run again. It fails, as before the filter."""
    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    sid = site.site_id

    class RunSaver(ApplicationDefinition):
        site = sid
        command_template = "echo hi"

        def preprocess(self):
            self.job.state = "RUNNING"
            self.job.save()
            raise RuntimeError("after the RUNNING save")

    RunSaver.sync()
    job = Job.objects.create("r/0", RunSaver)
    module = ProcessingModule(site, site.settings.processing, client)

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    with caplog.at_level(logging.INFO):
        try:
            process_until(module, lambda: job_rows(client, id=[job.id])[0]["state"] == "FAILED"
                          or any(str(job.id) in w for w in warned()))
        finally:
            module.close()
    assert state_path(events(client, job_id=job.id)) == ["STAGED_IN", "RUNNING", "FAILED"], warned()
    assert not [w for w in warned() if "a launcher acquired it" in w]

"""A query delete (``DELETE /jobs/?filters``, ``Job.objects.filter(...).delete()``, ``balsam job
rm``) deletes every matching job but those RUNNING in a launcher, which it skips and names.

It refused the whole delete (409, "nothing was deleted") whenever any matching job was leased, and
the site agent's processing leases new jobs (1,000 at a time) for their preprocess hooks right
after they are created: a 0.7 script deleting its jobs by tag (libEnsemble, DeepHyper) failed when
it came within a fraction of a second of their creation, or during a slow preprocess hook. Balsam
0.7 skipped the jobs a session had locked and deleted the rest, returning the count.

Real servers (SQLite and PostgreSQL), the real Python API and CLI, a real processing module with
real hook workers, and the lease and status updater a launcher uses.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

#: The header naming the skipped jobs (spelled out: the tests also run against older code).
SKIPPED_RUNNING_HEADER = "Balsam-Skipped-Running"
#: Generous: conditions are waited for, never timed.
WAIT_SEC = 90.0


def wait_for(what: Any, message: str) -> None:
    deadline = time.monotonic() + WAIT_SEC
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def _lease(api: Any, site_id: int, **acquire: Any) -> tuple[int, list[int]]:
    """A session of ``site_id`` that acquires what ``acquire`` asks (default: a launcher's jobs);
    returns it and the ids it acquired."""
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site_id})["id"]
    acquired = api.ok("POST", f"/sessions/{session}", json={"max_num_jobs": 100, "filter_tags": {}, **acquire})
    return session, sorted(j["id"] for j in acquired)


def _count(api: Any, **params: Any) -> int:
    return api.ok("GET", "/jobs/", params=params)["count"]


def test_the_header_is_named_alike_by_server_and_client() -> None:
    from balsam.client import rest
    from balsam.server.routes import jobs

    assert rest.SKIPPED_RUNNING_HEADER == jobs.SKIPPED_RUNNING_HEADER == SKIPPED_RUNNING_HEADER


def test_jobs_leased_for_their_hooks_are_deleted(api, site_app) -> None:
    """Jobs leased by the processing (STAGED_IN, hooks in progress): all deleted, no header."""
    site, app = site_app
    jobs = api.jobs(app["id"], 4, tags={"del": "hooks"})
    keep = api.jobs(app["id"], 1, tags={"del": "no"})[0]
    _session, leased = _lease(api, site["id"], states=["STAGED_IN"])
    assert set(leased) >= {j["id"] for j in jobs}  # the processing's lease, as right after their creation
    resp = api.http.delete("/jobs/", params={"tags": "del:hooks"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == 4 and SKIPPED_RUNNING_HEADER not in resp.headers
    assert _count(api, tags="del:hooks") == 0 and api.job(keep["id"])["state"] == "STAGED_IN"
    assert all(api.http.get(f"/jobs/{j['id']}").status_code == 404 for j in jobs)


def test_running_jobs_are_skipped_and_named(api, site_app) -> None:
    """A launcher's jobs: RUNNING ones are left and named in the header; the prefetched ones (leased,
    not started) and the unleased ones are deleted; once the runs end, the same delete takes them."""
    site, app = site_app
    jobs = [j["id"] for j in api.jobs(app["id"], 5, tags={"del": "run"})]
    api.patch_states(jobs[:4], "PREPROCESSED")
    session, leased = _lease(api, site["id"])
    assert leased == sorted(jobs[:4])
    running = jobs[:2]
    api.patch_states(running, "RUNNING")
    resp = api.http.delete("/jobs/", params={"tags": "del:run"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == 3  # two prefetched (leased, PREPROCESSED) and one not leased
    assert resp.headers[SKIPPED_RUNNING_HEADER] == f"count=2; ids={running[0]},{running[1]}"
    assert sorted(j["id"] for j in api.ok("GET", "/jobs/", params={"tags": "del:run"})["results"]) == running
    assert {api.job(i)["state"] for i in running} == {"RUNNING"}
    # A RUNNING job without a live session (its launcher's session gone) is no launcher's run.
    api.patch_states(running[:1], "RUN_DONE")
    resp = api.http.delete("/jobs/", params={"tags": "del:run"})
    assert resp.json() == 1 and resp.headers[SKIPPED_RUNNING_HEADER] == f"count=1; ids={running[1]}"
    api.ok("DELETE", f"/sessions/{session}", 204)
    resp = api.http.delete("/jobs/", params={"tags": "del:run"})
    assert resp.json() == 1 and SKIPPED_RUNNING_HEADER not in resp.headers
    assert _count(api, tags="del:run") == 0


def test_the_header_shows_fifty_ids_and_the_whole_count(api, site_app) -> None:
    site, app = site_app
    jobs = sorted(j["id"] for j in api.jobs(app["id"], 60, tags={"del": "many"}))
    api.patch_states(jobs, "PREPROCESSED")
    _lease(api, site["id"])
    api.patch_states(jobs, "RUNNING")
    resp = api.http.delete("/jobs/", params={"tags": "del:many"})
    assert resp.json() == 0
    assert resp.headers[SKIPPED_RUNNING_HEADER] == "count=60; ids=" + ",".join(map(str, jobs[:50]))


# --------------------------------------------------------------------------- Python API and CLI

@pytest.fixture
def env(db_kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A user of the server of ``db_kind`` for the Python API, the CLI and the site modules."""
    from balsam._api.app import ApplicationDefinition
    from balsam._api.model import reset_default_client
    from balsam.plugins.manager import reset_plugin_manager

    found = request.getfixturevalue("balsam_env" if db_kind == "sqlite" else "balsam_env_pg")
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_default_client()
    reset_plugin_manager()
    ApplicationDefinition.clear_cache()
    yield found
    reset_default_client()
    reset_plugin_manager()


def _site_and_app(tmp_path: Path) -> tuple[Any, Any]:
    from balsam.api import App, Site

    name = f"qdel-{uuid.uuid4().hex[:8]}"
    site = Site.objects.create(name=name, path=str(tmp_path / name))
    app = App.objects.create(site_id=site.id, name="A", serialized_class="x", source_code="x")
    return site, app


def test_api_delete_warns_once_and_the_cli_prints_it(env, tmp_path, caplog) -> None:
    """The launcher side too: the lease's heartbeat hands over the deleted prefetched job (the
    launcher drops it), and the RUNNING update a launcher may still send for it is refused and
    dropped; the job stays gone."""
    from balsam.api import Job
    from balsam.client.default import get_default_client
    from balsam.client.lease import JobLease
    from balsam.client.status_updater import BulkStatusUpdater
    from balsam.cli import main

    site, app = _site_and_app(tmp_path)
    created = Job.objects.bulk_create([Job(workdir=f"w/{i}", app_id=app.id, tags={"k": "v"}) for i in range(4)])
    ids = sorted(j.id for j in created)
    Job.objects.filter(id=ids[:3]).update(state="PREPROCESSED")
    client = get_default_client()
    lease = JobLease(client, site.id, heartbeat_thread=False)
    updater = BulkStatusUpdater(client, max_wait_sec=0.05, name="launcher-updates", session_id=lambda: lease.session_id)
    try:
        held = sorted(j["id"] for j in lease.acquire(3))
        assert held == ids[:3]
        gone: list[list[int]] = []
        lease.watch(lambda: held, gone.append)
        running, prefetched = held[0], held[1:]
        updater.put(running, "RUNNING", None, None)
        assert updater.flush(WAIT_SEC)
        assert Job.objects.get(id=running).state == "RUNNING"

        caplog.set_level(logging.WARNING, logger="balsam._api.query")
        query = Job.objects.filter(tags={"k": "v"})
        assert query.delete() == 3
        warnings = [r.getMessage() for r in caplog.records if r.name == "balsam._api.query"]
        assert warnings == [f"1 matching job was not deleted: RUNNING in a launcher (ids {running}); "
                            "delete them by id or after they end"]
        assert query.skipped_running == (1, [running])
        assert [j.id for j in Job.objects.filter(tags={"k": "v"})] == [running]

        # The launcher's heartbeat names the deleted prefetched jobs; a late RUNNING of one is refused.
        assert lease.tick() == prefetched and gone == [prefetched]
        updater.put(prefetched[0], "RUNNING", None, None)
        assert updater.flush(WAIT_SEC)
        assert Job.objects.filter(id=prefetched).count() == 0

        # The CLI prints the skipped one (once) and deletes the others it selects.
        more = Job.objects.bulk_create([Job(workdir=f"x/{i}", app_id=app.id, tags={"k": "v"}) for i in range(2)])
        caplog.clear()
        result = CliRunner().invoke(main, ["job", "rm", "--site", site.name, "-t", "k=v", "-y"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "Deleted 2 job(s)" in result.output
        message = f"1 matching job was not deleted: RUNNING in a launcher (ids {running})"
        assert result.output.count(message) == 1 and "Job.objects.get(id=N).delete()" in result.output, result.output
        assert not [r for r in caplog.records if r.name == "balsam._api.query"]
        assert Job.objects.filter(id=[j.id for j in more]).count() == 0
    finally:
        updater.close()
        lease.close()
    # The session closed: its RUNNING job is no launcher's any more, and a query delete takes it.
    assert Job.objects.filter(tags={"k": "v"}).delete() == 1


# --------------------------------------------------------------------------- the processing module

def _gated_app(site_id: int) -> Any:
    """A preprocess hook that writes ``started`` and waits for ``../gate`` (the test opens it)."""
    from balsam.api import ApplicationDefinition

    class Gated(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def preprocess(self):
            import os
            import time

            open("started", "w").close()
            deadline = time.monotonic() + 600  # a failed test leaves no hook waiting for ever
            while not os.path.exists("../gate") and time.monotonic() < deadline:
                time.sleep(0.05)
            self.job.data = {"hooked": True}
            self.job.state = "PREPROCESSED"

    Gated.sync()
    return Gated


def test_a_job_deleted_during_its_preprocess_hook_stays_deleted(env, tmp_path, monkeypatch, caplog) -> None:
    """The query delete takes the job its hook runs for; the hook's result is then refused (404)
    and dropped: the module goes on, the job is not re-created, and the next job is processed."""
    import attrs

    from balsam.api import Job
    from balsam.client import load_client
    from balsam.config import SiteConfig
    from balsam.site.modules import processing as processing_module
    from balsam.site.site_ops import init_site

    monkeypatch.setattr(processing_module, "HOOKS_STOP_WAIT_SEC", 0.1)
    monkeypatch.setattr(processing_module, "HOOKS_STOP_LIMIT_SEC", 0.5)
    client = load_client()
    name = f"qdel-{uuid.uuid4().hex[:8]}"
    init_site(tmp_path / name, name, "default", client, settings_overrides={"processing": {"num_workers": 1}})
    site = SiteConfig(tmp_path / name)
    app = _gated_app(site.site_id)
    module = processing_module.ProcessingModule(site, attrs.evolve(site.settings.processing, num_workers=1), client)
    data = Path(site.data_path)
    caplog.set_level(logging.WARNING)
    try:
        (doomed,) = Job.objects.bulk_create([Job("g/0", app, tags={"run": "gated"})])

        def cycle_until(what: Any, message: str) -> None:
            def step() -> bool:
                module.run_cycle()
                module.flush()
                return bool(what())
            wait_for(step, message)

        cycle_until(lambda: doomed.id in module.hooks_running() and (data / "g/0/started").exists(),
                    "the preprocess hook started")
        assert Job.objects.filter(tags={"run": "gated"}).delete() == 1
        (data / "g/gate").touch()
        cycle_until(lambda: not module.pending and not module.hooks_running(), "the hook's result handled")
        assert Job.objects.filter(id=[doomed.id]).count() == 0, "the deleted job is not re-created"

        (after,) = Job.objects.bulk_create([Job("g/1", app, tags={"run": "gated"})])
        cycle_until(lambda: Job.objects.get(id=after.id).state == "PREPROCESSED", "the next job processed")
        assert Job.objects.get(id=after.id).data == {"hooked": True}
    finally:
        module.close()
    # The refused result is logged as any refused update (a job its user moved or deleted), and
    # dropped, not retried.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"HTTP 404: Job not found: {doomed.id}" in errors[0], errors
    assert Job.objects.filter(id=[doomed.id]).count() == 0, "nor by the module's close"


# --------------------------------------------------------------------------- a job starting meanwhile

@pytest.fixture(scope="module")
def pg_server(live_server_factory: Any) -> Any:
    """PostgreSQL behind 2 workers (two requests in flight at once); sessions never expire here."""
    return live_server_factory("postgresql", workers=2, env={"BALSAM_SESSION_EXPIRE_SEC": "3600"})


@pytest.mark.postgres
@pytest.mark.parametrize("first", ["delete", "start"])
def test_a_job_starting_while_the_delete_runs_is_deleted_or_skipped_never_both(pg_server, register, first) -> None:
    """A launcher's RUNNING update of a prefetched job and a query delete that selects it, in the
    order ``first`` forced with the job's row lock held on a side connection (never by timing): the
    delete first deletes it and the update is refused (404: the launcher ends the run it began); the
    start first makes the delete skip it (RUNNING in a launcher), named in the header."""
    import concurrent.futures

    from server_testlib import Api
    from test_pg_races import blocked_by, call, pid, side, wait_until

    api = Api(pg_server.url, register)
    try:
        site = api.site()
        app = api.app(site["id"])
        ids = sorted(j["id"] for j in api.jobs(app["id"], 2, tags={"race": first}))
        api.patch_states(ids, "PREPROCESSED")
        session, leased = _lease(api, site["id"])
        assert leased == ids
        job = ids[0]
        start_body = [{"id": job, "state": "RUNNING", "session_id": session}]
        with concurrent.futures.ThreadPoolExecutor(2) as pool, side(pg_server) as (holder, watch):
            with holder.cursor() as cur:
                cur.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job,))
            requests = {"delete": ("DELETE", "/jobs/", {"params": {"tags": f"race:{first}"}}),
                        "start": ("PATCH", "/jobs/", {"json": start_body})}
            second = "start" if first == "delete" else "delete"
            futures = {}
            method, path, kwargs = requests[first]
            futures[first] = pool.submit(call, api, method, path, **kwargs)
            waiter = wait_until(lambda: blocked_by(watch, {pid(holder)}), f"the {first} to wait for the job's lock")
            method, path, kwargs = requests[second]
            futures[second] = pool.submit(call, api, method, path, **kwargs)
            # The second waits behind the first (its tuple lock), not the holder.
            wait_until(lambda: blocked_by(watch, {pid(holder), waiter}, exclude={waiter}),
                       f"the {second} to wait for the job's lock")
            holder.rollback()
            delete, start = futures["delete"].result(), futures["start"].result()
        assert delete.status_code == 200, delete.text
        if first == "delete":
            assert delete.json() == 2 and "Balsam-Skipped-Running" not in delete.headers
            assert start.status_code == 404 and f"{job}" in start.text, start.text
            assert api.http.get(f"/jobs/{job}").status_code == 404
        else:
            assert start.status_code == 200, start.text
            assert delete.json() == 1 and delete.headers[SKIPPED_RUNNING_HEADER] == f"count=1; ids={job}"
            assert api.job(job)["state"] == "RUNNING"
        assert api.http.get(f"/jobs/{ids[1]}").status_code == 404
    finally:
        api.close()

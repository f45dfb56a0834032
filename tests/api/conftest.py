"""Helpers for the Python API tests: a site per test and a way to drive jobs like a launcher."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import pytest


@pytest.fixture
def chicago(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The client's local time is America/Chicago's (CST/CDT) for the test, this process's again after."""
    monkeypatch.setenv("TZ", "America/Chicago")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture(autouse=True)
def _fresh_api_state() -> Any:
    from balsam._api.app import ApplicationDefinition
    from balsam._api.model import reset_default_client

    reset_default_client()
    ApplicationDefinition.clear_cache()
    yield
    reset_default_client()


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    """A Site of the test user, with a transfer location and one allowed queue."""
    from balsam.api import Site

    name = f"site-{uuid.uuid4().hex[:8]}"
    path = tmp_path / name
    (path / "data").mkdir(parents=True)
    return Site.objects.create(
        name=name,
        path=str(path),
        transfer_locations={"laptop": "globus://9d6d99eb-6d04-11e5-ba46-22000b92c6ec"},
        allowed_projects=["datascience"],
        allowed_queues={"debug": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 5}},
        optional_batch_job_params={"mig_count": "0"},
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    """The live server on SQLite, then on PostgreSQL (a module may define its own ``env``)."""
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


@pytest.fixture
def bare_site(env: Any, tmp_path: Path) -> Any:
    """A Site of the test user on ``env``'s server with a name and a path only."""
    from balsam.api import Site

    name = f"site-{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    return Site.objects.create(name=name, path=str(tmp_path / name))


@pytest.fixture
def sent(balsam_env: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(method, path) of every request the API's client sends from now on."""
    from balsam.api import Job

    client = Job._get_client()
    requests: list[tuple[str, str]] = []
    real = client._send

    def send(method: str, path: str, **kw: Any) -> Any:
        requests.append((method, path))
        return real(method, path, **kw)

    monkeypatch.setattr(client, "_send", send)
    return requests


@pytest.fixture
def run_jobs() -> Any:
    """``run_jobs(site, jobs, fail=(), execute=False)``: see :func:`drive_jobs`."""
    return drive_jobs


def drive_jobs(site: Any, jobs: Iterable[Any], *, fail: Iterable[int] = (), execute: bool = False) -> list[Any]:
    """Move jobs through their life as the agent and a launcher would, through the API.

    STAGED_IN -> PREPROCESSED (processing module), Session acquire -> RUNNING -> RUN_DONE/RUN_ERROR
    (launcher; with ``execute`` the real command line runs and its output is parsed for run()
    results), RUN_DONE -> POSTPROCESSED (processing; the server then finishes the job),
    RUN_ERROR -> FAILED (default handle_error).
    """
    from balsam._api.app import parse_run_markers
    from balsam.api import ApplicationDefinition, Job, Session

    jobs = list(jobs)
    fail = set(fail)
    Job.objects.bulk_refresh(jobs)
    for job in jobs:
        if job.state.value == "STAGED_IN":
            job.state = "PREPROCESSED"
    Job.objects.bulk_update(jobs)

    session = Session.objects.create(site_id=site.id)
    acquired = session.acquire_jobs(max_num_jobs=len(jobs), app_ids={j.app_id for j in jobs})
    assert {j.id for j in acquired} >= {j.id for j in jobs}, "the session did not lease every job"
    for job in acquired:
        job.state = "RUNNING"
        job.state_data = {"num_nodes": job.num_nodes / job.node_packing_count}
    Job.objects.bulk_update(acquired)
    for job in acquired:
        if execute:
            app_cls = ApplicationDefinition.load_by_id(job.app_id)
            cmd = app_cls(job).get_arg_str()
            proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120)
            value, exc = parse_run_markers(proc.stdout)
            if value is not None:
                job.serialized_return_value = value
            if exc is not None:
                job.serialized_exception = exc
            ok = proc.returncode == 0
            job.return_code = proc.returncode
        else:
            ok = job.id not in fail
            job.return_code = 0 if ok else 1
        job.state = "RUN_DONE" if ok else "RUN_ERROR"
        if not ok:
            job.state_data = {"returncode": job.return_code}
    Job.objects.bulk_update(acquired)
    for job in acquired:
        job.state = "POSTPROCESSED" if job.state.value == "RUN_DONE" else "FAILED"
    Job.objects.bulk_update(acquired)
    session.delete()
    Job.objects.bulk_refresh(jobs)
    return jobs

"""Updates and deletes whose answer is lost after the server applied them (SQLite and PostgreSQL).

A proxy in front of the live server forwards a request, then drops the connection instead of
passing the answer on (or answers 502): the client retries with the same Idempotency-Key and gets
the first attempt's answer. Before, ``job.save()`` of POSTPROCESSED raised 409 ("cannot change from
JOB_FINISHED to POSTPROCESSED": the server had finished the job), ``job.delete()`` raised 404 and a
query delete answered 0, each for a change that had been applied.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from failure_proxy import FailureProxy  # tests/failure_proxy.py


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


@pytest.fixture
def proxy(env: Any) -> Iterator[FailureProxy]:
    lossy = FailureProxy(env.url)
    yield lossy
    lossy.close()


@pytest.fixture
def lossy_client(env: Any, proxy: FailureProxy) -> Any:
    """A client of the test user that talks through the proxy, retrying fast."""
    from balsam.client import RESTClient

    return RESTClient(proxy.url, env.token, retry_count=3, backoff_base=0.01, backoff_max=0.05)


@pytest.fixture
def app_id(env: Any, tmp_path: Path) -> int:
    from balsam.api import ApplicationDefinition, Site

    name = f"lossy-{uuid.uuid4().hex[:8]}"
    site = Site.objects.create(name=name, path=str(tmp_path / name))
    cls = type("Lossy", (ApplicationDefinition,), {"site": site.name, "command_template": "echo hi"})
    cls.sync()
    return cls.__app_id__


def _run_done(client: Any, app_id: int, tags: "dict[str, str] | None" = None) -> Any:
    job = client.Job(workdir=f"lost/{uuid.uuid4().hex[:8]}", app_id=app_id, tags=tags or {})
    job.save()
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE"):
        job.state = state
        job.save()
    return job


def _transitions(client: Any, job_id: int) -> list[tuple[str, str]]:
    return [(str(e.from_state), str(e.to_state)) for e in client.EventLog.objects.filter(job_id=job_id)]


def _assert_finished_once(client: Any, job: Any) -> None:
    job.refresh_from_db()
    assert job.state.value == "JOB_FINISHED"
    moves = _transitions(client, job.id)
    for move in (("RUN_DONE", "POSTPROCESSED"), ("POSTPROCESSED", "JOB_FINISHED")):
        assert sum(1 for m in moves if m[0].endswith(move[0]) and m[1].endswith(move[1])) == 1, moves


def test_job_save_whose_answer_is_lost_returns_normally(lossy_client: Any, proxy: FailureProxy, app_id: int) -> None:
    job = _run_done(lossy_client, app_id)
    proxy.lose_next("PUT", r"^/jobs/\d+$")
    job.state = "POSTPROCESSED"
    job.save()  # was: APIError 409, job state cannot change from JOB_FINISHED to POSTPROCESSED
    sent = proxy.requests("PUT", rf"^/jobs/{job.id}$")[-2:]
    assert [(status, mode) for _m, _p, status, mode in sent] == [(200, "drop"), (200, None)]
    _assert_finished_once(lossy_client, job)


def test_bulk_update_whose_answer_is_lost_returns_normally(lossy_client: Any, proxy: FailureProxy, app_id: int) -> None:
    jobs = [_run_done(lossy_client, app_id) for _ in range(3)]
    proxy.lose_next("PATCH", r"^/jobs/$")
    for job in jobs:
        job.state = "POSTPROCESSED"
    lossy_client.Job.objects.bulk_update(jobs)
    assert [mode for *_rest, mode in proxy.requests("PATCH", r"^/jobs/$")[-2:]] == ["drop", None]
    keys = [key for (method, *_rest), key in zip(proxy.log, proxy.keys) if method == "PATCH"][-2:]
    assert keys[0] and keys[0] == keys[1]  # the resend is the same request
    for job in jobs:
        _assert_finished_once(lossy_client, job)


def test_deletes_whose_answer_is_lost_return_normally(lossy_client: Any, proxy: FailureProxy, app_id: int) -> None:
    job = lossy_client.Job(workdir="lost/del", app_id=app_id)
    job.save()
    job_id = job.id
    proxy.lose_next("DELETE", r"^/jobs/\d+$")
    job.delete()  # was: APIError 404, Job N not found
    assert [mode for *_rest, mode in proxy.requests("DELETE", rf"^/jobs/{job_id}$")] == ["drop", None]
    assert lossy_client.Job.objects.filter(id=[job_id]).count() == 0

    tag = uuid.uuid4().hex[:8]
    for i in range(2):
        lossy_client.Job(workdir=f"lost/q{i}", app_id=app_id, tags={"del": tag}).save()
    proxy.lose_next("DELETE", r"^/jobs/\?")
    assert lossy_client.Job.objects.filter(tags={"del": tag}).delete() == 2  # was: 0
    assert lossy_client.Job.objects.filter(tags={"del": tag}).count() == 0


def test_a_502_after_the_update_was_applied_returns_normally(lossy_client: Any, proxy: FailureProxy, app_id: int) -> None:
    job = _run_done(lossy_client, app_id)
    proxy.lose_next("PUT", r"^/jobs/\d+$", mode="502")
    job.state = "POSTPROCESSED"
    job.save()
    _assert_finished_once(lossy_client, job)

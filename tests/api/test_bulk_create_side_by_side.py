"""``bulk_create`` against a server that reserves ids (PostgreSQL): chunks sent side by side, ids
in the order of the list, failures reported and resumed exactly as when chunks go one by one; and
a server that reserves nothing (SQLite) asked once per client."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from balsam.client import APIError


def _app(site: Any) -> Any:
    from balsam.api import ApplicationDefinition

    cls = type("Side", (ApplicationDefinition,), {"site": site.name, "command_template": "echo {{ i }}"})
    cls.sync()
    return cls


@pytest.fixture
def pg_site(balsam_env_pg: Any, tmp_path: Path) -> Any:
    from balsam.api import Site

    name = f"side-{uuid.uuid4().hex[:8]}"
    return Site.objects.create(name=name, path=str(tmp_path / name))


def _jobs(app: Any, prefix: str, n: int, tag: str) -> list[Any]:
    from balsam.api import Job

    return [Job(workdir=f"{prefix}/{i}", app_id=app.__app_id__, parameters={"i": i}, tags={"t": tag}) for i in range(n)]


def fail_a_chunk_beside_another(monkeypatch: Any, failing: str, beside: str,
                                fail: Callable[[Callable[[], Any]], Any]) -> list[str]:
    """Make the ``bulk_create`` chunk whose first workdir is ``failing`` wait until the chunk
    starting at ``beside`` is answered (both in flight side by side), then give ``fail(send)``
    (``send()`` sends it for real). Returns the first workdir of each chunk, as sent."""
    from balsam.client import RESTClient

    real = RESTClient.request_with_headers
    sent: list[str] = []
    beside_answered = threading.Event()

    def intercept(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        if (method, path) != ("POST", "/jobs/"):
            return real(self, method, path, **kwargs)
        first = kwargs["json"][0]["workdir"]
        sent.append(first)
        if first == failing:
            beside_answered.wait(30)
            return fail(lambda: real(self, method, path, **kwargs))
        try:
            return real(self, method, path, **kwargs)
        finally:
            if first == beside:
                beside_answered.set()

    monkeypatch.setattr(RESTClient, "request_with_headers", intercept)
    return sent


@pytest.mark.postgres
def test_chunks_in_flight_side_by_side_keep_the_ids_in_list_order(pg_site: Any, monkeypatch: Any,
                                                                   requests_in_flight: dict) -> None:
    from balsam._api import models
    from balsam.api import Job

    app = _app(pg_site)
    monkeypatch.setattr(models.JobManager, "bulk_chunk_size", 5)
    monkeypatch.setattr(models, "MAX_CHUNKS_PER_RESERVATION", 2)  # 5 chunks: three reservations
    state = requests_in_flight  # the requests before this point went one at a time
    client = Job._get_client()
    progress: list[tuple[int, int]] = []
    created = Job.objects.bulk_create(_jobs(app, "s", 23, "side"), progress=lambda d, t: progress.append((d, t)))
    assert [str(job.workdir) for job in created] == [f"s/{i}" for i in range(23)]
    ids = [job.id for job in created]
    assert ids == sorted(ids) and len(set(ids)) == 23
    assert [job.get_parameters()["i"] for job in created] == list(range(23))
    assert client.request_counts["POST /jobs/reservations"] == 3 and client.request_counts["POST /jobs/"] == 5
    assert progress == [(5, 23), (10, 23), (15, 23), (20, 23), (23, 23)]
    assert state["most"] == 2  # two chunks were in flight at once
    listed = Job.objects.filter(tags={"t": "side"}).order_by("id")
    assert [str(job.workdir) for job in listed] == [f"s/{i}" for i in range(23)]


@pytest.mark.postgres
def test_a_refused_chunk_beside_a_stored_one_is_reported_and_resumed_once(pg_site: Any, monkeypatch: Any) -> None:
    from balsam._api import models
    from balsam.api import BulkCreateError, Job
    from balsam.client import RESTClient

    app = _app(pg_site)
    monkeypatch.setattr(models.JobManager, "bulk_chunk_size", 10)
    real = RESTClient.request_with_headers

    def refuse(send: Callable[[], Any]) -> Any:
        raise APIError("POST", "/jobs/", 400, "refused for the test")

    # the chunk after the second one is stored while the second one is refused
    sent = fail_a_chunk_beside_another(monkeypatch, "r/10", "r/20", refuse)
    with pytest.raises(BulkCreateError) as caught:
        Job.objects.bulk_create(_jobs(app, "r", 45, "refused"))
    error = caught.value
    # The third chunk, answered beside the refused one, is stored: created, not to be sent again.
    assert [str(job.workdir) for job in error.created] == [f"r/{i}" for i in (*range(10), *range(20, 30))]
    assert [str(job.workdir) for job in error.not_created] == [f"r/{i}" for i in (*range(10, 20), *range(30, 45))]
    assert "stored 20 of 45 jobs" in str(error) and "chunk of 10 from item 10 of the list was refused" in str(error)
    assert "never stored twice" in str(error)
    assert sorted(sent) == ["r/0", "r/10", "r/20"]  # nothing sent past the chunk beside the refused one
    assert Job.objects.filter(tags={"t": "refused"}).count() == 20  # chunks 1 and 3
    monkeypatch.setattr(RESTClient, "request_with_headers", real)
    created = error.resume()
    assert [str(job.workdir) for job in created] == [f"r/{i}" for i in range(45)]
    ids = [job.id for job in created]
    assert ids == sorted(ids) and len(set(ids)) == 45  # the refused chunk got its reserved ids
    assert Job.objects.filter(tags={"t": "refused"}).count() == 45  # the stored third chunk: once


def test_a_server_that_reserves_nothing_is_asked_once_per_client(site: Any, monkeypatch: Any) -> None:
    """SQLite stores one transaction at a time: the chunks go one by one, and the client stops asking."""
    from balsam._api import models
    from balsam.api import Job

    app = _app(site)
    monkeypatch.setattr(models.JobManager, "bulk_chunk_size", 4)
    client = Job._get_client()
    first = Job.objects.bulk_create(_jobs(app, "a", 10, "lite"))
    second = Job.objects.bulk_create(_jobs(app, "b", 10, "lite"))
    ids = [job.id for job in first + second]
    assert ids == sorted(ids) and Job.objects.filter(tags={"t": "lite"}).count() == 20
    assert client.request_counts["POST /jobs/reservations"] == 1 and client.request_counts["POST /jobs/"] == 6


@pytest.mark.parametrize("answer", ["404", {"parallel": "2", "reservations": []}, ["garbage"],
                                    {"parallel": 2, "reservations": [{"idempotency_key": 7}, {}, {}]}])
def test_a_server_without_usable_reservations_gets_the_chunks_one_by_one(site: Any, monkeypatch: Any,
                                                                         answer: Any) -> None:
    """An older server (404), or an answer the client cannot use: one chunk at a time, asked once."""
    from balsam._api import models
    from balsam.api import Job
    from balsam.client import RESTClient

    app = _app(site)
    monkeypatch.setattr(models.JobManager, "bulk_chunk_size", 4)
    asked: list[str] = []

    def older_server(self: Any, path: str, json: Any = None, **kwargs: Any) -> Any:
        asked.append(path)
        if answer == "404":
            raise APIError("POST", path, 404, "Not Found")
        return answer

    monkeypatch.setattr(RESTClient, "post", older_server)
    created = Job.objects.bulk_create(_jobs(app, "o", 9, "old")) + Job.objects.bulk_create(_jobs(app, "p", 9, "old"))
    ids = [job.id for job in created]
    assert ids == sorted(ids) and len(set(ids)) == 18 and asked == ["/jobs/reservations"]

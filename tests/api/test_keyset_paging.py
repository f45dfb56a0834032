"""Keyset paging of the Python API. A listing in id order (Job, BatchJob and TransferItem by default,
or ``order_by("id")``) reads its pages after the first with ``id__gt=<the last id read>``. Before, all
pages went by offset: records that left the filter between two pages (jobs leaving
``state="STAGED_IN"`` while a user iterated over them) moved every later record back, and as many
unchanged records were skipped at the next page's start, never listed.

The page size is made small (5) so that a few records need several pages; the departures happen
between two pages: a hook on the client's ``GET /jobs/`` runs an action before the N-th of them
(through its own HTTP client, so that the action is no page). Against real servers on SQLite and
PostgreSQL; a server older than ``id__gt`` is this server with the filter taken out of its list
(refused, 422), and one that ignores it (Balsam 0.7's ignored unknown parameters) is a client that
drops it from the request."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from balsam._api.query import Query

PAGE = 5


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    """A fresh user on the live server of each database, acting through the Python API."""
    return request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")


def _make_jobs(tmp_path: Path, n: int) -> list[int]:
    """``n`` STAGED_IN jobs of a new site and app; their ids, ascending."""
    from balsam.api import ApplicationDefinition, Job, Site

    name = f"site-{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    site = Site.objects.create(name=name, path=str(tmp_path / name))
    app = type("Paged", (ApplicationDefinition,), {"site": site.name, "command_template": "echo {{ n }}"})
    app.sync()
    jobs = Job.objects.bulk_create([app.submit(workdir=f"k/{i:03d}", n=i, save=False) for i in range(n)])
    assert {job.state.value for job in jobs} == {"STAGED_IN"}
    return sorted(job.id for job in jobs)


@pytest.fixture
def pages(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[dict[str, Any]]]:
    """``pages(path, {n: action}, drop=())``: small pages; ``action`` runs before the ``n``-th ``GET``
    of ``path`` (from 0); parameters named in ``drop`` are taken out of the requests (a server that
    ignores them). Returns the parameters of each such ``GET`` as sent, in order."""
    from balsam.api import Job

    monkeypatch.setattr(Query, "page_size", PAGE)
    sent: list[dict[str, Any]] = []

    def install(path: str, actions: "dict[int, Callable[[], None]] | None" = None,
                drop: "tuple[str, ...]" = ()) -> list[dict[str, Any]]:
        client = Job._get_client()  # the test's client: made (or set) before the first call
        real = type(client).request_with_headers.__get__(client)  # not an earlier hook
        todo = dict(actions or {})

        def hooked(method: str, url: str, **kw: Any) -> Any:
            if method == "GET" and url == path:
                params = dict(kw.get("params") or {})
                sent.append(params)
                action = todo.pop(len(sent) - 1, None)
                if action is not None:
                    action()
                kw["params"] = {k: v for k, v in params.items() if k not in drop}
            return real(method, url, **kw)

        monkeypatch.setattr(client, "request_with_headers", hooked)
        return sent

    return install


def _set_state(env: Any, ids: list[int], state: str) -> None:
    with env.http() as http:
        said = http.patch("/jobs/", json=[{"id": i, "state": state} for i in ids])
        assert said.status_code == 200, said.text


def test_jobs_leaving_the_filter_between_pages_are_not_skipped(env: Any, tmp_path: Path, pages: Any) -> None:
    from balsam.api import Job

    ids = _make_jobs(tmp_path, 23)
    # Before the second page: 3 jobs of the first page (already read) leave the filter.
    sent = pages("/jobs/", {1: lambda: _set_state(env, ids[:3], "FAILED")})
    listed = [job.id for job in Job.objects.filter(state="STAGED_IN")]
    assert listed == ids, f"missing {sorted(set(ids) - set(listed))}, pages {sent}"
    # One request per page, the first by offset, the others after the last id read.
    assert [p.get("offset") for p in sent] == [0, None, None, None, None]
    assert [p.get("id__gt") for p in sent] == [None, ids[4], ids[9], ids[14], ids[19]]
    # Jobs leaving from pages not yet read are not listed; the others still are, once each.
    sent.clear()
    pages("/jobs/", {2: lambda: _set_state(env, ids[3:5] + ids[12:14], "FAILED")})
    query = Job.objects.filter(state="STAGED_IN")
    assert [job.id for job in query] == ids[3:13] + ids[14:]


def test_slices_and_explicit_orderings(env: Any, tmp_path: Path, pages: Any) -> None:
    from balsam.api import Job

    ids = _make_jobs(tmp_path, 17)
    sent = pages("/jobs/")
    # order_by("id") pages by id as the default order does; a slice's first page starts at its offset.
    assert [job.id for job in Job.objects.order_by("id")] == ids
    assert [p.get("id__gt") for p in sent] == [None, ids[4], ids[9], ids[14]]
    sent.clear()
    assert [job.id for job in Job.objects.all()[3:15]] == ids[3:15]
    assert [(p.get("offset"), p.get("id__gt"), p["limit"]) for p in sent] == [(3, None, 5), (None, ids[7], 5),
                                                                              (None, ids[12], 2)]
    # Other orderings page by offset, and keep their order.
    for order, expected in (("-id", ids[::-1]), ("-workdir", ids[::-1]), ("workdir", ids)):
        sent.clear()
        assert [job.id for job in Job.objects.order_by(order)] == expected, order
        assert [p.get("offset") for p in sent] == [0, 5, 10, 15] and all("id__gt" not in p for p in sent), sent


def test_batch_jobs_page_by_id(env: Any, tmp_path: Path, pages: Any) -> None:
    from balsam.api import BatchJob, Site

    site = Site.objects.create(name=f"bj-{uuid.uuid4().hex[:8]}", path=str(tmp_path / "bj"))
    made = sorted(BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="mpi", queue="debug",
                                          project="p").id for _ in range(12))

    def leave() -> None:
        with env.http() as http:
            for bj_id in made[:2]:  # already read: the first page
                assert http.put(f"/batch-jobs/{bj_id}", json={"state": "queued"}).status_code == 200

    sent = pages("/batch-jobs/", {1: leave})
    assert [bj.id for bj in BatchJob.objects.filter(state="pending_submission")] == made
    assert [p.get("id__gt") for p in sent] == [None, made[4], made[9]]


def test_id__gt_on_the_lists_and_bad_values(env: Any, tmp_path: Path) -> None:
    ids = _make_jobs(tmp_path, 6)
    with env.http() as http:
        page = http.get("/jobs/", params={"id__gt": ids[1], "limit": 2}).json()
        assert page["count"] == 4 and [job["id"] for job in page["results"]] == ids[2:4]
        events = http.get("/events/", params={"ordering": "timestamp"}).json()["results"]
        first = min(event["id"] for event in events)
        later = http.get("/events/", params={"id__gt": first}).json()
        assert later["count"] == len(events) - 1 and first not in [event["id"] for event in later["results"]]
        assert http.get("/transfers/", params={"id__gt": 0}).json() == {"count": 0, "results": []}
        assert http.get("/batch-jobs/", params={"id__gt": 0}).json()["count"] == 0
        for path, bad in (("/jobs/", "x"), ("/jobs/", str(2 ** 63)), ("/events/", "1.5"), ("/transfers/", "-"),
                          ("/batch-jobs/", str(2 ** 31))):
            said = http.get(path, params={"id__gt": bad})
            assert said.status_code == 422 and said.json()["detail"][0]["loc"] == ["query", "id__gt"], (path, said.text)
        said = http.get("/jobs/", params=[("id__gt", "1"), ("id__gt", "2")])
        assert said.status_code == 422 and "id__gt" in said.text


def test_a_server_that_ignores_id__gt_is_read_by_offset(env: Any, tmp_path: Path, pages: Any) -> None:
    """Balsam 0.7's server ignored unknown parameters: the client sees the listing's first page
    again, drops it and reads the rest by offset (as before), without repeating a record."""
    from balsam.api import Job

    ids = _make_jobs(tmp_path, 12)
    sent = pages("/jobs/", drop=("id__gt",))
    assert [job.id for job in Job.objects.all()] == ids
    assert [(p.get("offset"), p.get("id__gt")) for p in sent] == [(0, None), (None, ids[4]), (5, None), (10, None)]


def test_a_server_older_than_id__gt_is_read_by_offset(database_url: str, monkeypatch: pytest.MonkeyPatch,
                                                      register: Any, serve_in_process: Any, tmp_path: Path,
                                                      pages: Any) -> None:
    """A server of ours from before ``id__gt`` refuses it as an unknown filter (422): this server,
    run in this process with the filter taken out of its list of job filters."""
    from balsam._api.model import set_default_client
    from balsam.api import Job
    from balsam.client.rest import RESTClient
    from balsam.server import jobs_logic
    from balsam.server.app import create_app
    from balsam.server.settings import ServerSettings

    monkeypatch.setattr(jobs_logic, "JOB_FILTERS", jobs_logic.JOB_FILTERS - {"id__gt"})
    url = serve_in_process(create_app(
        settings=ServerSettings(database_url=database_url, registration="open",
                                secret_key="keyset-older-server-secret-0123456789-abcdefghij"),
        create_tables_now=True))
    _username, _password, _user_id, token, _ = register(url)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        refused = http.get("/jobs/", params={"id__gt": 1})
        assert refused.status_code == 422 and "unknown filter parameter" in refused.text, refused.text
    set_default_client(RESTClient(url, token=token))
    ids = _make_jobs(tmp_path, 12)
    sent = pages("/jobs/")
    assert [job.id for job in Job.objects.all()] == ids
    assert [(p.get("offset"), p.get("id__gt")) for p in sent] == [(0, None), (None, ids[4]), (5, None), (10, None)]

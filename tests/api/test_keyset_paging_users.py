"""Keyset paging (``id__gt``) where the client pages on its own, outside ``Query``: ``balsam job ls``,
``balsam.site.service_client.list_all`` (the agent's lists) and the transfers module's pages of pending
items. All go through ``balsam._api.query.read_pages``. Before, each paged by offset: records that
left the filter between two pages moved every later one back, and as many unchanged records were
skipped at the next page's start (``job ls`` read a page again when the count fell, so a departure
and an arrival between the same two pages still hid a job; the transfers module's cursor across
cycles was an offset, so the items after it were skipped when the last cycle's submissions left
"pending"). Also: a client remembers that its server lacks ``id__gt`` (``lacks_id_after``), so only
its first listing spends a request finding out.

Against real servers on SQLite and PostgreSQL, pages made small; the departures happen between two
pages: a hook on ``RESTClient._send`` runs an action before the N-th ``GET`` of a path (the action
uses its own HTTP client)."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import httpx
import pytest
from click.testing import CliRunner

from balsam._api.query import Query
from balsam.client.rest import RESTClient

PAGE = 5


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest) -> Any:
    """A fresh user on the live server of each database; the Python API and the CLI act as that user."""
    from balsam._api.model import reset_default_client

    reset_default_client()  # the client of this user (BALSAM_CLIENT_PATH), not one of an earlier test
    yield request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")
    reset_default_client()


@pytest.fixture
def gets(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[dict[str, Any]]]:
    """``gets(path, {n: action}, drop=())``: ``action`` runs before the ``n``-th ``GET`` of ``path``
    (from 0) by any RESTClient; parameters named in ``drop`` are taken out of the requests (a server
    that ignores them). Returns the parameters of each such ``GET`` as sent, in order."""
    sent: list[dict[str, Any]] = []
    real = RESTClient._send

    def install(path: str, actions: "dict[int, Callable[[], None]] | None" = None,
                drop: "tuple[str, ...]" = ()) -> list[dict[str, Any]]:
        todo = dict(actions or {})

        def hooked(self: Any, method: str, url: str, **kw: Any) -> Any:
            if method.upper() == "GET" and url == path:
                params = dict(kw.get("params") or {})
                sent.append(params)
                action = todo.pop(len(sent) - 1, None)
                if action is not None:
                    action()
                kw["params"] = {k: v for k, v in params.items() if k not in drop}
            return real(self, method, url, **kw)

        monkeypatch.setattr(RESTClient, "_send", hooked)
        return sent

    return install


def _site(tmp_path: Path, **fields: Any) -> Any:
    from balsam.api import Site

    name = f"site-{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    return Site.objects.create(name=name, path=str(tmp_path / name), **fields)


def _make_jobs(tmp_path: Path, n: int) -> list[int]:
    """``n`` STAGED_IN jobs of a new site and app; their ids, ascending."""
    from balsam.api import ApplicationDefinition, Job

    app = type("Paged", (ApplicationDefinition,), {"site": _site(tmp_path).name, "command_template": "echo {{ n }}"})
    app.sync()
    jobs = Job.objects.bulk_create([app.submit(workdir=f"k/{i:03d}", n=i, save=False) for i in range(n)])
    assert {job.state.value for job in jobs} == {"STAGED_IN"}
    return sorted(job.id for job in jobs)


def _set_state(env: Any, ids: list[int], state: str) -> None:
    with env.http() as http:
        said = http.patch("/jobs/", json=[{"id": i, "state": state} for i in ids])
        assert said.status_code == 200, said.text


def _listed_ids(output: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s", output, re.M)]


# ------------------------------------------------------------------------------------------ job ls
def test_job_ls_misses_no_job_when_one_leaves_and_one_arrives_between_pages(
        env: Any, tmp_path: Path, gets: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: job ls read a page again from earlier when the count fell; a job leaving the filter
    (already listed) and a job arriving between the same two pages kept the count, and the 6th job
    was never listed."""
    import balsam.cli.job as job_cli
    from balsam.api import Job
    from balsam.cli import main

    monkeypatch.setattr(job_cli, "LIST_PAGE_SIZE", PAGE)
    ids = _make_jobs(tmp_path, 23)
    app_id = Job.objects.get(id=ids[0]).app_id
    arrived: list[int] = []

    def leave_and_arrive() -> None:
        _set_state(env, [ids[1]], "FAILED")
        (new,) = Job.objects.bulk_create([Job(workdir="k/new", app_id=app_id, parameters={"n": 99})])
        assert new.state.value == "STAGED_IN"
        arrived.append(new.id)

    sent = gets("/jobs/", {1: leave_and_arrive})
    out = CliRunner().invoke(main, ["job", "ls", "--site", "all", "-s", "STAGED_IN"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    listed = _listed_ids(out.output)
    assert listed == ids + arrived, (sorted(set(ids) - set(listed)), sent)
    # One request per page: the first by offset, the others after the last id read.
    assert [p.get("id__gt") for p in sent] == [None, ids[4], ids[9], ids[14], ids[19]]


# ---------------------------------------------------------------------------------------- list_all
def test_list_all_misses_no_job_that_stays(env: Any, tmp_path: Path, gets: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import balsam.site.service_client as service_client
    from balsam.client import load_client

    monkeypatch.setattr(service_client, "MAX_PAGE_SIZE", PAGE)
    ids = _make_jobs(tmp_path, 17)
    client = load_client()
    # Before the second page, 3 jobs of the first (already read) leave the filter.
    sent = gets("/jobs/", {1: lambda: _set_state(env, ids[:3], "FAILED")})
    rows = service_client.list_all(client, "/jobs/", {"state": "STAGED_IN"})
    assert [row["id"] for row in rows] == ids, (sorted(set(ids) - {row["id"] for row in rows}), sent)
    assert [(p.get("offset"), p.get("id__gt"), p["limit"]) for p in sent] == [
        (0, None, 5), (None, ids[4], 5), (None, ids[9], 5), (None, ids[14], 5)]
    # A limit ends the read at that many rows (the last page asks for what is left); other
    # orderings page by offset.
    sent.clear()
    assert [row["id"] for row in service_client.list_all(client, "/jobs/", {"state": "STAGED_IN"}, limit=7)] == ids[3:10]
    assert [(p.get("offset"), p.get("id__gt"), p["limit"]) for p in sent] == [(0, None, 5), (None, ids[7], 2)]
    sent.clear()
    newest = service_client.list_all(client, "/jobs/", {"state": "STAGED_IN", "ordering": "-id"})
    assert [row["id"] for row in newest] == ids[:2:-1]
    assert all("id__gt" not in p for p in sent), sent


# ---------------------------------------------------------------------------------------- transfers
def test_transfers_pending_pages_go_on_by_id_across_cycles(env: Any, tmp_path: Path) -> None:
    """The module reads a first page, then up to PENDING_PAGES_PER_CYCLE pages of pending items
    when the first is full of items that wait (here: in their retry backoff), and the next cycle
    goes on from where they stopped. Before, where they stopped was an offset: items that left
    "pending" in between (submitted, or their jobs deleted) moved the later ones back, and the
    items just past the last read were skipped that cycle."""
    from balsam.api import ApplicationDefinition, Job
    from balsam.client import load_client
    from balsam.site.service_client import bulk_patch
    from balsam.site.modules.transfers import PENDING_PAGES_PER_CYCLE, TransfersModule, TransfersOptions

    site = _site(tmp_path, transfer_locations={"shared": "local://"})
    app = type("Staged", (ApplicationDefinition,), {
        "site": site.name, "command_template": "true",
        "transfers": {"input": {"required": True, "direction": "in", "local_path": "input.txt"}}})
    app.sync()
    limit = 3
    total = limit * (1 + PENDING_PAGES_PER_CYCLE) + 4
    Job.objects.bulk_create([Job(f"t/{i:03d}", app, transfers={"input": f"shared:{tmp_path}/a.txt"})
                             for i in range(total)])
    client = load_client()
    items = sorted(client.get("/transfers/", params={"site_id": site.id})["results"], key=lambda i: i["id"])
    assert len(items) == total and {i["state"] for i in items} == {"pending"}
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).isoformat()
    assert not bulk_patch(client, "/transfers/", [
        {"id": i["id"], "transfer_info": {"attempts": 1, "error": "earlier failure", "retry_after": later}}
        for i in items])
    config = SimpleNamespace(site_id=site.id, site_path=str(tmp_path / site.name), data_path=str(tmp_path))
    module = TransfersModule(config, TransfersOptions(transfer_locations={"shared": "local://"},
                                                      num_items_query_limit=limit), client)
    now = dt.datetime.now(dt.timezone.utc)
    ids = [i["id"] for i in items]
    read = sorted(i["id"] for i in module._read_items(now))
    assert read == ids[:limit * (1 + PENDING_PAGES_PER_CYCLE)]  # none usable: every page read
    # Between the cycles, two items already read leave "pending" (their jobs deleted).
    with env.http() as http:
        for item in items[limit:limit + 2]:
            assert http.delete(f"/jobs/{item['job_id']}").status_code == 204
    read = sorted(i["id"] for i in module._read_items(now))
    # The first page again, then on from the last item read: the next 4 items are all read.
    assert read == ids[:limit] + ids[limit * (1 + PENDING_PAGES_PER_CYCLE):], read
    module.close()


# ------------------------------------------------------------------------- servers without id__gt
def test_a_client_remembers_a_server_that_ignores_id__gt(env: Any, tmp_path: Path, gets: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Balsam 0.7's server ignores unknown parameters: the first listing of several pages spends
    one request finding out (its second page comes back from the start); later ones of the same
    client page by offset at once. Another client asks again."""
    import balsam.site.service_client as service_client
    from balsam.api import Job
    from balsam.client import load_client

    monkeypatch.setattr(Query, "page_size", PAGE)
    monkeypatch.setattr(service_client, "MAX_PAGE_SIZE", PAGE)
    ids = _make_jobs(tmp_path, 12)
    sent = gets("/jobs/", drop=("id__gt",))
    client = Job._get_client()
    assert client.lacks_id_after is False
    assert [job.id for job in Job.objects.all()] == ids
    assert [(p.get("offset"), p.get("id__gt")) for p in sent] == [(0, None), (None, ids[4]), (5, None), (10, None)]
    assert client.lacks_id_after is True
    sent.clear()
    assert [job.id for job in Job.objects.all()] == ids
    assert [row["id"] for row in service_client.list_all(client, "/jobs/")] == ids
    assert [(p.get("offset"), p.get("id__gt")) for p in sent] == [(0, None), (5, None), (10, None)] * 2
    sent.clear()
    other = load_client()
    assert other.lacks_id_after is False
    assert [row["id"] for row in service_client.list_all(other, "/jobs/")] == ids
    assert [(p.get("offset"), p.get("id__gt")) for p in sent] == [(0, None), (None, ids[4]), (5, None), (10, None)]


def test_a_client_remembers_a_server_older_than_id__gt(database_url: str, monkeypatch: pytest.MonkeyPatch,
                                                       register: Any, serve_in_process: Any, tmp_path: Path,
                                                       gets: Any) -> None:
    """A server of ours from before ``id__gt`` refuses it (422): this server, run in this process
    with the filter taken out of its list of job filters. The refusal costs the first listing one
    request; the client's later listings (Python API, list_all, job ls) page by offset at once."""
    import balsam.cli.job as job_cli
    import balsam.site.service_client as service_client
    from balsam._api.model import reset_default_client, set_default_client
    from balsam.api import Job
    from balsam.server import jobs_logic
    from balsam.server.app import create_app
    from balsam.server.settings import ServerSettings

    monkeypatch.setattr(jobs_logic, "JOB_FILTERS", jobs_logic.JOB_FILTERS - {"id__gt"})
    monkeypatch.setattr(Query, "page_size", PAGE)
    monkeypatch.setattr(service_client, "MAX_PAGE_SIZE", PAGE)
    monkeypatch.setattr(job_cli, "LIST_PAGE_SIZE", PAGE)
    url = serve_in_process(create_app(
        settings=ServerSettings(database_url=database_url, registration="open",
                                secret_key="keyset-users-older-server-secret-0123456789-abcdef"),
        create_tables_now=True))
    _username, _password, _user_id, token, _ = register(url)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        refused = http.get("/jobs/", params={"id__gt": 1})
        assert refused.status_code == 422 and "id__gt" in refused.text, refused.text
    client = RESTClient(url, token=token)
    set_default_client(client)
    try:
        ids = _make_jobs(tmp_path, 12)
        sent = gets("/jobs/")
        assert [row["id"] for row in service_client.list_all(client, "/jobs/")] == ids
        assert [(p.get("offset"), p.get("id__gt")) for p in sent] == [(0, None), (None, ids[4]), (5, None), (10, None)]
        assert client.lacks_id_after is True
        sent.clear()
        assert [job.id for job in Job.objects.all()] == ids
        assert [[job.id for job in page] for page, _more in job_cli._job_pages({})] == [ids[:5], ids[5:10], ids[10:]]
        assert [(p.get("offset"), p.get("id__gt")) for p in sent] == [(0, None), (5, None), (10, None)] * 2
    finally:
        reset_default_client()

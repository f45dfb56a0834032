"""A replayed update or delete answers what the first answer said, headers included.

A query delete (``DELETE /jobs/?filters``) that leaves out jobs RUNNING in a launcher names them in
its ``Balsam-Skipped-Running`` header. The idempotency record kept the answer's status and body
only, so the client that resent the delete with the same key (its first answer lost) got the count
without the header: the Python API's WARNING and ``balsam job rm``'s line about the skipped jobs
were lost. Real servers (SQLite and PostgreSQL) and the real Python API client.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

#: Spelled out: the tests also run against older code.
SKIPPED_RUNNING_HEADER = "Balsam-Skipped-Running"
KEY = "Idempotency-Key"


def _running_jobs(api: Any, site_id: int, app_id: int, tag: str, n_running: int, n_other: int) -> list[int]:
    """``n_running`` jobs RUNNING in a launcher's session and ``n_other`` not leased, all tagged
    ``del:<tag>``; returns the RUNNING ones' ids."""
    running = sorted(j["id"] for j in api.jobs(app_id, n_running, tags={"del": tag}))
    api.jobs(app_id, n_other, tags={"del": tag})
    api.patch_states(running, "PREPROCESSED")
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site_id})["id"]
    acquired = api.ok("POST", f"/sessions/{session}", json={"max_num_jobs": 100, "filter_tags": {}})
    assert sorted(j["id"] for j in acquired) == running
    api.patch_states(running, "RUNNING")
    return running


def test_a_replayed_query_delete_names_the_skipped_jobs_again(api: Any, site_app: tuple[dict, dict]) -> None:
    site, app = site_app
    tag = uuid.uuid4().hex[:8]
    running = _running_jobs(api, site["id"], app["id"], tag, 2, 3)
    headers = {KEY: uuid.uuid4().hex}
    first = api.http.delete("/jobs/", params={"tags": f"del:{tag}"}, headers=headers)
    again = api.http.delete("/jobs/", params={"tags": f"del:{tag}"}, headers=headers)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.json() == again.json() == 3
    expected = f"count=2; ids={running[0]},{running[1]}"
    assert first.headers[SKIPPED_RUNNING_HEADER] == expected
    assert again.headers.get(SKIPPED_RUNNING_HEADER) == expected  # was missing: the replay kept status and body only
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["content-length"] == first.headers["content-length"]
    # Nothing applied twice: the RUNNING jobs are there, the others gone.
    left = api.ok("GET", "/jobs/", params={"tags": f"del:{tag}"})["results"]
    assert sorted(j["id"] for j in left) == running


def test_a_replayed_answer_without_extra_headers_gets_none(api: Any, site_app: tuple[dict, dict]) -> None:
    """The replay of a delete that skipped nothing has no such header (nor any other route header)."""
    _site, app = site_app
    tag = uuid.uuid4().hex[:8]
    api.jobs(app["id"], 2, tags={"del": tag})
    headers = {KEY: uuid.uuid4().hex}
    first = api.http.delete("/jobs/", params={"tags": f"del:{tag}"}, headers=headers)
    again = api.http.delete("/jobs/", params={"tags": f"del:{tag}"}, headers=headers)
    assert first.json() == again.json() == 2
    assert SKIPPED_RUNNING_HEADER not in first.headers and SKIPPED_RUNNING_HEADER not in again.headers
    assert sorted(k for k in again.headers if k not in ("date", "server")) == \
        sorted(k for k in first.headers if k not in ("date", "server"))


# --------------------------------------------------------------------------- the Python API


@pytest.fixture
def env(db_kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A user of the server of ``db_kind`` for the Python API."""
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


def test_the_api_warns_when_the_first_answer_of_its_delete_was_lost(env: Any, tmp_path: Path, caplog: Any) -> None:
    """The server applies the delete, its answer is lost on the way back, the client resends it
    with the same key: the resend's answer still names the RUNNING job, so the API warns."""
    from balsam.api import App, Job, Site
    from balsam.client.default import get_default_client
    from balsam.client.lease import JobLease

    name = f"replay-{uuid.uuid4().hex[:8]}"
    site = Site.objects.create(name=name, path=str(tmp_path / name))
    app = App.objects.create(site_id=site.id, name="A", serialized_class="x", source_code="x")
    created = Job.objects.bulk_create([Job(workdir=f"w/{i}", app_id=app.id, tags={"k": "lost"}) for i in range(3)])
    ids = sorted(j.id for j in created)
    Job.objects.filter(id=ids[:1]).update(state="PREPROCESSED")
    client = get_default_client()
    lease = JobLease(client, site.id, heartbeat_thread=False)
    try:
        assert [j["id"] for j in lease.acquire(1)] == ids[:1]
        Job.objects.filter(id=ids[:1]).update(state="RUNNING")

        real = client._http()
        lost_error = client._retry_errors[0]
        sent: list[dict] = []

        class LosesTheFirstDeleteAnswer:
            def request(self, method: str, url: str, **kw: Any) -> Any:
                resp = real.request(method, url, **kw)
                if method == "DELETE":
                    sent.append(dict(kw.get("headers") or {}))
                    if len(sent) == 1:
                        raise lost_error("the answer was lost (for the test)")  # applied by the server
                return resp

            def __getattr__(self, attr: str) -> Any:
                return getattr(real, attr)

        # Instance attributes over the methods, removed below (not monkeypatch: env's settings stay).
        client._http = LosesTheFirstDeleteAnswer  # type: ignore[method-assign]
        client._backoff = lambda *a, **k: 0.01  # type: ignore[method-assign]
        caplog.set_level(logging.WARNING, logger="balsam._api.query")
        query = Job.objects.filter(tags={"k": "lost"})
        assert query.delete() == 2
        assert len(sent) == 2 and sent[0][KEY] == sent[1][KEY]  # resent with the same key: replayed
        warnings = [r.getMessage() for r in caplog.records if r.name == "balsam._api.query"]
        assert warnings == [f"1 matching job was not deleted: RUNNING in a launcher (ids {ids[0]}); "
                            "delete them by id or after they end"]
        assert query.skipped_running == (1, [ids[0]])
        del client._http, client._backoff
        assert [j.id for j in Job.objects.filter(tags={"k": "lost"})] == ids[:1]
    finally:
        lease.close()


# --------------------------------------------------------------------------- records without headers


def test_records_written_before_the_headers_were_kept_replay_as_before() -> None:
    """A record of migration 0021's schema (no ``answer_headers``: NULL after 0022) replays its
    status, body and media type, with no extra header."""
    from balsam.server.idempotency import ANSWER, Recorded, Replay

    response = Replay(Recorded(200, ANSWER, [], b"3", "application/json")).response()
    assert (response.status_code, bytes(response.body), response.headers["content-type"]) == (200, b"3", "application/json")
    assert SKIPPED_RUNNING_HEADER not in response.headers
    with_header = Replay(Recorded(200, ANSWER, [], b"0", "application/json",
                                  [[SKIPPED_RUNNING_HEADER, "count=1; ids=7"]])).response()
    assert with_header.headers[SKIPPED_RUNNING_HEADER] == "count=1; ids=7"


def test_migration_0022_keeps_the_records_stored_before(database_url: str, tmp_path: Path) -> None:
    """A record an update wrote at 0021 (no headers column) is there after the upgrade, its headers
    NULL, and is replayed as it was; the downgrade drops the column and keeps the record."""
    import datetime as dt

    import sqlalchemy as sa
    from alembic import command
    from scratch_db import scratch_database

    from balsam.server.db import create_db_engine
    from balsam.server.idempotency import ANSWER, Recorded, Replay
    from balsam.server.migrate import alembic_config, upgrade

    now = dt.datetime.now(dt.timezone.utc)
    with scratch_database(database_url, tmp_path, "answer_headers") as url:
        assert upgrade(url, "0021_job_data_json") == "0021_job_data_json"
        engine = create_db_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO users (id, username, date_joined) VALUES (1, 'u', :now)"), {"now": now})
                conn.execute(sa.text(
                    "INSERT INTO idempotency_keys (user_id, key, request_hash, status_code, resource, resource_ids, "
                    "created, expires, answer, answer_type) VALUES (1, 'k', 'h', 200, 'answer', '[]', :now, :now, "
                    ":answer, 'application/json')"), {"now": now, "answer": b"3"})
            assert upgrade(url, "0022_idempotent_answer_headers") == "0022_idempotent_answer_headers"
            with engine.begin() as conn:
                row = conn.execute(sa.text("SELECT status_code, answer, answer_type, answer_headers "
                                           "FROM idempotency_keys WHERE key = 'k'")).one()
            assert (row[0], bytes(row[1]), row[2], row[3]) == (200, b"3", "application/json", None)
            replay = Replay(Recorded(int(row[0]), ANSWER, [], bytes(row[1]), row[2], row[3])).response()
            assert replay.status_code == 200 and bytes(replay.body) == b"3" and SKIPPED_RUNNING_HEADER not in replay.headers
            command.downgrade(alembic_config(url), "0021_job_data_json")
            with engine.begin() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM idempotency_keys WHERE key = 'k'")).scalar() == 1
        finally:
            engine.dispose()


def test_only_balsam_headers_are_recorded_and_replayed() -> None:
    """Before: every header of the answer was recorded and replayed (but its content type and
    length): a route's ``Set-Cookie`` or ``Retry-After`` would have been sent again to a retry long
    after, setting an old cookie again or asking it to wait for a moment past. Only ``Balsam-*``
    headers are now (the query delete's ``Balsam-Skipped-Running`` among them), also from a record
    written before."""
    from starlette.responses import Response

    from balsam.server.idempotency import ANSWER, Recorded, Replay, answer_headers

    answer = Response(b"0", media_type="application/json")
    answer.headers.append("Set-Cookie", "balsam_dashboard=old; Path=/dashboard")
    answer.headers.append("Retry-After", "5")
    answer.headers.append(SKIPPED_RUNNING_HEADER, "count=1; ids=7")
    answer.headers.append("X-Other", "1")
    recorded = answer_headers(answer)
    assert recorded == [[SKIPPED_RUNNING_HEADER.lower(), "count=1; ids=7"]], recorded
    assert answer_headers(Response(b"3", media_type="application/json")) is None
    # a record that holds other headers (written before the filter) replays only Balsam's own
    replay = Replay(Recorded(200, ANSWER, [], b"0", "application/json",
                             [["set-cookie", "balsam_dashboard=old"], ["retry-after", "5"],
                              [SKIPPED_RUNNING_HEADER, "count=1; ids=7"]])).response()
    assert replay.headers[SKIPPED_RUNNING_HEADER] == "count=1; ids=7"
    assert "set-cookie" not in replay.headers and "retry-after" not in replay.headers, dict(replay.headers)

"""The database's refusals (IntegrityError) read as one line naming the record, on both databases
(balsam.server.errors.database_refusal / refusal_answer): what a route answers when no check of its
own says better, instead of the DBAPI's text (PostgreSQL's "insert or update on table ... violates
foreign key constraint ...", SQLite's "FOREIGN KEY constraint failed")."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import create_site_and_app, logged_in_test_client

from balsam.server.errors import APIError, database_refusal, refusal_answer, refusals_answered
from balsam.server.tables import job_parents, jobs, sessions, sites

RAW_TEXT = ("violates", "constraint", "FOREIGN KEY", "UNIQUE", "duplicate key", "Key (")


def _refused(engine: sa.Engine, statement: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        with refusals_answered(), engine.begin() as conn:
            conn.execute(statement)
    detail = caught.value.detail
    assert isinstance(detail, str) and "\n" not in detail and not any(w in detail for w in RAW_TEXT), detail
    return caught.value


def test_refusals_name_the_record_and_never_the_dbapi_text(database_url: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    with logged_in_test_client(database_url, "s" * 40) as (client, app):
        engine = app.state.engine
        pg = engine.dialect.name == "postgresql"
        site_id, app_id = create_site_and_app(client)
        job_id = client.post("/jobs/", json=[{"workdir": "w", "app_id": app_id}]).json()[0]["id"]

        gone = _refused(engine, sa.insert(sessions).values(site_id=999_999, heartbeat=now))
        # PostgreSQL says which row is missing; SQLite says nothing of it.
        assert (gone.status_code, gone.detail) == ((404, "Site not found: 999999") if pg else (
            404, "A record this request refers to (its site, app, BatchJob or parent jobs) no longer exists"))
        parent = _refused(engine, sa.insert(job_parents).values(child_id=job_id, parent_id=888_888))
        assert parent.status_code == 404 and (not pg or parent.detail == "Parent job not found: 888888"), parent.detail
        # A copy of the site's row: its (owner_id, name) is taken.
        columns = [c for c in sites.c if c.name != "id"]
        twin = _refused(engine, sa.insert(sites).from_select([c.name for c in columns],
                                                             sa.select(*columns).where(sites.c.id == site_id)))
        assert twin.status_code == 409 and twin.detail.startswith("A Site with this owner_id, name"), twin.detail
        assert not pg or twin.detail.endswith(", s) already exists"), twin.detail
        # A NOT NULL column left empty: 422 naming it.
        empty = _refused(engine, sa.insert(jobs).values(site_id=site_id, app_id=app_id, workdir=None, state="CREATED"))
        assert empty.status_code == 422 and "workdir" in empty.detail, empty.detail


def test_the_refusal_of_an_error_without_a_database_reason_is_generic() -> None:
    error = sa.exc.IntegrityError("INSERT ...", {}, Exception("CHECK constraint failed: x"))
    answer = refusal_answer(database_refusal(error))
    assert answer.status_code == 409 and "constraint" not in answer.detail, answer.detail

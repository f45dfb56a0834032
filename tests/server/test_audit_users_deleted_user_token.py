"""A user deleted from the database (by an administrator: ``DELETE FROM users``) while a token of
theirs is still remembered as good by a server process (``BALSAM_AUTH_REVOCATION_CACHE_SEC``): a
write then failed on the foreign key to ``users`` and answered 404 "User not found: <id>", a
record nobody asked for. It is refused as every request of that token soon is, 401, and nothing is
written."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import Api

pytestmark = pytest.mark.postgres


def test_a_deleted_users_remembered_token_is_refused_401(_live_server_pg_obj: Any, register: Any) -> None:
    api = Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    try:
        api.ok("GET", "/sites/")  # the credential is checked and remembered now
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM users WHERE id = :id"), {"id": api.user_id})
        resp = api.http.post("/sites/", json={"name": "after-delete", "path": "/p/after-delete"})
        assert resp.status_code == 401, resp.text  # before: 404 {"detail":"User not found: <id>"}
        assert "not found" not in resp.text, resp.text
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM sites WHERE owner_id = :id"), {"id": api.user_id}).scalar() == 0
    finally:
        engine.dispose()
        api.close()

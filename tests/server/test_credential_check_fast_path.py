"""The credential check made before a request's body is read runs on the event loop when the
process's credential cache vouches for the token (a dict lookup), and goes to the thread pool
(a database read) only on a miss. Before: every authenticated POST/PUT/PATCH handed it to the
thread pool, then checked it again there with the body. A revocation still refuses the next
request before its body (tests/server/test_security_limits_bodies.py)."""

from __future__ import annotations

import dataclasses

import pytest
from server_testlib import logged_in_test_client

import balsam.server.routing as routing


@pytest.fixture
def pool_calls(monkeypatch):
    """The names of the functions routed handed to the thread pool."""
    calls: list[str] = []
    real = routing.run_in_threadpool

    async def counting(func, *args, **kwargs):
        calls.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(routing, "run_in_threadpool", counting)
    return calls


def test_a_cached_credential_is_checked_before_the_body_without_the_thread_pool(tmp_path, pool_calls):
    with logged_in_test_client(f"sqlite:///{tmp_path / 'f.db'}", "s" * 40) as (client, app):
        assert client.post("/sites/", json={"name": "a", "path": "/tmp/a"}).status_code == 201
        pool_calls.clear()
        assert client.post("/sites/", json={"name": "b", "path": "/tmp/b"}).status_code == 201
        assert pool_calls == ["_authenticated_call"], pool_calls  # the handler only
        # Revoked by this process: the cache forgets it, the next body request goes to the pool
        # (the database says revoked) and is refused.
        assert client.post("/auth/logout").status_code == 204
        pool_calls.clear()
        resp = client.post("/sites/", json={"name": "c", "path": "/tmp/c"})
        assert resp.status_code == 401, resp.text
        assert pool_calls == ["_check_credential"], pool_calls
    app.state.engine.dispose()


def test_only_user_is_enforced_on_the_fast_path(tmp_path, pool_calls):
    with logged_in_test_client(f"sqlite:///{tmp_path / 'o.db'}", "s" * 40) as (client, app):
        assert client.post("/sites/", json={"name": "a", "path": "/tmp/a"}).status_code == 201
        app.state.settings = dataclasses.replace(app.state.settings, only_user="somebody-else")
        pool_calls.clear()
        resp = client.post("/sites/", json={"name": "b", "path": "/tmp/b"})
        assert resp.status_code == 401 and "serves only its local user 'somebody-else'" in resp.text, resp.text
        assert pool_calls == [], pool_calls
    app.state.engine.dispose()

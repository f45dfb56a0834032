"""Bodies read before anybody is known: the public routes (login, registration, token refresh) read
at most 64 KiB (413 beyond), and a token whose credential was revoked is refused (401) before its
body is read. Also: ``PUT /batch-jobs/{id}`` refuses another ``site_id`` as the bulk PATCH does."""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
from server_testlib import logged_in_test_client
from test_batch_jobs import bj_body

#: balsam.server.routing.PUBLIC_BODY_LIMIT_BYTES, written out: the bound is part of the contract.
PUBLIC_BODY_LIMIT_BYTES = 64 * 1024

PUBLIC_POSTS = ["/auth/password/login", "/auth/password/register", "/auth/token"]


@pytest.mark.parametrize("path", PUBLIC_POSTS)
def test_a_public_route_refuses_a_body_beyond_64_kib(server_url, path):
    form = b"username=u&password=" + b"x" * (70 * 1024)
    resp = httpx.post(server_url + path, content=form, timeout=30,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 413, resp.text
    assert f"limit of {PUBLIC_BODY_LIMIT_BYTES} bytes" in resp.json()["detail"]

    def chunks():  # no Content-Length: refused while reading, once past the limit
        for _ in range(70):
            yield b"x" * 1024

    resp = httpx.post(server_url + path, content=chunks(), timeout=30,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 413, resp.text


def test_a_normal_login_and_registration_still_work(server_url, register):
    username, password, _, _, _ = register(server_url)
    resp = httpx.post(server_url + "/auth/password/login", timeout=30,
                      data={"username": username, "password": password, "scope": "offline_access"})
    assert resp.status_code == 200, resp.text
    refreshed = httpx.post(server_url + "/auth/token", timeout=30,
                           data={"grant_type": "refresh_token", "refresh_token": resp.json()["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text
    # A body just under the bound is read (and judged on its fields).
    near = httpx.post(server_url + "/auth/password/login", timeout=30,
                      data={"username": username, "password": "x" * (PUBLIC_BODY_LIMIT_BYTES - 200)})
    assert near.status_code == 401, near.text


def _logged_out_token(server_url: str, register) -> str:
    _, _, _, token, _ = register(server_url)
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.post(server_url + "/auth/logout", headers=headers, timeout=30).status_code == 204
    return token


def test_a_revoked_token_is_refused_before_its_body_is_read(server_url, register):
    """Real uvicorn: the request announces 60 MB (under the API's 64 MiB) and sends 1 KB of it.
    Its answer, 401, comes at once: the server did not wait for the body."""
    token = _logged_out_token(server_url, register)
    url = urlsplit(server_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(f"POST /sites/ HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {60 * 10**6}\r\n\r\n".encode() + b"[" * 1024)
        sock.settimeout(5)
        started = time.monotonic()
        try:
            head = sock.recv(4096).decode("latin-1")
        except socket.timeout:
            head = ""
    assert head.startswith("HTTP/1.1 401"), f"no 401 within {time.monotonic() - started:.1f}s: {head[:200]!r}"


def test_a_revoked_token_s_body_is_not_consumed(tmp_path):
    """In-process: the ASGI ``receive`` counts the chunks the server asked for; none was."""
    with logged_in_test_client(f"sqlite:///{tmp_path / 'b.db'}", "s" * 40) as (client, app):
        token = client.headers["Authorization"]
        assert client.post("/auth/logout").status_code == 204
    chunk, total = 64 * 1024, 8 * 2**20
    consumed = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal consumed
        consumed += chunk
        return {"type": "http.request", "body": b"x" * chunk, "more_body": consumed < total}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/sites/", "raw_path": b"/sites/", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1"), (b"authorization", token.encode()),
                         (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8765)}
    try:
        asyncio.run(app(scope, receive, send))
    finally:
        app.state.engine.dispose()
    assert sent[0]["status"] == 401
    assert consumed == 0, f"{consumed} bytes of a revoked token's body were read"


def test_put_refuses_another_site_id_as_patch_does(api):
    site, other = api.site(), api.site()
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"]))
    for method, path, body in [("PUT", f"/batch-jobs/{bj['id']}", {"site_id": other["id"], "num_nodes": 3}),
                               ("PATCH", "/batch-jobs/", [{"id": bj["id"], "site_id": other["id"], "num_nodes": 3}])]:
        resp = api.http.request(method, path, json=body)
        assert resp.status_code == 422, (method, resp.text)
        (error,) = resp.json()["detail"]
        assert error["msg"] == "cannot be changed" and error["loc"][-1] == "site_id", (method, error)
    assert api.ok("GET", f"/batch-jobs/{bj['id']}") == bj  # nothing updated
    for wrong in ["x", True, [site["id"]]]:
        assert api.http.put(f"/batch-jobs/{bj['id']}", json={"site_id": wrong}).status_code == 422, wrong
    # Its own site_id (a client re-sending the object it read) is accepted.
    same = api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"site_id": site["id"], "num_nodes": 3})
    assert (same["site_id"], same["num_nodes"]) == (site["id"], 3)

"""An unexpected server error (a 500) says ``Connection: close``: Starlette raises the error again
once the answer is sent and uvicorn then closes the connection, so the client's next request on that
kept-alive connection was reset (``ReadError``), a failure that was not its own. The server runs in
this process (a real uvicorn in a thread) so that one route can be made to fail."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def failing_site_route(database_url: str, monkeypatch: pytest.MonkeyPatch, register: Any) -> Iterator[tuple[httpx.Client, int]]:
    import uvicorn

    from balsam.server.app import create_app
    from balsam.server.routes import sites as site_routes
    from balsam.server.settings import ServerSettings

    app = create_app(settings=ServerSettings(database_url=database_url, registration="open",
                                             secret_key="unexpected-error-secret-0123456789-abcdefghij"),
                     create_tables_now=True)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # a readiness wait, not a timed assertion
        assert thread.is_alive(), "the in-process server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        _username, _password, _user_id, token, _ = register(url)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        site = client.post("/sites/", json={"name": "oops", "path": "/tmp/oops"})
        assert site.status_code == 201, site.text
        real = site_routes.site_dict

        def site_dict(row: Any) -> dict[str, Any]:
            if row.name == "oops":
                raise RuntimeError("a bug in the server")
            return real(row)

        monkeypatch.setattr(site_routes, "site_dict", site_dict)
        yield client, site.json()["id"]
        client.close()
    finally:
        server.should_exit = True
        thread.join()


def test_a_500_closes_its_connection_and_the_next_request_gets_a_new_one(failing_site_route) -> None:
    client, site_id = failing_site_route
    for _ in range(3):  # each time: the 500, then a request on the same client
        failed = client.get(f"/sites/{site_id}")
        assert failed.status_code == 500 and "RuntimeError" in failed.json()["detail"]
        assert failed.headers.get("connection") == "close"
        assert client.get("/sites/", params={"name": "none"}).status_code == 200

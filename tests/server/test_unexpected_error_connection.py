"""An unexpected server error (a 500) says ``Connection: close``: Starlette raises the error again
once the answer is sent and uvicorn then closes the connection, so the client's next request on that
kept-alive connection was reset (``ReadError``), a failure that was not its own. The server runs in
this process (a real uvicorn in a thread) so that one route can be made to fail."""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import pytest


@pytest.fixture
def failing_site_route(database_url: str, monkeypatch: pytest.MonkeyPatch, register: Any,
                       serve_in_process: Any) -> Iterator[tuple[httpx.Client, int]]:
    from balsam.server.app import create_app
    from balsam.server.routes import sites as site_routes
    from balsam.server.settings import ServerSettings

    url = serve_in_process(create_app(
        settings=ServerSettings(database_url=database_url, registration="open",
                                secret_key="unexpected-error-secret-0123456789-abcdefghij"),
        create_tables_now=True))
    _username, _password, _user_id, token, _ = register(url)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        site = client.post("/sites/", json={"name": "oops", "path": "/tmp/oops"})
        assert site.status_code == 201, site.text
        real = site_routes.site_dict

        def site_dict(row: Any) -> dict[str, Any]:
            if row.name == "oops":
                raise RuntimeError("a bug in the server")
            return real(row)

        monkeypatch.setattr(site_routes, "site_dict", site_dict)
        yield client, site.json()["id"]


def test_a_500_closes_its_connection_and_the_next_request_gets_a_new_one(failing_site_route) -> None:
    client, site_id = failing_site_route
    for _ in range(3):  # each time: the 500, then a request on the same client
        failed = client.get(f"/sites/{site_id}")
        assert failed.status_code == 500 and "RuntimeError" in failed.json()["detail"]
        assert failed.headers.get("connection") == "close"
        assert client.get("/sites/", params={"name": "none"}).status_code == 200

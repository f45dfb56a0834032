"""Every route of the server's routing table, with each of its methods, is in ``/openapi.json``:
clients and schemathesis (test_openapi.py) know only the routes the document names, and the
launchers' release route (``POST /sessions/{id}/release``) was served without being in it."""

from __future__ import annotations

import httpx
from starlette.routing import Route

#: Not API routes: the dashboard's HTML pages, the document itself and the server's name.
NOT_API = ("/dashboard", "/openapi.json", "/")


def test_every_route_and_method_of_the_app_is_in_the_document(live_server: str) -> None:
    from balsam.server.app import _all_routes

    doc = httpx.get(f"{live_server}/openapi.json").json()
    missing = []
    for entry in _all_routes():
        path = getattr(entry, "path", "")
        if not isinstance(entry, Route) or path in NOT_API or path.startswith("/dashboard/"):
            continue
        ops = doc["paths"].get(path, {})
        missing += [f"{method} {path}" for method in sorted(entry.methods or ()) if method != "HEAD" and method.lower() not in ops]
    assert not missing, f"routes served but missing from /openapi.json: {missing}"

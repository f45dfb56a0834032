"""Shared helpers of the server tests (a uniquely named module: conftest modules are not importable)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

#: Sessions of the ``short_expiry_server`` expire after this many seconds without a heartbeat.
SHORT_EXPIRY_SEC = 2


class Api:
    """A logged-in HTTP client for one user plus shortcuts to create records."""

    def __init__(self, url: str, register: Any, username: "str | None" = None) -> None:
        self.url = url
        self.username, self.password, self.user_id, self.token, _ = register(url, username)
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {self.token}"}, timeout=120)

    def close(self) -> None:
        self.http.close()

    def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        resp = self.http.request(method, path, **kwargs)
        assert resp.status_code == status, f"{method} {path} -> {resp.status_code}: {resp.text}"
        return resp.json() if resp.content else None

    def site(self, name: "str | None" = None, **fields: Any) -> dict:
        name = name or f"site-{uuid.uuid4().hex[:8]}"
        return self.ok("POST", "/sites/", 201, json={"name": name, "path": f"/projects/{name}", **fields})

    def app(self, site_id: int, name: str = "Hello", **fields: Any) -> dict:
        body = {"site_id": site_id, "name": name, "serialized_class": "c2VyaWFsaXplZA==", "source_code": "class Hello: ...",
                **fields}
        return self.ok("POST", "/apps/", 201, json=body)

    def jobs(self, app_id: int, n: int = 1, prefix: "str | None" = None, **fields: Any) -> list[dict]:
        prefix = prefix or uuid.uuid4().hex[:6]
        return self.ok("POST", "/jobs/", 201, json=[{"workdir": f"{prefix}/{i}", "app_id": app_id, **fields} for i in range(n)])

    def patch_states(self, ids: list[int], state: str, **extra: Any) -> int:
        return self.ok("PATCH", "/jobs/", json=[{"id": i, "state": state, **extra} for i in ids])

    def job(self, job_id: int) -> dict:
        return self.ok("GET", f"/jobs/{job_id}")

    def events(self, **params: Any) -> list[dict]:
        return self.ok("GET", "/events/", params=params)["results"]

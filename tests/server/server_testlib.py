"""Shared helpers of the server tests (a uniquely named module: conftest modules are not importable)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
import uuid
from typing import Any, Iterator

import httpx
import sqlalchemy as sa
from uvicorn.protocols.utils import get_path_with_query_string

from balsam.server.access_guard import ACCESS_LOG_REDACTION

#: Sessions of the ``short_expiry_server`` expire after this many seconds without a heartbeat.
SHORT_EXPIRY_SEC = 2
#: Sessions of the ``hand_swept_server`` expire after this many seconds without a heartbeat.
HAND_SWEPT_EXPIRY_SEC = 60


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


@contextlib.contextmanager
def logged_in_test_client(database_url: str, secret: str, **settings_fields: Any) -> Iterator[tuple[Any, Any]]:
    """An in-process server app on ``database_url`` (tables created; any other ServerSettings
    ``settings_fields``) and a starlette TestClient logged in as a freshly registered user ``u``:
    ``(client, app)``."""
    from starlette.testclient import TestClient

    from balsam.server.app import create_app
    from balsam.server.settings import ServerSettings

    settings = ServerSettings(database_url=database_url, secret_key=secret, registration="open", **settings_fields)
    app = create_app(settings=settings, create_tables_now=True)
    password = "a long enough password"
    with TestClient(app) as client:
        client.post("/auth/password/register", json={"username": "u", "password": password}).raise_for_status()
        token = client.post("/auth/password/login", data={"username": "u", "password": password}).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, app


def create_site_and_app(client: Any, name: str = "s") -> tuple[int, int]:
    """A site named ``name`` and an app "A" on it, through the API: ``(site_id, app_id)``."""
    site = client.post("/sites/", json={"name": name, "path": f"/tmp/{name}"}).json()
    app = client.post("/apps/", json={"site_id": site["id"], "name": "A", "serialized_class": "", "source_code": "",
                                      "parameters": {}, "transfers": {}, "description": ""}).json()
    return site["id"], app["id"]


def runnable(api: "Api", app_id: int, n: int = 1, **fields: Any) -> list[int]:
    """``n`` jobs of the app, moved to PREPROCESSED (what a launcher leases); their ids."""
    jobs = api.jobs(app_id, n, **fields)
    api.patch_states([j["id"] for j in jobs], "PREPROCESSED")
    return [j["id"] for j in jobs]


def create_jobs_at_once(api: Api, body: list, key: str, times: int = 6) -> list[list[int]]:
    """``times`` ``POST /jobs/`` of the same body with the same Idempotency-Key at once, each on a
    connection of its own; the ids of each answer."""

    def post() -> list[int]:
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.token}",
                                                     "Idempotency-Key": key}, timeout=120) as http:
            resp = http.post("/jobs/", json=body)
            assert resp.status_code == 201, resp.text
            return [job["id"] for job in resp.json()]

    with concurrent.futures.ThreadPoolExecutor(times) as pool:
        return list(pool.map(lambda _: post(), range(times)))


@contextlib.contextmanager
def client_with_session(database_url: str, secret: str) -> Iterator[dict[str, Any]]:
    """A logged-in test client with a site, an app and a Session of that site: yields
    ``{"client", "app", "app_id", "site_id", "session"}``."""
    with logged_in_test_client(database_url, secret) as (client, app):
        site_id, app_id = create_site_and_app(client)
        session = client.post("/sessions/", json={"site_id": site_id}).json()["id"]
        yield {"client": client, "app": app, "app_id": app_id, "site_id": site_id, "session": session}


def lock_job_row(engine: sa.Engine, job_id: int) -> tuple[sa.Connection, sa.RootTransaction, int]:
    """On PostgreSQL, the row of ``job_id`` locked FOR UPDATE by a connection of its own (a
    launcher's update in flight): (the connection, its open transaction, its backend pid)."""
    conn = engine.connect()
    tx = conn.begin()
    conn.execute(sa.text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id})
    return conn, tx, conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()


def wait_blocked_by(look: sa.Connection, pid: int, timeout: float, what: str) -> None:
    """Wait, reading on ``look``, until some PostgreSQL backend waits for a lock ``pid`` holds;
    ``what`` is the assertion's message if none does within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not look.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
                           {"pid": pid}).scalar():
        assert time.monotonic() < deadline, what
        look.rollback()  # pg_stat_activity is read once per transaction
        time.sleep(0.05)


def uvicorn_access_line(url: str, status: int = 401) -> str:
    """The access log line uvicorn writes for a GET of ``url`` answered ``status`` (its format, its
    target), through the redaction every app installs on the ``uvicorn.access`` logger."""
    target = httpx.URL(url)
    scope = {"raw_path": target.raw_path.partition(b"?")[0], "query_string": target.query}
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", get_path_with_query_string(scope), "1.1", status), None)
    assert ACCESS_LOG_REDACTION.filter(record)
    return record.getMessage()

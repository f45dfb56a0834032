"""A server refuses a database whose schema is not its own; a launcher credential cannot rename or
move its site. Real uvicorn servers (``python -m balsam.server``), SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import sqlalchemy as sa

from balsam.server.db import create_db_engine, normalize_database_url
from balsam.server.migrate import head_revision, upgrade
from scratch_db import scratch_database

OLD_REVISION = "0010_acquire_indexes"  # before sessions.clock_restarted (0016): POST /sessions/ answered 500
FUTURE_REVISION = "9999_written_by_a_newer_balsam"
SECRET = "balsam-test-secret-key-not-for-production-use-0123456789"  # tests/conftest.py SERVER_SECRET
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/balsam_test"  # as tests/conftest.py


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def scratch_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own (PostgreSQL: created on BALSAM_TEST_DATABASE_URL's server, dropped after)."""
    like = "sqlite://" if request.param == "sqlite" else os.environ.get("BALSAM_TEST_DATABASE_URL", DEFAULT_PG_URL)
    with scratch_database(like, tmp_path, "schema") as url:
        yield url


class Server:
    """``python -m balsam.server`` as a shared deployment runs it (the schema is the admin's to migrate)."""

    def __init__(self, url: str, workdir: Path, *extra_args: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"server-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
        env.update(BALSAM_AUTH_SECRET_KEY=SECRET, BALSAM_HOME=str(workdir / "home"), BALSAM_SERVER_CREATE_TABLES="0")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "balsam.server", "--port", str(self.port),
                                          "--database-url", url, "--log-level", "warning", *extra_args],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)

    def outcome(self) -> str:
        """``exited`` or ``answering``, whichever comes first (a readiness wait, not a timed assertion)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return "exited"
            try:
                if httpx.get(f"{self.base}/auth/how", timeout=2).status_code == 200:
                    return "answering"
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server neither answered nor exited in 120 s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _serve(url: str, workdir: Path, *extra_args: str) -> tuple[str, str]:
    server = Server(url, workdir, *extra_args)
    try:
        return server.outcome(), server.output()
    finally:
        server.stop()


def _masked(url: str) -> str:
    return sa.engine.make_url(normalize_database_url(url)).render_as_string(hide_password=True)


# -- S2: the schema is compared with this balsam's at startup --------------------------------------------


def test_a_server_on_an_older_schema_refuses_to_start(scratch_url: str, tmp_path: Path) -> None:
    """Before: the server started on revision 0010, logins, sites and jobs worked, and POST /sessions/
    (and the background sweep) answered 500: column sessions.clock_restarted does not exist."""
    assert upgrade(scratch_url, OLD_REVISION) == OLD_REVISION
    outcome, output = _serve(scratch_url, tmp_path)
    expected = (f"balsam server: database {_masked(scratch_url)} is at revision {OLD_REVISION}, "
                f"this balsam needs {head_revision()}: run `balsam server migrate`")
    assert outcome == "exited", output
    assert expected in output.splitlines() and "Traceback" not in output, output
    # What the message says to do is enough.
    migrate = subprocess.run([str(Path(sys.executable).parent / "balsam"), "server", "migrate", "--database-url",
                              scratch_url], capture_output=True, text=True,
                             env={**os.environ, "BALSAM_HOME": str(tmp_path / "home")})
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    server = Server(scratch_url, tmp_path)
    try:
        assert server.outcome() == "answering", server.output()
        name, password = f"u-{uuid.uuid4().hex[:8]}", "correct horse battery"
        from balsam.server.admin import Admin

        with Admin(scratch_url) as admin:
            admin.add_user(name, password, 12)
        token = httpx.post(f"{server.base}/auth/password/login", data={"username": name, "password": password}).json()
        http = httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {token['access_token']}"},
                            timeout=60)
        with http:
            site = http.post("/sites/", json={"name": "s", "path": "/projects/s"}).json()
            session = http.post("/sessions/", json={"site_id": site["id"]})
            assert session.status_code == 201, session.text
    finally:
        server.stop()


def test_a_server_on_an_empty_database_says_to_migrate(scratch_url: str, tmp_path: Path) -> None:
    outcome, output = _serve(scratch_url, tmp_path)
    assert outcome == "exited", output
    assert f"has no balsam schema, this balsam needs {head_revision()}: run `balsam server migrate`" in output


def test_a_database_a_newer_balsam_wrote_is_refused_by_every_worker(scratch_url: str, tmp_path: Path) -> None:
    """Before: served (whatever columns the newer schema had changed)."""
    upgrade(scratch_url)
    engine = create_db_engine(scratch_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": FUTURE_REVISION})
    finally:
        engine.dispose()
    outcome, output = _serve(scratch_url, tmp_path, "--workers", "2")
    assert outcome == "exited", output  # uvicorn's supervisor stops: no worker restarted over and over
    assert (f"is at revision {FUTURE_REVISION}, unknown to this balsam (written by a newer balsam, or a development "
            f"revision no release has; this balsam's schema is {head_revision()})") in output, output
    # The server that migrates its own database (the embedded one) does not try to "upgrade" it either.
    from balsam.server.app import create_app
    from balsam.server.migrate import SchemaMismatch
    from balsam.server.settings import ServerSettings

    with pytest.raises(SchemaMismatch, match="written by a newer balsam, or a development revision"):
        create_app(settings=ServerSettings(database_url=scratch_url, secret_key=SECRET), create_tables_now=True)


def test_servers_that_create_their_tables_still_start_on_an_empty_database(scratch_url: str) -> None:
    """The embedded server and the tests' servers (BALSAM_SERVER_CREATE_TABLES=1) migrate, then serve."""
    from starlette.testclient import TestClient

    from balsam.server.app import create_app
    from balsam.server.migrate import current_revision
    from balsam.server.settings import ServerSettings

    app = create_app(settings=ServerSettings(database_url=scratch_url, secret_key=SECRET), create_tables_now=True)
    with TestClient(app) as client:
        assert client.get("/auth/how").status_code == 200
    engine = create_db_engine(scratch_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    # ... and one at head with create_tables off serves too (what `balsam server start` runs).
    app = create_app(settings=ServerSettings(database_url=scratch_url, secret_key=SECRET), create_tables_now=False)
    with TestClient(app) as client:
        assert client.get("/auth/how").status_code == 200


# -- S3: a launcher credential cannot change its site's identity -----------------------------------------


def test_a_launcher_credential_cannot_rename_or_move_its_site(api) -> None:
    """Before: PUT /sites/{id} {"path": "/tmp/evil"} and {"name": "renamed"} answered 200 to a launcher."""
    site = api.site()
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q",
                                                  "num_nodes": 1, "wall_time_min": 10, "job_mode": "mpi"})
    cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "batch_job_id": bj["id"],
                                                           "ttl_sec": 3600})
    launcher = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {cred['access_token']}"}, timeout=60)
    with launcher:
        moved = launcher.put(f"/sites/{site['id']}", json={"path": "/tmp/evil"})
        assert moved.status_code == 403 and "path" in moved.json()["detail"], moved.text
        renamed = launcher.put(f"/sites/{site['id']}", json={"name": "renamed"})
        assert renamed.status_code == 403 and "name" in renamed.json()["detail"], renamed.text
        queued = {"7": {"scheduler_id": 7, "state": "queued", "queue": "q", "num_nodes": 1, "wall_time_min": 5,
                        "project": "p", "time_remaining_min": 5, "queued_time_min": 1}}
        both = launcher.put(f"/sites/{site['id']}", json={"name": "renamed", "path": "/tmp/evil", "queued_jobs": queued})
        assert both.status_code == 403, both.text
        assert launcher.get(f"/sites/{site['id']}").json()["queued_jobs"] == {}  # none of it written
        # What launchers and scheduler modules do write: a refresh, the scheduler's status, a whole
        # record sent back unchanged.
        assert launcher.put(f"/sites/{site['id']}", json={}).status_code == 200
        status = launcher.put(f"/sites/{site['id']}", json={"queued_jobs": queued, "backfill_windows": {}})
        assert status.status_code == 200 and list(status.json()["queued_jobs"]) == ["7"], status.text
        whole = launcher.get(f"/sites/{site['id']}").json()
        assert launcher.put(f"/sites/{site['id']}", json=whole).status_code == 200
    stored = api.ok("GET", f"/sites/{site['id']}")
    assert (stored["name"], stored["path"]) == (site["name"], site["path"])
    # The user's own login still renames and moves it.
    new_name = f"{site['name']}-renamed"
    assert api.ok("PUT", f"/sites/{site['id']}", json={"name": new_name, "path": "/projects/moved"})["name"] == new_name

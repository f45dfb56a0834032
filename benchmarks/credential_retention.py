"""Does an authenticated request cost more once the credentials table holds 10^5 ended rows?

A busy site's agent mints one launcher credential per BatchJob and every login makes one; ended
(revoked or expired) credentials used to stay forever. This benchmark times, on one in-process
server (starlette TestClient, ``BALSAM_AUTH_REVOCATION_CACHE_SEC=0`` so that every request reads
its credential), before and after inserting ``--rows`` ended credentials of the same user:

- ``GET /sites/`` (any authenticated request: the credential is read by primary key);
- ``GET /auth/credentials?active=true&limit=10`` (the user's live credentials: read through the
  ``user_id`` index, so every ended row of the user is visited);

and, where the server has the retention sweep (``auth.sweep_ended_credentials``), once more after
the sweep, with how long the sweep took and how many rows are left. Figures are medians of
``--requests`` requests, printed side by side (no limit is asserted).

    python benchmarks/credential_retention.py --db sqlite
    python benchmarks/credential_retention.py --db postgresql://postgres@127.0.0.1:55491/bench
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from starlette.testclient import TestClient

from balsam.server import auth
from balsam.server.app import create_app
from balsam.server.db import normalize_database_url
from balsam.server.settings import ServerSettings
from balsam.server.tables import credentials, metadata, users

PASSWORD = "a long enough password"


def _median_ms(client: TestClient, path: str, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        client.get(path).raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _measure(client: TestClient, n: int) -> dict:
    return {"GET /sites/": _median_ms(client, "/sites/", n),
            "GET /auth/credentials?active=true": _median_ms(client, "/auth/credentials?active=true&limit=10", n)}


def _fill(engine: sa.Engine, user_id: int, rows: int) -> None:
    """``rows`` credentials that ended 60 days ago (half revoked, half expired), in chunks."""
    ended = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=60)
    chunk = 10_000
    with engine.begin() as conn:
        for start in range(0, rows, chunk):
            conn.execute(sa.insert(credentials), [
                {"user_id": user_id, "kind": "launcher" if i % 2 else "login", "label": f"bench {i}",
                 "created": ended - dt.timedelta(days=1), "expires": ended,
                 "revoked": ended if i % 2 else None}
                for i in range(start, min(rows, start + chunk))])
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE credentials")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="sqlite", help="sqlite, or a PostgreSQL URL of a database to wipe")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="balsam-bench-cred-")
    url = f"sqlite:///{Path(tmp.name) / 'b.db'}" if args.db == "sqlite" else args.db
    if url.startswith("postgresql"):
        engine = sa.create_engine(normalize_database_url(url))
        metadata.drop_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        engine.dispose()
    settings = ServerSettings(database_url=url, secret_key="x" * 40, registration="open", revocation_cache_sec=0,
                              session_expire_sec=7200, session_sweep_sec=3600)  # no background sweep meanwhile
    app = create_app(settings=settings, create_tables_now=True)
    sweep = getattr(auth, "sweep_ended_credentials", None)
    with TestClient(app) as client:
        client.post("/auth/password/register", json={"username": "u", "password": PASSWORD}).raise_for_status()
        token = client.post("/auth/password/login", data={"username": "u", "password": PASSWORD}).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        engine = app.state.engine
        with engine.connect() as conn:
            user_id = conn.execute(sa.select(users.c.id).where(users.c.username == "u")).scalar_one()
        _measure(client, 20)  # warm up
        figures = {"empty table": _measure(client, args.requests)}
        _fill(engine, user_id, args.rows)
        figures[f"+{args.rows:,} ended"] = _measure(client, args.requests)
        swept = "server has no retention sweep"
        if sweep is not None:
            start = time.perf_counter()
            deleted = sweep(engine, retention_sec=settings.credential_retention_sec)
            took = time.perf_counter() - start
            with engine.connect() as conn:
                left = conn.execute(sa.select(sa.func.count()).select_from(credentials)).scalar_one()
            swept = f"sweep deleted {deleted:,} rows in {took:.2f} s, {left} left"
            figures["after sweep"] = _measure(client, args.requests)
    print(f"db={engine.dialect.name} rows={args.rows:,} requests={args.requests} (median ms per request)")
    columns = list(figures)
    print(f"{'request':36s}" + "".join(f"{c:>18s}" for c in columns))
    for name in figures[columns[0]]:
        print(f"{name:36s}" + "".join(f"{figures[c][name]:18.2f}" for c in columns))
    print(swept)
    tmp.cleanup()


if __name__ == "__main__":
    main()

"""How long the schema revisions that touch the jobs table take on a database of 10^6 jobs.

Revisions that rewrite or re-index ``jobs`` run with the server stopped (docs/server.md), so an
operator needs to know how long the stop lasts. For each backend a database is migrated to the
revision before the first one timed, filled with SQL (``dashboard_jobs_page.fill``: one user, site
and app, realistic states and tags), and then upgraded one revision at a time, each timed.

    python benchmarks/migrations_at_scale.py [--jobs 1000000] [--backends sqlite,postgresql]
        [--revisions 0017,0018]

The figure beside each is the fill itself (the time to write the same rows once): a revision that
rewrites the table costs about that much, one that only adds columns costs far less.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from bench_server import drop_pg, prepare_pg
from dashboard_jobs_page import fill

from balsam.server.db import normalize_database_url
from balsam.server.migrate import MIGRATIONS_DIR, upgrade

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/balsam_bench_migrations"
FILL_CHUNK = 250_000


def revision_before(revision: str) -> str:
    """The id of the revision just before ``revision`` (file names start with their 4-digit id)."""
    names = sorted(p.name for p in (MIGRATIONS_DIR / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
    ids = [name[:4] for name in names]
    return ids[ids.index(revision) - 1]


def seed_owner(engine: sa.Engine) -> None:
    """One user, site and app as plain rows (the schema of the older revision, not today's models)."""
    now = "now()" if engine.dialect.name == "postgresql" else "CURRENT_TIMESTAMP"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO users (id, username, date_joined) VALUES (1, 'bench', {now})")
        conn.exec_driver_sql(
            "INSERT INTO sites (id, owner_id, name, path, backfill_windows, queued_jobs, optional_batch_job_params, "
            f"allowed_projects, allowed_queues, transfer_locations, last_refresh, creation_date) VALUES "
            f"(1, 1, 'bench', '/bench', '{{}}', '{{}}', '{{}}', '[]', '[]', '{{}}', {now}, {now})")
        conn.exec_driver_sql(
            "INSERT INTO apps (id, site_id, name, description, serialized_class, source_code, parameters, transfers) "
            "VALUES (1, 1, 'bench', '', '', '', '{}', '{}')")


def run_backend(backend: str, url: str, jobs: int, revisions: list[str]) -> None:
    if backend == "postgresql":
        prepare_pg(url, revision_before(revisions[0]))
    else:
        upgrade(url, revision_before(revisions[0]))
    engine = sa.create_engine(normalize_database_url(url))
    seed_owner(engine)
    start = time.perf_counter()
    for first in range(1, jobs + 1, FILL_CHUNK):
        fill(engine, 1, 1, first, min(FILL_CHUNK, jobs - first + 1))
    fill_s = time.perf_counter() - start
    engine.dispose()
    print(f"{backend}: fill {jobs:,} jobs {fill_s:.1f} s (the peer: writing the rows once)", flush=True)
    for revision in revisions:
        start = time.perf_counter()
        upgrade(url, revision)
        took = time.perf_counter() - start
        print(f"{backend}: upgrade to {revision} {took:.1f} s ({took / fill_s:.2f}x the fill)", flush=True)
    if backend == "postgresql":
        drop_pg(url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--revisions", default="0017,0018", help="consecutive revision ids, oldest first")
    parser.add_argument("--pg-url", default=os.environ.get("BALSAM_BENCH_PG_URL", PG_DEFAULT))
    args = parser.parse_args()
    revisions = args.revisions.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="balsam-bench-migrations-"))
    try:
        for backend in args.backends.split(","):
            url = args.pg_url if backend == "postgresql" else f"sqlite:///{tmp / 'balsam.db'}"
            run_backend(backend, url, args.jobs, revisions)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

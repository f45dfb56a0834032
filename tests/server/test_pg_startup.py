"""Several workers of one server started at once on an empty PostgreSQL database all come up."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest

WORKERS = 3


@pytest.mark.postgres
def test_workers_migrating_an_empty_database_at_once_all_stay_up(live_server_factory):
    # Each worker runs the embedded migration (BALSAM_SERVER_CREATE_TABLES=1): without a lock they
    # raced to create alembic_version and the tables, and all but one died of a UniqueViolation.
    server = live_server_factory("postgresql", workers=WORKERS, migrated=False)
    supervisor = psutil.Process(server.proc.pid)

    def workers() -> set[int]:  # uvicorn's worker processes (not multiprocessing's resource tracker)
        return {p.pid for p in supervisor.children() if "spawn_main" in " ".join(p.cmdline())}

    deadline = time.monotonic() + 60
    while len(workers()) < WORKERS and time.monotonic() < deadline:
        time.sleep(0.2)
    first = workers()
    # Requests spread over the workers: each one has finished its start-up (migration included)
    # by the time it answers.
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(10 * WORKERS):
            assert http.get("/auth/how").status_code == 200
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "UniqueViolation" not in log, server.log_tail()
    assert len(first) == WORKERS and workers() == first, server.log_tail()

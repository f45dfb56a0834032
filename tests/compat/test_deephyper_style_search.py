"""DeepHyper's way of using Balsam, through the whole real stack: benchmarks/deephyper_style_search.py
(a run() objective, 8 evaluations in flight, a new one submitted as each result arrives, results
read with ``result_nowait()``, an early stop deleting the evaluations still queued) against
``balsam server start`` (SQLite, or PostgreSQL), ``balsam site start`` and a launcher of a BatchJob
on the ``local`` scheduler, in serial and mpi mode. Small N here; the benchmark runs thousands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).resolve().parents[2] / "benchmarks" / "deephyper_style_search.py"


def run_search(tmp_path: Path, *args: str) -> dict:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([sys.executable, str(DRIVER), "--workdir", str(tmp_path / "search"), "--no-peer",
                           "--timeout", "240", *args], capture_output=True, text=True, env=env, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(report: dict, evals: int, left_queued: int) -> None:
    seen = report["balsam"]
    # Every evaluation came back once, with the value (or exception) run() gave, or was still
    # pending at the early stop: none lost, none doubled. The search stops once evals - left_queued
    # results are in and keeps every result of its last poll (DeepHyper's search counts all of its
    # last gather), so how many more came back with the last poll is the launcher's timing: in a
    # CI run one poll brought two, and an exact evals - left_queued failed.
    assert evals - left_queued <= seen["evaluations_done"] <= evals, seen
    assert seen["submitted"] == evals
    assert seen["evaluations_done"] + seen["pending_at_stop"] == evals, seen
    assert (seen["doubled"], seen["ran_twice"], seen["wrong"]) == (0, [], []), seen
    # The early stop removed what it could, nothing more: every evaluation pending at the stop was
    # deleted but those the server said were RUNNING in the launcher and those finished before it
    # (how many of each is the launcher's timing, not Balsam's: nothing here counts on one queued).
    kept = seen["kept_at_stop"]
    assert seen["deleted_at_stop"] + len(kept) == seen["pending_at_stop"], seen
    assert all(k["skipped_running"] or k["state"] == "JOB_FINISHED" for k in kept), kept
    assert seen["left_in_db"] == evals - seen["deleted_at_stop"]
    # Polling is bulk: one listing per poll of all pending evaluations, never one request per job.
    # A poll is the first of each loop turn, or one more inside wait() after each poll_interval
    # (0.2 s) slept; the audit adds one listing.
    routes = seen["driver_requests_by_route"]
    assert not [r for r in routes if r.startswith("GET /jobs/") and r != "GET /jobs/"], routes
    assert routes["GET /jobs/"] <= seen["polls"] + seen["search_wall_s"] / 0.2 + 2, seen
    assert routes["POST /jobs/"] <= seen["submitted"]


@pytest.mark.parametrize("mode", ["serial", pytest.param("mpi", marks=pytest.mark.mpi)])
def test_deephyper_style_search_on_sqlite(mode: str, tmp_path: Path) -> None:
    report = run_search(tmp_path, "--evals", "24", "--left-queued", "4", "--sync-period", "1", "--job-mode", mode)
    check(report, 24, 4)


# The top conftest's database_url, PostgreSQL only (a private database, its schema reset): imported
# from "conftest" by name, another folder's conftest could answer under pytest-xdist.
@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_deephyper_style_search_on_postgresql_polling_with_filters(tmp_path: Path, database_url: str) -> None:
    report = run_search(tmp_path, "--evals", "24", "--left-queued", "4", "--sync-period", "1", "--poll", "filter",
                        "--database-url", database_url)
    check(report, 24, 4)

"""Idempotency records an idle site agent leaves on the server, per poll, beside keeping every one.

The soak of a real server and agent (embedded SQLite, and uvicorn with 2 workers on PostgreSQL; every
module on, 1 s periods, launchers started every few seconds) found one table that grew with
wall time while nothing happened: ``idempotency_keys``. An idle agent's processing module asks for
jobs once a second (``POST /sessions/{id}``, a 1 s long poll, with an ``Idempotency-Key``), and each
empty answer was kept for ``BALSAM_IDEMPOTENCY_TTL_SEC`` (24 h): 86,400 rows a day per idle agent.

This sends ``--polls`` empty acquires of one session (the idle agent's polls, without the 1 s wait)
to an in-process server on a temporary SQLite database, once as the server does now and once with
every empty answer kept (the peer: the server before, ``KEPT_ONLY_IF_MADE`` emptied), alternated
``--repeat`` times, and prints the rows left per poll, the projection to a day of 1 s polls, the
database file's growth, and the median time per poll (figures only, no limit asserted).

    python benchmarks/soak_idle_records.py [--polls 2000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))

from server_testlib import create_site_and_app, logged_in_test_client  # noqa: E402

from balsam.server import idempotency  # noqa: E402
from balsam.server.tables import idempotency_keys  # noqa: E402

BODY = {"max_num_jobs": 10, "states": ["PREPROCESSED"], "filter_tags": {}}
DAY = 86_400


def run(polls: int, keep_all: bool) -> tuple[int, int, float]:
    """Rows of idempotency_keys after ``polls`` empty acquires, the database's growth (bytes, with
    its WAL) and the median seconds per acquire."""
    kept = idempotency.KEPT_ONLY_IF_MADE
    if keep_all:
        idempotency.KEPT_ONLY_IF_MADE = frozenset()
    try:
        with tempfile.TemporaryDirectory(prefix="soak-idle-") as tmp:
            db = Path(tmp) / "b.db"
            with logged_in_test_client(f"sqlite:///{db}", uuid.uuid4().hex * 2) as (client, app):
                site_id, _app_id = create_site_and_app(client)
                session = client.post("/sessions/", json={"site_id": site_id}).json()["id"]
                size0 = sum(p.stat().st_size for p in Path(tmp).glob("b.db*"))
                times = []
                for _ in range(polls):
                    began = time.perf_counter()
                    resp = client.post(f"/sessions/{session}", json=BODY, headers={"Idempotency-Key": uuid.uuid4().hex})
                    times.append(time.perf_counter() - began)
                    assert resp.status_code == 200 and resp.json() == [], resp.text
                with app.state.engine.connect() as conn:
                    rows = conn.execute(sa.select(sa.func.count()).select_from(idempotency_keys)
                                        .where(idempotency_keys.c.resource == "acquire")).scalar_one()
                grown = sum(p.stat().st_size for p in Path(tmp).glob("b.db*")) - size0
        return rows, grown, statistics.median(times)
    finally:
        idempotency.KEPT_ONLY_IF_MADE = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.polls} empty acquires of one idle session, SQLite, in-process server")
    print(f"{'variant':<28}{'rows left':>10}{'rows/poll':>11}{'rows/day at 1 s':>17}{'db growth':>12}{'ms/poll':>9}")
    for _ in range(args.repeat):
        for name, keep_all in (("peer: every answer kept", True), ("now: empty ones not kept", False)):
            rows, grown, median = run(args.polls, keep_all)
            print(f"{name:<28}{rows:>10,}{rows / args.polls:>11.2f}{round(rows / args.polls * DAY):>17,}"
                  f"{grown / 1024:>10,.0f} K{median * 1000:>9.2f}")


if __name__ == "__main__":
    main()

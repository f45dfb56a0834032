"""How soon a waiting acquire (``Prefer: wait=N``) answers a write, behind one and several server processes.

Starts real uvicorn servers on one PostgreSQL database: first with one worker (the peer: every
wake-up is local to the process), then with ``--workers N``. In each, a waiter holds an acquire
for STAGED_IN jobs on one keep-alive connection (so it stays in one worker process), as the site
agent's processing module does, and a writer creates one job per round on a new connection each
time (so it lands on any worker). Measured per round: from the writer's answer to the waiter's
answer carrying the job. A wake-up that did not reach the waiter's process shows as an answer at
the wait's deadline (``--wait``, then one more look).

Usage: ``.venv/bin/python benchmarks/acquire_wake_latency.py [--workers 4] [--rounds 40] [--wait 2]
[--database-url postgresql://postgres@127.0.0.1:5432/balsam_bench_wake]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa

from balsam.server.db import normalize_database_url
from bench_server import prepare_pg, start_server

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/balsam_bench_wake"


def _user(url: str) -> dict[str, str]:
    name, password = f"bench-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    httpx.post(f"{url}/auth/password/register", json={"username": name, "password": password}).raise_for_status()
    token = httpx.post(f"{url}/auth/password/login", data={"username": name, "password": password}).json()
    return {"Authorization": f"Bearer {token['access_token']}"}


def measure(url: str, rounds: int, wait: float) -> list[float]:
    """Seconds from each write's answer to the waiting acquire's answer with that job."""
    headers = _user(url)
    with httpx.Client(base_url=url, headers=headers, timeout=60) as setup:
        site = setup.post("/sites/", json={"name": f"s-{uuid.uuid4().hex[:6]}", "path": "/tmp/s"}).json()["id"]
        app = setup.post("/apps/", json={"site_id": site, "name": "A", "serialized_class": "", "source_code": "",
                                         "parameters": {}, "transfers": {}, "description": ""}).json()["id"]
        session = setup.post("/sessions/", json={"site_id": site}).json()["id"]
    latencies: list[float] = []
    with httpx.Client(base_url=url, headers={**headers, "Prefer": f"wait={wait}"}, timeout=wait + 60) as waiter:
        for i in range(rounds):
            answer: dict[str, object] = {}

            def hold() -> None:
                resp = waiter.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {},
                                                                  "states": ["STAGED_IN"]})
                answer["at"], answer["jobs"] = time.perf_counter(), resp.json()

            holder = threading.Thread(target=hold)
            holder.start()
            time.sleep(0.1)  # the acquire has looked, found nothing, and waits
            with httpx.Client(base_url=url, headers=headers, timeout=60) as writer:  # a new connection
                writer.post("/jobs/", json=[{"workdir": f"w/{i}", "app_id": app}]).raise_for_status()
                written = time.perf_counter()
            holder.join()
            if not answer["jobs"]:
                raise SystemExit(f"round {i}: the waiting acquire answered without the new job")
            latencies.append(max(0.0, answer["at"] - written))
    return latencies


def report(label: str, latencies: list[float], wait: float) -> None:
    ordered = sorted(latencies)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    late = sum(1 for t in latencies if t >= wait * 0.5)
    print(f"{label:<34} {len(latencies)} writes: median {statistics.median(latencies) * 1000:7.1f} ms, "
          f"p90 {p90 * 1000:7.1f} ms, max {ordered[-1] * 1000:7.1f} ms; "
          f"{late} answered only at the wait's deadline ({wait:g} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--wait", type=float, default=2.0, help="Prefer: wait=N of the waiting acquire")
    parser.add_argument("--database-url", default=DEFAULT_URL, help="a PostgreSQL database the benchmark may drop")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="balsam-wake-bench-"))
    try:
        for workers, label in ((1, "1 server process (peer)"), (args.workers, f"{args.workers} server processes")):
            prepare_pg(args.database_url)
            workdir = tmp / f"workers-{workers}"
            workdir.mkdir()
            proc, url = start_server(workdir, args.database_url, home=workdir / "home", workers=workers,
                                     create_tables=False)
            try:
                report(label, measure(url, args.rounds, args.wait), args.wait)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        parsed = sa.engine.make_url(normalize_database_url(args.database_url))
        admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        admin.dispose()


if __name__ == "__main__":
    main()

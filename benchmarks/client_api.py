"""Python API throughput against a real uvicorn server (SQLite, or --database-url for PostgreSQL).

Prints jobs/s for bulk_create, listing (paginated query), bulk_update (state changes, as a
launcher sends them; then a different ``data`` on every job, which the server cannot group into one
``UPDATE`` of many rows: compare the two rows), query update, the futures poll (bulk_refresh) and
per-request latencies.

    .venv/bin/python benchmarks/client_api.py --jobs 20000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench_server import start_server


def timed(label: str, n: int, fn) -> object:
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    print(f"{label:<42} {n:>7} items  {elapsed:8.2f} s  {n / elapsed:10.0f} items/s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary directory")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="balsam-bench-") as tmp:
        workdir = Path(tmp)
        proc, url = start_server(workdir, args.database_url or f"sqlite:///{workdir / 'balsam.db'}",
                                 home=workdir / "server-home")
        try:
            run(url, workdir, args.jobs)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def run(url: str, workdir: Path, n_jobs: int) -> None:
    from balsam.api import ApplicationDefinition, Job, Session, Site, set_default_client
    from balsam.client import RESTClient

    client = RESTClient(url)
    username = f"bench-{uuid.uuid4().hex[:8]}"
    client.register(username, "bench-password")
    client.password_login(username, "bench-password")
    set_default_client(client)

    site = Site.objects.create(name="bench", path=str(workdir / "site"))

    class Bench(ApplicationDefinition):
        site = "bench"
        command_template = "echo {{ i }}"

    Bench.sync()
    print(f"server {url}, {n_jobs} jobs, Python API over HTTP")
    new = [Bench.submit(workdir=f"b/{i}", i=i, tags={"bench": "1"}, save=False) for i in range(n_jobs)]
    created = timed("Job.objects.bulk_create", n_jobs, lambda: Job.objects.bulk_create(new))
    listed = timed("list all (paginated query)", n_jobs, lambda: list(Job.objects.filter(tags={"bench": "1"})))
    assert len(listed) == n_jobs

    for job in created:
        job.state = "PREPROCESSED"
    timed("Job.objects.bulk_update (state)", n_jobs, lambda: Job.objects.bulk_update(created))
    for i, job in enumerate(created):
        job.data = {"result": i}
    timed("bulk_update, a different data per job", n_jobs, lambda: Job.objects.bulk_update(created))
    session = Session.objects.create(site_id=site.id)
    acquired: list = []

    def acquire_all() -> None:
        while True:
            batch = session.acquire_jobs(max_num_jobs=2048)
            if not batch:
                return
            acquired.extend(batch)

    timed("Session.acquire_jobs (2,048 per call)", n_jobs, acquire_all)
    for job in acquired:
        job.state = "RUNNING"
        job.state_data = {"num_nodes": 1}
    timed("bulk_update RUNNING + state_data", len(acquired), lambda: Job.objects.bulk_update(acquired))
    timed("Job.objects.bulk_refresh (futures poll)", n_jobs, lambda: Job.objects.bulk_refresh(created))
    timed("query.update(data=...)", n_jobs, lambda: Job.objects.filter(tags={"bench": "1"}).update(data={"k": 1}))
    session.delete()

    def latency(label: str, fn, repeat: int = 50) -> None:
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1000)
        samples.sort()
        print(f"{label:<42} median {statistics.median(samples):6.2f} ms   p95 {samples[int(0.95 * len(samples)) - 1]:6.2f} ms")

    one = created[0]
    latency("Job.objects.count() with a tag filter", lambda: Job.objects.filter(tags={"bench": "1"}).count())
    latency("job.refresh_from_db()", one.refresh_from_db)
    latency("job.save() one changed field", lambda: (one.data.update(n=time.time()), one.save()))
    print("requests sent:", sum(client.request_counts.values()))


if __name__ == "__main__":
    main()

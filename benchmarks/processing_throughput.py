"""Processing agent module throughput: jobs/s through the app hooks, against a real uvicorn server.

Starts a real server (SQLite in a temp dir), creates a site and N jobs, drives them to RUN_DONE as a
launcher does (Session acquire + bulk PATCH), then times the processing module (run in this process,
as the agent runs it) until every job is JOB_FINISHED:

- ``preprocess (default)``: STAGED_IN -> PREPROCESSED for N jobs whose app keeps the default hook
  (moved in bulk, no worker process);
- ``postprocess (default)``: RUN_DONE -> POSTPROCESSED -> JOB_FINISHED, same app;
- ``postprocess (user hook)``: RUN_DONE -> ... for M jobs of an app that overrides postprocess()
  (runs in the worker pool, one app instance per job, output in balsam.log).

Usage: ``.venv/bin/python benchmarks/processing_throughput.py [--jobs 10000] [--hook-jobs 500]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import yaml

from bench_server import start_server


def login(url: str, home: Path) -> None:
    name, password = f"bench-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    httpx.post(f"{url}/auth/password/register", json={"username": name, "password": password}).raise_for_status()
    token = httpx.post(f"{url}/auth/password/login", data={"username": name, "password": password}).json()
    home.mkdir(parents=True, exist_ok=True)
    (home / "client.yml").write_text(yaml.safe_dump({"api_root": url, "token": token["access_token"],
                                                     "token_expiry": token["expiration"], "username": name}))
    os.environ["BALSAM_HOME"] = str(home)
    os.environ["BALSAM_CLIENT_PATH"] = str(home / "client.yml")


def drive_to_run_done(client, site_id: int, ids: list[int]) -> None:
    """What launchers do: acquire through a Session, report RUNNING then RUN_DONE in bulk."""
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    wanted = set(ids)
    while wanted:
        got = client.post(f"/sessions/{session}", json={"max_num_jobs": 2048, "filter_tags": {}})
        got = got if isinstance(got, list) else got["results"]
        batch = [j["id"] for j in got if j["id"] in wanted]
        if not got:
            break
        for start in range(0, len(batch), 5000):
            chunk = batch[start : start + 5000]
            client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in chunk])
            client.patch("/jobs/", json=[{"id": i, "state": "RUN_DONE"} for i in chunk])
        wanted -= set(batch)
    client.delete(f"/sessions/{session}")


def count(client, site_id: int, state: str) -> int:
    return client.get("/jobs/", params={"site_id": site_id, "state": state, "limit": 0})["count"]


def timed_until(module, client, site_id: int, state: str, expected: int, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout
    while count(client, site_id, state) < expected:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {expected} jobs in {state}")
        delay = module.run_cycle()
        if delay:
            time.sleep(min(delay, 0.05))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs through the default hooks")
    parser.add_argument("--hook-jobs", type=int, default=500, help="jobs through a user postprocess() hook")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="balsam-processing-bench-") as tmp:
        workdir = Path(tmp)
        server, url = start_server(workdir, f"sqlite:///{workdir / 'balsam.db'}", home=workdir / "server-home")
        try:
            login(url, workdir / "home")
            from balsam.api import ApplicationDefinition, Job
            from balsam.client import load_client
            from balsam.config import SiteConfig
            from balsam.site.modules.processing import ProcessingModule
            from balsam.site.site_ops import init_site

            client = load_client()
            site_id = init_site(workdir / "site", "bench", "default", client)
            site = SiteConfig(workdir / "site")

            class Plain(ApplicationDefinition):
                site = site_id
                command_template = "true"

            class Hooked(ApplicationDefinition):
                site = site_id
                command_template = "true"

                def postprocess(self):
                    print("postprocessing", self.job.id)
                    self.job.data = {"checked": True}
                    self.job.state = "POSTPROCESSED"

            module = ProcessingModule(site, site.settings.processing, client)
            results = []

            plain = []
            for start in range(0, args.jobs, 5000):
                n = min(5000, args.jobs - start)
                plain += Job.objects.bulk_create([Job(f"plain/{start + i}", Plain) for i in range(n)])
            seconds = timed_until(module, client, site_id, "PREPROCESSED", args.jobs)
            results.append(("preprocess (default, bulk)", args.jobs, seconds))
            drive_to_run_done(client, site_id, [j.id for j in plain])
            seconds = timed_until(module, client, site_id, "JOB_FINISHED", args.jobs)
            results.append(("postprocess (default, bulk)", args.jobs, seconds))

            if args.hook_jobs:
                hooked = Job.objects.bulk_create([Job(f"hooked/{i}", Hooked) for i in range(args.hook_jobs)])
                timed_until(module, client, site_id, "PREPROCESSED", args.hook_jobs)
                drive_to_run_done(client, site_id, [j.id for j in hooked])
                seconds = timed_until(module, client, site_id, "JOB_FINISHED", args.jobs + args.hook_jobs)
                results.append((f"postprocess (user hook, {module.num_workers} workers)", args.hook_jobs, seconds))
            module.close()
        finally:
            server.terminate()
            server.wait(15)

    print(f"processing module throughput ({os.cpu_count()} CPUs; real uvicorn + SQLite server)")
    for label, n, seconds in results:
        print(f"  {label:<40} {n:>6} jobs in {seconds:6.2f} s = {n / seconds:8.0f} jobs/s")


if __name__ == "__main__":
    main()

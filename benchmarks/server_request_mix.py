"""Server CPU per job for a serial launcher's requests, replayed against a real uvicorn server.

For N jobs (made runnable first), in batches of B, the requests a serial launcher and the agent's
processing module make: an acquire (``POST /sessions/{id}``), the jobs' RUNNING and RUN_DONE,
then POSTPROCESSED, each with an ``Idempotency-Key`` as balsam's client sends on every POST, PUT,
PATCH and DELETE (the server moves them on to JOB_FINISHED). Printed:
the server process's CPU (user + system, from ``/proc``) per job and per request, for each batch
size and each way of sending RUNNING and RUN_DONE:

- **one call**: a job's RUNNING and RUN_DONE in the same ``PATCH /jobs/`` (applied in order: what
  the BulkStatusUpdater sends when both fall in one batch window);
- **two calls** (the peer, same run, same server): RUNNING in one call, RUN_DONE in the next (one
  update per job per call, as the updater sent them before December 2026).

On PostgreSQL only the server process is counted, not the database's backend. Each batch size
runs on its own fresh jobs in one server; the ways alternate, so a busy machine
shows in both. What the figures say: the CPU per job at large batches is the jobs' own cost (row
writes, the counters' triggers, events); what grows as batches shrink is the cost per request (a
write transaction, its statements, an idempotency record).

    .venv/bin/python benchmarks/server_request_mix.py [--jobs 2000] [--batches 4,40,128] [--database sqlite|postgresql]

``--patch-batches 1000,5000`` (``--batches ""`` to skip the mix): the bulk state updates alone, as a
launcher's status updater and the processing module send them for thousands of jobs: per batch
size, N fresh jobs leased (acquires of 2,048), then ``PATCH /jobs/`` RUNNING, RUN_DONE (each under
the session, with its own timestamp, as the updater sends them) and POSTPROCESSED, B updates per
call. Printed: the server's CPU per job-update of those PATCHes, beside the peer of the same run
and server: the CPU per job of the acquires that leased the same jobs (a path this measure does
not involve), and their ratio, so a busy machine shows in both.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import httpx
import orjson
import psutil

from bench_server import prepare_pg, start_server

PG_URL = os.environ.get("BALSAM_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/balsam_bench")


class Replay:
    def __init__(self, url: str) -> None:
        anon = httpx.Client(base_url=url, timeout=300)
        name, password = f"bench-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        self._ok(anon.post("/auth/password/register", json={"username": name, "password": password}))
        token = self._ok(anon.post("/auth/password/login", data={"username": name, "password": password})).json()
        anon.close()
        self.http = httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {token['access_token']}"})
        self.site = self._ok(self.http.post("/sites/", json={"name": "bench", "path": "/bench"})).json()["id"]
        self.app = self._ok(self.http.post("/apps/", json={"site_id": self.site, "name": "Noop", "serialized_class": "x",
                                                           "source_code": "y"})).json()["id"]
        self.requests = 0

    @staticmethod
    def _ok(resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            raise SystemExit(f"{resp.request.method} {resp.request.url} -> {resp.status_code}: {resp.text[:300]}")
        return resp

    def send(self, method: str, path: str, body: object, key: "str | None" = None) -> bytes:
        headers = {"content-type": "application/json", **({"Idempotency-Key": key} if key else {})}
        self.requests += 1
        return self._ok(self.http.request(method, path, content=orjson.dumps(body), headers=headers)).content

    def runnable(self, tag: str, count: int) -> int:
        """``count`` jobs tagged ``tag`` made PREPROCESSED; returns a new session's id."""
        # A "part" tag per 5,000 (the most one PUT updates).
        specs = [{"workdir": f"{tag}/{i}", "app_id": self.app, "tags": {"bench": tag, "part": str(i // 5000)},
                  "node_packing_count": 64} for i in range(count)]
        for start in range(0, count, 5000):
            self.send("POST", "/jobs/", specs[start:start + 5000], key=uuid.uuid4().hex)
            self._ok(self.http.put("/jobs/", params=[("tags", f"bench:{tag}"), ("tags", f"part:{start // 5000}")],
                                   json={"state": "PREPROCESSED"}))
        return orjson.loads(self.send("POST", "/sessions/", {"site_id": self.site}, key=uuid.uuid4().hex))["id"]

    def run(self, tag: str, session: int, batch: int, one_call: bool) -> int:
        """The launcher's and the processing module's requests for every job of ``tag``; returns jobs done."""
        acquire = {"max_num_jobs": batch, "filter_tags": {"bench": tag}, "serial_only": True, "max_nodes_per_job": 1,
                   "max_wall_time_min": 30}
        done = 0
        while True:
            ids = [job["id"] for job in orjson.loads(self.send("POST", f"/sessions/{session}", acquire, key=uuid.uuid4().hex))]
            if not ids:
                return done
            now = dt.datetime.now(dt.timezone.utc).isoformat()
            running = [{"id": i, "state": "RUNNING", "state_timestamp": now, "state_data": {"num_nodes": 1 / 64}} for i in ids]
            run_done = [{"id": i, "state": "RUN_DONE", "state_timestamp": now, "return_code": 0} for i in ids]
            if one_call:
                self.send("PATCH", "/jobs/", running + run_done, key=uuid.uuid4().hex)
            else:
                self.send("PATCH", "/jobs/", running, key=uuid.uuid4().hex)
                self.send("PATCH", "/jobs/", run_done, key=uuid.uuid4().hex)
            self.send("PATCH", "/jobs/", [{"id": i, "state": "POSTPROCESSED"} for i in ids], key=uuid.uuid4().hex)
            done += len(ids)

    def bulk_patches(self, server: psutil.Process, tag: str, count: int, batch: int) -> tuple[float, float, int]:
        """``count`` jobs leased then moved RUNNING, RUN_DONE, POSTPROCESSED in PATCHes of ``batch``:
        (server CPU seconds of the acquires, of the PATCHes, job-updates sent)."""
        session = self.runnable(tag, count)
        acquire = {"max_num_jobs": 2048, "filter_tags": {"bench": tag}, "serial_only": True, "max_nodes_per_job": 1,
                   "max_wall_time_min": 30}
        before = _cpu(server)
        ids: list[int] = []
        while True:
            got = orjson.loads(self.send("POST", f"/sessions/{session}", acquire, key=uuid.uuid4().hex))
            if not got:
                break
            ids += [job["id"] for job in got]
        acquire_cpu = _cpu(server) - before
        start = dt.datetime.now(dt.timezone.utc)

        def stamp(k: int) -> str:  # each update its own time, as the updater stamps them
            return (start + dt.timedelta(microseconds=37 * k)).isoformat()

        waves = [
            [{"id": i, "state": "RUNNING", "state_timestamp": stamp(k), "session_id": session} for k, i in enumerate(ids)],
            [{"id": i, "state": "RUN_DONE", "state_timestamp": stamp(k), "return_code": 0, "session_id": session}
             for k, i in enumerate(ids)],
            [{"id": i, "state": "POSTPROCESSED", "state_timestamp": stamp(k), "state_data": {"message": "done"}}
             for k, i in enumerate(ids)],
        ]
        bodies = [wave[at:at + batch] for wave in waves for at in range(0, len(wave), batch)]
        before = _cpu(server)
        for body in bodies:
            self.send("PATCH", "/jobs/", body, key=uuid.uuid4().hex)
        return acquire_cpu, _cpu(server) - before, sum(len(body) for body in bodies)


def _cpu(server: psutil.Process) -> float:
    times = server.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per batch size and way (default 2000)")
    parser.add_argument("--batches", default="4,40,128", help="batch sizes (default 4,40,128)")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--patch-batches", default="", help="bulk PATCH batch sizes (e.g. 1000,5000; default: none)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    patch_batches = [int(b) for b in args.patch_batches.split(",") if b]
    workdir = Path(tempfile.mkdtemp(prefix="balsam-bench-mix-"))
    if args.database == "postgresql":
        prepare_pg(PG_URL)
        url = PG_URL
    else:
        url = f"sqlite:///{workdir / 'balsam.db'}"
    proc, base = start_server(workdir, url, home=workdir, create_tables=args.database == "sqlite")
    try:
        replay = Replay(base)
        server = psutil.Process(proc.pid)
        for batch in patch_batches:
            acquire_cpu, patch_cpu, updates = replay.bulk_patches(server, f"p{batch}", args.jobs, batch)
            jobs = updates // 3
            if not acquire_cpu or not patch_cpu:
                print(f"  bulk PATCH of {batch}: too short a run to read the CPU (10 ms ticks); use more --jobs")
                continue
            print(f"bulk PATCH /jobs/, {batch} updates per call ({os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.1f}, real uvicorn + {args.database}, {jobs} jobs x RUNNING, RUN_DONE, POSTPROCESSED): "
                  f"server CPU {1e6 * patch_cpu / updates:.1f} us per job-update ({1000 * patch_cpu / jobs:.3f} ms per job); "
                  f"peer, acquiring the same jobs: {1e6 * acquire_cpu / jobs:.1f} us per job; "
                  f"PATCH/acquire {patch_cpu / updates / (acquire_cpu / jobs):.2f}")
        if not batches:
            return
        print(f"server CPU per job for a serial launcher's requests ({os.cpu_count()} CPUs, real uvicorn + "
              f"{args.database}, {args.jobs} jobs per batch size and way; acquire, RUNNING + RUN_DONE, POSTPROCESSED)")
        points: list[tuple[float, float]] = []  # (requests per job, CPU ms per job) of each run
        for batch in batches:
            figures = {}
            for one_call in (True, False):
                tag = f"b{batch}-{'one' if one_call else 'two'}"
                session = replay.runnable(tag, args.jobs)
                before, requests = server.cpu_times(), replay.requests
                done = replay.run(tag, session, batch, one_call)
                after = server.cpu_times()
                cpu = (after.user - before.user) + (after.system - before.system)
                figures[one_call] = (1000 * cpu / done, (replay.requests - requests) / done)
            (one, one_rate), (two, two_rate) = figures[True], figures[False]
            points += [(one_rate, one), (two_rate, two)]
            # The kernel counts CPU time in clock ticks (10 ms): a short run can read 0.
            share = f"{100 * one / two:.0f} %" if two else "too short a run to compare (the peer read 0 ticks)"
            print(f"  batches of {batch:>4}: one call {one:.3f} ms/job ({one_rate:.3f} requests/job); "
                  f"two calls (peer) {two:.3f} ms/job ({two_rate:.3f} requests/job); "
                  f"one call takes {share} of the peer's CPU")
        if len({rate for rate, _ in points}) > 1:
            # CPU per job = per job + per request x requests per job, least squares over every run.
            mean_x = sum(x for x, _ in points) / len(points)
            mean_y = sum(y for _, y in points) / len(points)
            slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
            print(f"  fitted over these runs: {slope:.2f} ms of server CPU per request whatever its size, "
                  f"{mean_y - slope * mean_x:.3f} ms per job besides")
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

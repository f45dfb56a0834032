"""Transfers module throughput at 10,000 items: items staged per second and API calls per cycle.

Starts a real server (uvicorn + SQLite in a temp dir), a site whose ``shared`` location is
``local://``, and N jobs each staging one small file in. The ``transfers`` module runs in this
process as the agent runs it, cycle after cycle with no pause (so the figure is the module's
capacity, not its ``service_period``), until every job is STAGED_IN. Printed beside it:

- the limit: the same N files copied by the backend's own copy function on 4 threads with no API
  (the file system's rate for atomic copies on this machine), measured before and after the runs
  because the machine is shared;
- API calls per cycle (every HTTP request the module made, counted at the client), beside what a
  per-item design would need (one GET + one PATCH per item).

Two settings: the defaults (batches of 100, 5 tasks at once) and large batches (1000 x 10, 8 copy
threads). Usage: ``.venv/bin/python benchmarks/transfers_throughput.py [--items 10000]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_server import start_server
from processing_throughput import login


class CountingClient:
    """The REST client, counting requests."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name in ("get", "post", "put", "patch", "delete"):
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls += 1
                return attr(*args, **kwargs)
            return counted
        return attr


def copy_loop_rate(sources: list[Path], dest_root: Path, threads: int) -> float:
    """Items/s of the backend's own atomic copy over ``threads`` threads, with no API at all."""
    from concurrent.futures import ThreadPoolExecutor

    from balsam.builtin.local_transfer import copy_into_place

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: copy_into_place(sources[i], dest_root / f"{i}" / "input.txt", recursive=False),
                      range(len(sources))))
    return len(sources) / (time.perf_counter() - t0)


def run(label: str, site: Any, raw_client: Any, app: Any, remote: Path, n: int, overrides: dict) -> dict:
    from balsam.api import Job
    from balsam.site.modules.transfers import TransfersModule, TransfersOptions

    for start in range(0, n, 5000):
        Job.objects.bulk_create([
            Job(f"{label}/{i}", app, transfers={"input": f"shared:{remote}/{i}.txt"})
            for i in range(start, min(n, start + 5000))
        ])
    client = CountingClient(raw_client)
    # The loop below runs the cycles itself; service_period (at least 1 s) paces only the agent's.
    options = TransfersOptions(transfer_locations={"shared": "local://"}, service_period=1, **overrides)
    module = TransfersModule(site, options, client)
    per_cycle: list[int] = []
    t0 = time.perf_counter()
    while True:
        before = client.calls
        module.run_cycle()
        per_cycle.append(client.calls - before)
        left = raw_client.get("/transfers/", params={"site_id": site.site_id, "state": ["pending", "active"], "limit": 0})
        if left["count"] == 0:
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    module.close()
    staged = raw_client.get("/jobs/", params={"site_id": site.site_id, "state": "STAGED_IN", "limit": 0})["count"]
    busy = [c for c in per_cycle if c]
    return {"label": label, "items": n, "seconds": seconds, "cycles": len(per_cycle), "staged": staged,
            "calls_max": max(busy), "calls_median": statistics.median(busy), "calls_total": client.calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    args = parser.parse_args()
    n = args.items
    results = []
    with tempfile.TemporaryDirectory(prefix="balsam-transfers-bench-") as tmp:
        workdir = Path(tmp)
        server, url = start_server(workdir, f"sqlite:///{workdir / 'balsam.db'}", home=workdir / "server-home")
        try:
            login(url, workdir / "home")
            from balsam.api import ApplicationDefinition
            from balsam.client import load_client
            from balsam.config import SiteConfig
            from balsam.site.site_ops import init_site

            client = load_client()
            site_id = init_site(workdir / "site", "bench", "default", client,
                                settings_overrides={"transfers": {"transfer_locations": {"shared": "local://"}}})
            site = SiteConfig(workdir / "site")

            class Stage(ApplicationDefinition):
                site = site_id
                command_template = "true"
                transfers = {"input": {"required": True, "direction": "in", "local_path": "input.txt"}}

            Stage.sync()
            remote = workdir / "remote"
            remote.mkdir()
            sources = []
            for i in range(n):
                path = remote / f"{i}.txt"
                path.write_bytes(os.urandom(64))
                sources.append(path)
            limits = [copy_loop_rate(sources, workdir / "copy-loop-1", 4)]
            staged_before = 0
            for label, overrides in (
                ("defaults", {}),
                ("large", {"transfer_batch_size": 1000, "max_concurrent_transfers": 10,
                           "backend_options": {"local": {"threads": 8}}}),
            ):
                result = run(label, site, client, Stage, remote, n, overrides)
                result["staged"] -= staged_before
                staged_before += result["staged"]
                results.append(result)
            limits.append(copy_loop_rate(sources, workdir / "copy-loop-2", 4))
        finally:
            server.terminate()
            server.wait(15)

    print(f"transfers module, {n} stage-in items through `local` ({os.cpu_count()} CPUs; real uvicorn + SQLite)")
    print(f"  limit: the same copies without the API (copy_into_place, 4 threads), before / after: "
          f"{limits[0]:.0f} / {limits[1]:.0f} items/s")
    for r in results:
        print(f"  {r['label']:<9} {r['items']} items -> {r['staged']} jobs STAGED_IN in {r['seconds']:6.2f} s "
              f"= {r['items'] / r['seconds']:6.0f} items/s; {r['cycles']} cycles; API calls per cycle: "
              f"median {r['calls_median']:.0f}, max {r['calls_max']} ({r['calls_total']} in all; "
              f"a per-item design: {2 * r['items']})")


if __name__ == "__main__":
    main()

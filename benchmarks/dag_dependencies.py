"""Job dependencies (``parent_ids``) at scale, each figure beside its peer without parents, same run.

A real uvicorn server per backend (SQLite in a temp dir; PostgreSQL in ``balsam_bench_dag``,
recreated, dropped at the end), one user, one site, one app; through the REST routes the Python API
uses (``POST /jobs/``, bulk ``PATCH /jobs/``):

- **fan-out**: the ``PATCH`` that finishes one parent of ``--jobs`` waiting children (it releases
  them all: READY / STAGED_IN with their events), beside the same ``PATCH`` of a parent without
  children; and the create of the children (chunks of 5,000) beside the create of as many jobs
  without parents;
- **fan-in**: the create of one child naming ``--jobs`` parents beside the create of one job
  without parents; then the parents finished in batches of ``--batch`` (each ``PATCH`` re-checks
  the child) beside as many jobs without a child, finished the same way;
- **chain**: ``--depth`` jobs created one by one, each the child of the one before (as a script
  builds a chain), beside as many single creates without parents; then walked through (each link
  moved to POSTPROCESSED and finished, which releases the next).

``--base DIR``: also run a second server from the code under ``DIR`` (``git archive HEAD core
plugins | tar -x -C DIR``), alternated with this tree's for the fan-in create (base, head, base,
head): the figures of a change to the create path beside those before it.

    python benchmarks/dag_dependencies.py [--jobs 10000] [--batch 100] [--depth 300] [--backends sqlite,postgresql]
                                          [--base /tmp/before] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from bench_server import drop_pg, open_user_site, prepare_pg, start_server

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/balsam_bench_dag"
CHUNK = 5000
TO_POSTPROCESSED = ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED")


class Bench:
    """One user's site and app on a running server, with the calls the scenarios time."""

    def __init__(self, url: str, name: str) -> None:
        self.api, _site, app, _user, _password = open_user_site(url, name)
        self.app_id = app["id"]
        self._n = 0

    def create(self, count: int, parents: "list[int] | None" = None, each: "Callable[[int], list[int]] | None" = None) -> list[int]:
        """``count`` jobs (chunks of 5,000), each with ``parents`` or ``each(i)`` as parents; their ids."""
        ids: list[int] = []
        specs = []
        for i in range(count):
            self._n += 1
            spec: dict[str, Any] = {"workdir": f"w/{self._n}", "app_id": self.app_id}
            listed = each(i) if each else parents
            if listed:
                spec["parent_ids"] = listed
            specs.append(spec)
        for start in range(0, len(specs), CHUNK):
            resp = self.api.post("/jobs/", json=specs[start:start + CHUNK])
            resp.raise_for_status()
            ids.extend(j["id"] for j in resp.json())
        return ids

    def to_postprocessed(self, ids: list[int]) -> None:
        per_call = CHUNK // len(TO_POSTPROCESSED)
        for start in range(0, len(ids), per_call):
            body = [{"id": i, "state": s} for i in ids[start:start + per_call] for s in TO_POSTPROCESSED]
            self.api.patch("/jobs/", json=body).raise_for_status()

    def finish(self, ids: list[int]) -> None:
        """POSTPROCESSED -> JOB_FINISHED (no stage-out), which releases the waiting children."""
        self.api.patch("/jobs/", json=[{"id": i, "state": "JOB_FINISHED"} for i in ids]).raise_for_status()

    def count(self, **params: Any) -> int:
        return self.api.get("/jobs/", params={**params, "limit": 0}).json()["count"]


def ms(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def run_backend(backend: str, url: str, args: argparse.Namespace, workdir: Path) -> list[tuple[str, str, str]]:
    if backend == "postgresql":
        prepare_pg(url)
    proc, base_url = start_server(workdir, url, home=workdir, create_tables=backend != "postgresql")
    rows: list[tuple[str, str, str]] = []
    try:
        b = Bench(base_url, "dag")
        n = args.jobs
        # fan-out
        [parent] = b.create(1)
        t_children = ms(lambda: b.create(n, parents=[parent]))
        t_flat = ms(lambda: b.create(n))
        [lone] = b.create(1)
        b.to_postprocessed([parent, lone])
        t_release = ms(lambda: b.finish([parent]))
        assert b.count(parent_id=parent, state="AWAITING_PARENTS") == 0
        t_lone = ms(lambda: b.finish([lone]))
        rows.append((f"fan-out: finish 1 parent of {n:,} children", f"{t_release:.0f} ms", f"{t_lone:.0f} ms (no children)"))
        rows.append((f"fan-out: create {n:,} children of 1 parent", f"{t_children:.0f} ms", f"{t_flat:.0f} ms (no parents)"))
        # fan-in
        parents = b.create(n)
        peers = b.create(n)
        t_child = statistics.median(ms(lambda: b.create(1, parents=parents)) for _ in range(args.repeat))
        t_one = statistics.median(ms(lambda: b.create(1)) for _ in range(args.repeat))
        rows.append((f"fan-in: create 1 child of {n:,} parents (median of {args.repeat})", f"{t_child:.0f} ms",
                     f"{t_one:.0f} ms (no parents)"))
        b.to_postprocessed(parents)
        b.to_postprocessed(peers)
        t_parents = t_peers = 0.0
        for start in range(0, n, args.batch):
            t_parents += ms(lambda: b.finish(parents[start:start + args.batch]))
            t_peers += ms(lambda: b.finish(peers[start:start + args.batch]))
        assert b.count(parent_id=parents[-1], state="AWAITING_PARENTS") == 0
        rows.append((f"fan-in: finish {n:,} parents, {args.batch} per PATCH", f"{t_parents:.0f} ms",
                     f"{t_peers:.0f} ms (no child)"))
        # chain
        chain: list[int] = []
        t_chain = ms(lambda: [chain.extend(b.create(1, parents=chain[-1:])) for _ in range(args.depth)])
        t_single = ms(lambda: [b.create(1) for _ in range(args.depth)])
        rows.append((f"chain: create depth {args.depth:,}, one by one", f"{t_chain / args.depth:.1f} ms/link",
                     f"{t_single / args.depth:.1f} ms/job (no parents)"))

        def walk() -> None:
            for link in chain:
                b.to_postprocessed([link])
                b.finish([link])

        t_walk = ms(walk)
        assert b.count(id=chain[-1], state="JOB_FINISHED") == 1
        rows.append((f"chain: walk depth {args.depth:,} (5 moves per link)", f"{t_walk / args.depth:.1f} ms/link", ""))
        b.api.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if backend == "postgresql":
            drop_pg(url)
    return rows


def fan_in_create_base_vs_head(backend: str, url: str, args: argparse.Namespace, workdir: Path) -> list[tuple[str, str, str]]:
    """The create of one child of ``--jobs`` parents on a server of the code under ``--base`` and
    on one of this tree, alternated (base, head, base, head, ...), each on a fresh database."""
    head_path = os.environ.get("PYTHONPATH", "")
    base_dir = Path(args.base)
    base_path = ":".join([str(base_dir / "core"), *sorted(str(p) for p in (base_dir / "plugins").glob("*/"))])
    times: dict[str, list[float]] = {"base": [], "head": []}
    for round_ in range(args.repeat):
        for label, path in (("base", base_path), ("head", head_path)):
            run_dir = workdir / f"{backend}-{label}-{round_}"
            run_dir.mkdir()
            db_url = url if backend == "postgresql" else f"sqlite:///{run_dir / 'balsam.db'}"
            if backend == "postgresql":
                prepare_pg(db_url)
            os.environ["PYTHONPATH"] = path
            try:
                proc, base_url = start_server(run_dir, db_url, home=run_dir, create_tables=backend != "postgresql")
            finally:
                os.environ["PYTHONPATH"] = head_path
            try:
                b = Bench(base_url, "dag")
                parents = b.create(args.jobs)
                times[label].append(ms(lambda: b.create(1, parents=parents)))
                b.api.close()
            finally:
                proc.terminate()
                proc.wait(timeout=30)
                if backend == "postgresql":
                    drop_pg(db_url)
    return [(f"fan-in create, {args.jobs:,} parents: {label} (median of {args.repeat}; each: "
             + ", ".join(f"{t:.0f}" for t in samples) + ")", f"{statistics.median(samples):.0f} ms", "")
            for label, samples in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--depth", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default=os.environ.get("BALSAM_BENCH_PG_URL", PG_DEFAULT))
    parser.add_argument("--base", help="a copy of the code before a change (core/, plugins/) to compare the fan-in create with")
    parser.add_argument("--only-base-vs-head", action="store_true", help="with --base: only that comparison")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dag-deps-"))
    try:
        for backend in args.backends.split(","):
            url = args.pg_url if backend == "postgresql" else f"sqlite:///{workdir / backend}.db"
            rows: list[tuple[str, str, str]] = []
            if not args.only_base_vs_head:
                rows += run_backend(backend, url, args, workdir)
            if args.base:
                rows += fan_in_create_base_vs_head(backend, url, args, workdir)
            print(f"\n{backend}  (figure | peer, same run)")
            for label, figure, peer in rows:
                print(f"  {label:<62} {figure:>14}  {peer}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

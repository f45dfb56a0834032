"""A DeepHyper-style asynchronous search through the real stack, beside the same search in-process.

What a hyperparameter search asks of Balsam: one ``run()`` app (the objective), a few evaluations in
flight at a time (``--concurrency``, DeepHyper's workers), a new evaluation submitted as each result
comes back (not in rounds), thousands of short evaluations, results read through ``result_nowait()``
(numpy floats, dicts, None, and exceptions raised by run()), and at the end an early stop that
deletes the evaluations still queued. Run against a real server (the embedded one on SQLite, or on
PostgreSQL with ``--database-url``), a real site agent and a launcher (``--job-mode serial|mpi``)
submitted as a BatchJob to the ``local`` scheduler.

Two ways of finding the finished evaluations, as drivers write them (``--poll``):
``wait``: ``Job.objects.wait(pending, return_when="FIRST_COMPLETED")``;
``filter``: their own loop over ``Job.objects.filter(id=pending_ids, state=[JOB_FINISHED, FAILED],
last_update_after=...)``.

Prints one JSON object: evaluations done, lost and doubled (none expected), wrong results (none),
requests the driver sent (per evaluation) and the server answered (its access log), and the median
/ p90 time from submit to result beside the same function through ``concurrent.futures`` in-process
(the lower bound: no server, no launcher).

    python benchmarks/deephyper_style_search.py --evals 2000 --job-mode serial
    python benchmarks/deephyper_style_search.py --evals 1000 --database-url postgresql://... --poll filter
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

DONE = ["JOB_FINISHED", "FAILED"]


def objective(x: float, kind: str) -> Any:
    """The evaluation: the value of the point, in the form a user's run() returns it."""
    import numpy as np

    value = np.float64(-((x - 0.3) ** 2))
    if kind == "dict":
        return {"objective": value, "metadata": {"x": x, "epochs": np.int64(3)}}
    if kind == "none":
        return None
    if kind == "raise":
        raise ValueError(f"diverged at x={x}")
    return value


def kind_of(i: int) -> str:
    return ("float", "float", "dict", "none", "float", "raise", "float", "float")[i % 8]


def expected(i: int) -> Any:
    x = i / 1000.0
    kind = kind_of(i)
    if kind == "raise":
        return ("ValueError", f"diverged at x={x}")
    return objective(x, kind)


def same(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return (isinstance(got, dict) and got.keys() == want.keys() and all(same(got[k], want[k]) for k in want))
    if want is None:
        return got is None
    if isinstance(want, tuple):
        return got == want
    return type(got) is type(want) and (got == want or (math.isnan(got) and math.isnan(want)))


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median_s": float("nan"), "p90_s": float("nan")}
    values = sorted(values)
    return {"median_s": round(statistics.median(values), 4), "p90_s": round(values[int(0.9 * (len(values) - 1))], 4)}


def balsam(home: Path, *args: str, cwd: Path | None = None, timeout: float = 180) -> str:
    env = dict(os.environ, BALSAM_HOME=str(home), BALSAM_CLIENT_PATH=str(home / "client.yml"))
    proc = subprocess.run([str(Path(sys.executable).with_name("balsam")), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"balsam {' '.join(args)} failed ({proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return proc.stdout


def in_process_peer(evals: int, concurrency: int) -> dict[str, Any]:
    """The same search through a process pool: the lower bound of submit -> result."""
    latencies = []
    started = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(concurrency) as pool:
        submitted = 0
        pending: dict[concurrent.futures.Future, float] = {}

        def submit() -> None:
            nonlocal submitted
            pending[pool.submit(objective, submitted / 1000.0, kind_of(submitted))] = time.monotonic()
            submitted += 1

        for _ in range(min(concurrency, evals)):
            submit()
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in done:
                latencies.append(time.monotonic() - pending.pop(fut))
                fut.exception()
                if submitted < evals:
                    submit()
    return {"wall_s": round(time.monotonic() - started, 2), **quantiles(latencies)}


def count_requests(log: Path, offset: int) -> collections.Counter:
    """Requests in the server's access log from ``offset`` on, by method and route (ids folded)."""
    counts: collections.Counter = collections.Counter()
    if not log.exists():
        return counts
    with log.open("rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            m = re.search(r'"(GET|POST|PUT|PATCH|DELETE) (/[^ ?"]*)', line)
            if m:
                counts[f"{m.group(1)} {re.sub(r'/[0-9]+', '/ID', m.group(2))}"] += 1
    return counts


def search(args: argparse.Namespace, site_name: str, search_id: str) -> dict[str, Any]:
    from balsam.api import ApplicationDefinition, Job

    class Objective(ApplicationDefinition):
        site = site_name

        def run(self, x: float, kind: str) -> Any:
            # objective()'s body again: the launcher loads this class from its source, without
            # this script's module-level names.
            import numpy as np

            value = np.float64(-((x - 0.3) ** 2))
            if kind == "dict":
                return {"objective": value, "metadata": {"x": x, "epochs": np.int64(3)}}
            if kind == "none":
                return None
            if kind == "raise":
                raise ValueError(f"diverged at x={x}")
            return value

    Objective.sync()
    client = Job._get_client()
    counts_before = collections.Counter(client.request_counts)
    evals, concurrency = args.evals, args.concurrency
    submitted_at: dict[int, float] = {}  # job id -> monotonic submit time
    index_of: dict[int, int] = {}
    results: dict[int, Any] = {}
    latencies: list[float] = []
    wrong: list[str] = []
    doubled = 0
    pending: list[Any] = []
    next_index = 0
    stop_at = evals - args.left_queued  # the "early stop": the last ones are deleted, not awaited

    def submit(count: int) -> None:
        nonlocal next_index
        batch = []
        for _ in range(count):
            i = next_index
            next_index += 1
            batch.append(Objective.submit(workdir=f"search-{search_id}/{i}", x=i / 1000.0, kind=kind_of(i),
                                          node_packing_count=concurrency,  # DeepHyper's evals per node
                                          tags={"search": search_id, "i": str(i)}, save=False))
        now = time.monotonic()
        created = Job.objects.bulk_create(batch)
        for job in created:
            submitted_at[job.id] = now
            index_of[job.id] = int(job.tags["i"])
        pending.extend(created)

    def collect(job: Any) -> None:
        nonlocal doubled
        if job.id in results:
            doubled += 1
            return
        latencies.append(time.monotonic() - submitted_at[job.id])
        try:
            got: Any = job.result_nowait()
        except Exception as exc:  # what DeepHyper records as a failed evaluation
            got = (type(exc).__name__, str(exc))
        results[job.id] = got
        i = index_of[job.id]
        if not same(got, expected(i)):
            wrong.append(f"eval {i}: {got!r} != {expected(i)!r}")

    started = time.monotonic()
    submit(min(concurrency, evals))
    since = None
    deadline = started + args.timeout
    polls = 0
    while len(results) < stop_at and time.monotonic() < deadline:
        polls += 1
        if args.poll == "wait":
            done = Job.objects.wait(pending, timeout=args.timeout, poll_interval=args.poll_interval,
                                    return_when="FIRST_COMPLETED").done
        else:
            polled_at = time.monotonic()
            query = Job.objects.filter(id=[j.id for j in pending], state=DONE)
            if since is not None:
                query = query.filter(last_update_after=since)
            done = list(query)
            if done:
                since = max(j.last_update for j in done)
            elif time.monotonic() - polled_at < args.poll_interval:
                time.sleep(args.poll_interval)
        done_ids = {j.id for j in done}
        for job in done:
            collect(job)
        pending[:] = [j for j in pending if j.id not in done_ids]
        room = min(concurrency - len(pending), evals - next_index)
        if room > 0:
            submit(room)
    search_s = time.monotonic() - started

    # Early stop: the evaluations still queued are deleted in one request (the server keeps those
    # RUNNING in a launcher and says so on stderr); they are not awaited. How many are still
    # pending here is the launcher's timing: the loop stops once ``stop_at`` results are in, and
    # records every result of its last poll (as DeepHyper's search counts every result of its last
    # gather: a result that came back is never thrown away), so it may hold more than ``stop_at``
    # and fewer than ``left_queued`` evaluations may be pending (none, where the last poll had them
    # all). The budget is on submissions (``evals``, DeepHyper's max_evals, libEnsemble's sim_max).
    pending_ids = [j.id for j in pending]
    outstanding = Job.objects.filter(tags={"search": search_id}, state__ne="JOB_FINISHED").filter(
        id=pending_ids) if pending else None
    deleted = outstanding.delete() if outstanding is not None else 0
    by_route = dict(collections.Counter(client.request_counts) - counts_before)
    sent = sum(by_route.values())
    # What the stop left of the pending evaluations, read at once: each must be one the server said
    # was RUNNING in a launcher, or one finished before the stop (left out by the filter).
    skipped = outstanding.skipped_running if outstanding is not None else None
    skipped_running = set(skipped[1]) if skipped else set()
    kept = [{"id": j.id, "state": str(getattr(j.state, "value", j.state)), "skipped_running": j.id in skipped_running}
            for j in Job.objects.filter(id=pending_ids)] if pending_ids else []

    # Audit: every evaluation ran at most once (RUNNING events per job) and none is lost.
    from balsam.api import EventLog

    events = sorted(EventLog.objects.filter(tags={"search": search_id}), key=lambda e: (e.job_id, e.timestamp))
    runs = collections.Counter(e.job_id for e in events if str(getattr(e.to_state, "value", e.to_state)) == "RUNNING")
    # Where an evaluation's time goes: the median time each state transition waits for the previous.
    steps: dict[str, list[float]] = collections.defaultdict(list)
    for prev, event in zip(events, events[1:]):
        if prev.job_id == event.job_id:
            name = f"{getattr(event.from_state, 'value', event.from_state)}->{getattr(event.to_state, 'value', event.to_state)}"
            steps[name].append((event.timestamp - prev.timestamp).total_seconds())
    ran_twice = sorted(job_id for job_id, n in runs.items() if n > 1)
    left = Job.objects.filter(tags={"search": search_id}).count()
    return {
        "evaluations_done": len(results), "submitted": next_index, "pending_at_stop": len(pending_ids),
        "deleted_at_stop": deleted, "kept_at_stop": kept,
        "left_in_db": left, "doubled": doubled, "ran_twice": ran_twice[:10], "wrong": wrong[:10],
        "wrong_count": len(wrong), "search_wall_s": round(search_s, 2), "driver_requests": sent,
        "driver_requests_per_eval": round(sent / max(1, len(results)), 2), "driver_requests_by_route": by_route,
        "polls": polls,
        **quantiles(latencies),
        "transition_median_s": {k: round(statistics.median(v), 3) for k, v in steps.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evals", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--left-queued", type=int, default=4, help="evaluations deleted by the early stop")
    parser.add_argument("--job-mode", choices=["serial", "mpi"], default="serial")
    parser.add_argument("--poll", choices=["wait", "filter"], default="wait")
    parser.add_argument("--poll-interval", type=float, default=0.2)
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (default: the embedded server's SQLite)")
    parser.add_argument("--workdir", default="", help="scratch directory (default: a new temporary one)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--sync-period", type=int, default=None,
                        help="the site's scheduler.sync_period (default: what site init writes, 10 s); the "
                             "test suite gives 1 so the launcher's start and the site's stop wait less")
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dh-search-"))
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(BALSAM_HOME=str(home), BALSAM_CLIENT_PATH=str(home / "client.yml"))
    if args.database_url:
        os.environ["BALSAM_DATABASE_URL"] = args.database_url
        balsam(home, "server", "migrate")
    site_name = f"dh-{uuid.uuid4().hex[:6]}"
    site_path = work / site_name
    report: dict[str, Any] = {"evals": args.evals, "concurrency": args.concurrency, "job_mode": args.job_mode,
                              "poll": args.poll, "database": "postgresql" if args.database_url else "sqlite"}
    balsam(home, "server", "start", "--port", "0")
    try:
        balsam(home, "site", "init", str(site_path), "-n", site_name, "--platform", "default")
        if args.sync_period is not None:
            settings_path = site_path / "settings.yml"
            settings = yaml.safe_load(settings_path.read_text()) or {}
            settings["scheduler"] = {**(settings.get("scheduler") or {}), "sync_period": args.sync_period}
            settings_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        balsam(home, "site", "start", cwd=site_path)
        try:
            from balsam.api import BatchJob, Site

            site = Site.objects.get(name=site_name)
            bj = BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=30, job_mode=args.job_mode,
                                         queue="local", project="local")
            log = home / "server" / "server.log"
            offset = log.stat().st_size if log.exists() else 0
            report["balsam"] = search(args, site_name, uuid.uuid4().hex[:8])
            counts = count_requests(log, offset)
            report["balsam"]["server_requests"] = sum(counts.values())
            report["balsam"]["server_requests_top"] = dict(counts.most_common(8))
            BatchJob.objects.filter(id=[bj.id]).update(state="pending_deletion")
        finally:
            balsam(home, "site", "stop", cwd=site_path, timeout=300)
    finally:
        balsam(home, "server", "stop")
    if not args.no_peer:
        report["in_process_peer"] = in_process_peer(args.evals, args.concurrency)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

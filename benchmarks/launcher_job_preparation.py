"""The launcher's own CPU per job before a task is spawned, beside what 60 % of the fork/exec limit leaves.

For N acquired jobs (API ``Job`` records as an acquire returns them, one command-template app),
the work a serial launcher does in its own process for each: ``JobPreparer.prepare`` (the app's
command line and environment, the workdir check, ``job.out``), a placement, ``launch_environment``
(GPU visibility and the plugins' ``balsam_launch_environment`` hook, as installed here) and the
spawn request sent to the spawner process (argv, paths, the environment as a difference). Printed
per environment size (the launcher's environment plus ``--extra-env`` variables of 40 characters:
a login environment with modules loaded holds hundreds), in microseconds of CPU per job, the
median of 5 passes:

- beside the **fork/exec limit** measured in the same run (4 threads spawning and reaping
  ``/bin/true``, as ``launcher_throughput.py`` measures it) and the CPU per job that 60 % of it
  leaves on this machine for everything (the task, the launcher, its spawner, the server); the
  preparation's share of that budget is printed.

No server and no spawn: the jobs are built from records in memory, and the workdirs exist (the
first pass creates ``job.out``, as a launcher did before the processing module's preprocess made
it ahead; the others open it, as a launcher does now: the median is of those).

    .venv/bin/python benchmarks/launcher_job_preparation.py [--jobs 5000] [--extra-env 0,200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from launcher_throughput import spawn_rate

PASSES = 5


def job_record(job_id: int, app_id: int) -> dict:
    """One job as ``POST /sessions/{id}`` returns it."""
    return {"id": job_id, "app_id": app_id, "workdir": f"w/{job_id}", "tags": {"bench": "prep"},
            "serialized_parameters": "", "data": {}, "return_code": None, "num_nodes": 1, "ranks_per_node": 1,
            "threads_per_rank": 1, "threads_per_core": 1, "launch_params": {}, "gpus_per_rank": 0.0,
            "node_packing_count": 64, "wall_time_min": 0, "batch_job_id": None, "state": "PREPROCESSED",
            "last_update": "2026-12-02T00:00:00Z", "pending_file_cleanup": True, "parent_ids": [], "transfers": {}}


def measure(data_path: Path, count: int) -> list[float]:
    """CPU microseconds per job of each pass (prepare, place, launch environment, spawn request)."""
    from balsam.api import ApplicationDefinition, Job
    from balsam.launcher.app_run import JobPreparer, shell_line
    from balsam.launcher.node_manager import NodeManager
    from balsam.launcher.runner import SpawnerPool, _launch_hook, launch_environment
    from balsam.platform import NodeInfo

    class Noop(ApplicationDefinition):
        site = 1
        command_template = "true"

    preparer = JobPreparer(data_path, load_app=lambda _app_id: Noop)
    hook = _launch_hook()
    nodes = NodeManager([NodeInfo(node_id=0, hostname="localhost", cpu_ids=list(range(64)), gpu_ids=[])],
                        allow_node_packing=True)
    records = [job_record(i + 1, 1) for i in range(count)]
    for record in records:
        (data_path / record["workdir"]).mkdir(parents=True, exist_ok=True)
    pool = SpawnerPool(10, threading.Event())
    try:
        passes = []
        for _ in range(PASSES):
            jobs = [Job._from_api(dict(r)) for r in records]
            start = time.process_time()
            for job in jobs:
                prepared = preparer.prepare(job)
                placement = nodes.assign(prepared.id, prepared.demand)
                env = launch_environment(prepared, placement, None, hook)
                pool._request(prepared.id, shell_line(prepared.cmdline, prepared.preamble, prepared.workdir),
                              prepared.workdir, env)
                nodes.free(prepared.id)
            passes.append(1e6 * (time.process_time() - start) / count)
        return passes
    finally:
        pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--limit-sec", type=float, default=3.0, help="how long each reading of the fork/exec limit lasts")
    parser.add_argument("--extra-env", default="0,200", help="numbers of variables to add, one measurement each (default 0,200)")
    args = parser.parse_args()
    os.environ.setdefault("BALSAM_SITE_PATH", tempfile.gettempdir())
    from balsam.plugins.manager import get_plugin_manager

    implementations = len(get_plugin_manager().hook.balsam_launch_environment.get_hookimpls())
    ncpu = len(os.sched_getaffinity(0))
    root = Path(tempfile.mkdtemp(prefix="balsam-prep-bench-"))
    try:
        limits = [spawn_rate(["/bin/true"], 4, seconds=args.limit_sec)[0]]
        rows = []
        base = dict(os.environ)
        for extra in (int(x) for x in args.extra_env.split(",")):
            os.environ.clear()
            os.environ.update(base)
            os.environ.update({f"BALSAM_BENCH_EXTRA_{i:04d}": "x" * 40 for i in range(extra)})
            passes = measure(root / f"env{extra}", args.jobs)
            rows.append((len(os.environ), passes))
        os.environ.clear()
        os.environ.update(base)
        limits.append(spawn_rate(["/bin/true"], 4, seconds=args.limit_sec)[0])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    limit = max(limits)
    budget_us = 1e6 * ncpu / (0.6 * limit)
    print(f"launcher CPU per job before the spawn ({ncpu} CPUs, {args.jobs} jobs, median of {PASSES} passes; "
          f"prepare, place, launch environment with {implementations} balsam_launch_environment "
          "implementation(s), spawn request)")
    print(f"  fork/exec limit (4 threads, /bin/true): {limits[0]:,.0f}/s before, {limits[1]:,.0f}/s after; "
          f"60 % of the higher leaves {budget_us:,.0f} us of CPU per job for all of it on {ncpu} CPUs")
    for size, passes in rows:
        median = statistics.median(passes)
        print(f"  {size:4d} environment variables: {median:6.1f} us per job = {100 * median / budget_us:.1f} % of that "
              f"budget (passes: {', '.join(f'{p:.0f}' for p in passes)}; the first creates job.out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

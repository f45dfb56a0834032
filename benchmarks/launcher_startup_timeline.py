"""Where a launcher's start-up time goes: a timeline from the launcher's spawn to its first RUNNING.

The same set-up as ``launcher_throughput.py`` (real uvicorn + SQLite server, a site, a no-op app,
a BatchJob created just before the launcher, whose id the launcher finds in its environment), but
the launcher runs under a small tracer: ``python <tracer> -j MODE ...`` where the tracer records
the time of its first line, when some heavy modules finish importing, and the start and end of
the launcher's start-up steps (found by wrapping those functions as their modules are imported,
so the import order is that of ``python -m balsam.launcher``), then runs ``balsam.launcher`` as
``__main__``. The first job's RUNNING is the server's event timestamp (the task's real start).

Every time is in seconds from just before the BatchJob is created (what ``launcher_throughput``
counts from). Several rounds per mode; the median per event is printed, with the thread it ran on.

    .venv/bin/python benchmarks/launcher_startup_timeline.py [--rounds 5] [--serial-jobs 500] [--mpi-jobs 100]
        [--importtime]   # also print the launcher's slowest imports (python -X importtime), one round
        [--end-to-end]   # through the real site agent and local scheduler, as launcher_throughput's
                         # --end-to-end: times from the batch script's process start

End to end on the 2-CPU VM shared with other work (5 December 2026, 23:1x UTC, 3 rounds, mpi): first
RUNNING 0.398 s after the batch script started, the launcher's CPU 0.198 s by then; its imports up to
``run_launcher`` 0.165 s of wall for 0.083 s of CPU (the rest waiting for a CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "launcher"))

from launcher_harness import LocalDeployment, start_launcher  # noqa: E402
from launcher_throughput import bench_site, compile_bytecode, make_jobs  # noqa: E402

# The tracer: written next to the site, run instead of ``-m balsam.launcher``.
TRACER = r'''
import time as _time
_T_UP = _time.time()
import importlib.abc, importlib.machinery, json, os, sys, threading, runpy, functools

_OUT = open(os.environ["BALSAM_TIMELINE_OUT"], "a")
_LOCK = threading.Lock()

def _note(what, when=None):
    with _LOCK:
        _OUT.write(json.dumps([what, when or _time.time(), threading.current_thread().name, _time.process_time()]) + "\n")
        _OUT.flush()

_note("interpreter up (first line of the tracer)", _T_UP)

def _once(label):
    state = {"done": False}
    def mark(suffix=""):
        if not state["done"]:
            state["done"] = True
            _note(label + suffix)
    return mark

def _wrap(owner, name, label, first_only=True):
    fn = getattr(owner, name)
    seen = {"n": 0}
    @functools.wraps(fn)
    def wrapper(*a, **k):
        seen["n"] += 1
        record = seen["n"] == 1 or not first_only
        if record:
            _note(label + " start")
        try:
            return fn(*a, **k)
        finally:
            if record:
                _note(label + " end")
    setattr(owner, name, wrapper)

def _patch_entry(m):
    _wrap(m, "run_launcher", "run_launcher")
    _wrap(m, "_find_site", "find site")
    _wrap(m, "_load_settings", "read settings")
    _wrap(m, "_start_early_lease", "start early lease")
    _wrap(m, "_job_mode_class", "job mode class")
    _wrap(m, "configure_logging", "configure logging")
    orig = m._platform
    def _platform(settings):
        _note("platform start")
        p = orig(settings)
        _note("platform end")
        _wrap(p, "discover_nodes", "discover nodes")
        return p
    m._platform = _platform

def _patch_lease(m):
    _wrap(m.JobLease, "__init__", "session create")
    _wrap(m.JobLease, "acquire", "first acquire")

def _patch_app_run(m):
    _wrap(m.JobPreparer, "_load_app", "app load (first)")
    _wrap(m.JobPreparer, "prepare", "first prepare")

def _patch_runner(m):
    _wrap(m.SpawnerPool, "__init__", "spawner pool")
    _wrap(m.SpawnerPool, "start", "first spawn request")
    _wrap(m.ProcessPool, "start", "first in-process spawn")
    _wrap(m, "send_first_running", "first RUNNING sent")

def _patch_job_mode(m):
    _wrap(m.JobMode, "lease", "mode.lease()")

def _patch_modes(cls_name):
    def patch(m):
        _wrap(getattr(m, cls_name), "run", cls_name + ".run")
    return patch

_PATCH = {
    "balsam.launcher.entry": _patch_entry,
    "balsam.client.lease": _patch_lease,
    "balsam.launcher.app_run": _patch_app_run,
    "balsam.launcher.runner": _patch_runner,
    "balsam.launcher.job_mode": _patch_job_mode,
    "balsam.launcher.modes.mpi": _patch_modes("MPIMode"),
    "balsam.launcher.modes.serial": _patch_modes("SerialMode"),
}
_WATCH = ("click", "yaml", "attrs", "cattrs", "httpx", "httpcore", "dill", "balsam.client", "balsam.config",
          "balsam.models", "balsam.serialization", "balsam._api.model", "balsam.api", "balsam.cli.launcher",
          "balsam.launcher.entry", "balsam.plugins.manager", "mpi4py", "psutil")

class _PostImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in _PATCH and name not in _WATCH:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = loader.exec_module
        def exec_and_patch(module):
            exec_module(module)
            if name in _WATCH:
                _note("imported " + name)
            if name in _PATCH:
                _PATCH[name](module)
        loader.exec_module = exec_and_patch
        return spec

sys.meta_path.insert(0, _PostImport())
sys.argv[0] = "python -m balsam.launcher"
runpy.run_module("balsam.launcher", run_name="__main__", alter_sys=True)
'''


def _ts(value: dt.datetime) -> float:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def one_round(site: Path, mode: str, tag: str, tracer: Path, out: Path, importtime: bool) -> tuple[list, float, str]:
    from balsam.api import BatchJob, EventLog, Site

    out.unlink(missing_ok=True)
    site_id = Site.objects.get(path=str(site)).id
    t0 = time.time()
    batch_job = BatchJob.objects.create(site_id=site_id, project="local", queue="local", num_nodes=1,
                                        wall_time_min=30, job_mode=mode)
    t_created = time.time()
    env = {"BALSAM_BATCH_JOB_ID": str(batch_job.id), "BALSAM_TIMELINE_OUT": str(out)}
    launcher = start_launcher_traced(site, mode, tracer, tag, env, importtime)
    t_spawned = time.time()
    deadline = time.time() + 60
    first = float("nan")
    while time.time() < deadline:
        running = list(EventLog.objects.filter(tags={"bench": tag}, to_state="RUNNING"))
        if running:  # each round has its own jobs (tag), so these are this launcher's
            first = min(_ts(e.timestamp) for e in running)
            break
        time.sleep(0.1)
    time.sleep(0.3)
    launcher.terminate()
    launcher.wait(60)
    nan = float("nan")
    events = [("BatchJob created", t_created, "bench", nan), ("launcher Popen returned", t_spawned, "bench", nan)]
    for line in out.read_text().splitlines():
        what, when, thread, cpu = json.loads(line)
        events.append((what, when, thread, cpu))
    events.append(("first RUNNING (event timestamp)", first, "server", nan))
    return [(w, t - t0, th, cpu) for w, t, th, cpu in events], first - t0, getattr(launcher, "console_path", "")


def one_round_end_to_end(root: Path, mode: str, count: int, round_index: int, tracer: Path) -> tuple[list, float]:
    """One round through the real site agent (``launcher_throughput.py --end-to-end``'s set-up: a
    site made by ``init_site``, the agent with the local scheduler, a BatchJob created through the
    API), its job template's launcher line replaced by the tracer. Times are from the batch
    script's process start (the launcher execs from it), as ``launcher_throughput`` counts them."""
    import threading

    from launcher_throughput import _launcher_start, noop_app

    from balsam.api import BatchJob, EventLog, Job
    from balsam.client import load_client
    from balsam.site.site_ops import init_site, start_agent, stop_agent

    client = load_client()
    name = f"e2e-{mode}-{round_index}"
    site_path = root / name
    site_id = init_site(site_path, name, "default", client, settings_overrides={
        "scheduler": {"sync_period": 1}, "launcher": {"idle_ttl_sec": 2, "delay_sec": 1},
        "processing": {"num_workers": 1}})
    out = root / f"timeline-{name}.jsonl"
    template = site_path / "job-template.sh"
    text = template.read_text()
    if "exec {{ launcher_cmd }}" not in text:
        raise SystemExit(f"{template}: no 'exec {{{{ launcher_cmd }}}}' line to trace")
    template.write_text(text.replace("exec {{ launcher_cmd }}",
                                     f"export BALSAM_TIMELINE_OUT={out}\nexec {sys.executable} {tracer}"))
    tag = f"e2e-{mode}-{round_index}"
    make_jobs(noop_app(name, "true"), count, tag, site_path / "data", node_packing_count=len(os.sched_getaffinity(0)))
    start_agent(site_path)
    seen: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_launcher_start, args=(site_path / "log", mode, seen, stop), daemon=True)
    watcher.start()
    try:
        batch_job = BatchJob.objects.create(site_id=site_id, project="local", queue="local", num_nodes=1,
                                            wall_time_min=10, job_mode=mode, filter_tags={"bench": tag})
        deadline = time.time() + 120
        first = float("nan")
        while time.time() < deadline:
            running = list(EventLog.objects.filter(tags={"bench": tag}, to_state="RUNNING"))
            if running and "start" in seen:
                first = min(_ts(e.timestamp) for e in running)
                break
            time.sleep(0.1)
        while time.time() < deadline and Job.objects.filter(tags={"bench": tag}, state={"JOB_FINISHED", "FAILED"}).count() < count:
            time.sleep(0.25)
        client.put(f"/batch-jobs/{batch_job.id}", json={"state": "pending_deletion"})
    finally:
        stop.set()
        stop_agent(site_path, timeout=30, force=True)
    start = seen.get("start", float("nan"))
    nan = float("nan")
    events = [("batch script process start", start, "bench", nan)]
    for line in out.read_text().splitlines() if out.exists() else []:
        what, when, thread, cpu = json.loads(line)
        events.append((what, when, thread, cpu))
    events.append(("first RUNNING (event timestamp)", first, "server", nan))
    return [(w, t - start, th, cpu) for w, t, th, cpu in events], first - start


def start_launcher_traced(site: Path, mode: str, tracer: Path, tag: str, env: dict, importtime: bool):
    import subprocess

    from launcher_harness import PYTHON, VENV_BIN

    full_env = dict(os.environ)
    full_env.update(env)
    full_env["BALSAM_SITE_PATH"] = str(site)
    full_env["BALSAM_LAUNCHER_TICK_SEC"] = "10"
    full_env["PATH"] = VENV_BIN + os.pathsep + full_env.get("PATH", "")
    console = site / "log" / f"timeline-{time.time_ns()}.console"
    console.parent.mkdir(parents=True, exist_ok=True)
    argv = [PYTHON] + (["-X", "importtime"] if importtime else []) + [str(tracer), "-j", mode, "-t", "30",
                                                                       "--tag", f"bench={tag}"]
    with open(console, "wb") as fh:
        proc = subprocess.Popen(argv, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    proc.console_path = str(console)  # type: ignore[attr-defined]
    return proc


def slowest_imports(console: str, top: int = 30) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """Self times (us) from ``-X importtime``: the largest modules, and the sums per top-level
    package. (Cumulative times are wrong when two threads import at once; self times are not.)"""
    rows = []
    for line in Path(console).read_text().splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            head, _cum, name = line.split("|")
            rows.append((max(0, int(head.split(":")[1])), name.strip()))
    packages: dict[str, int] = {}
    for self_us, name in rows:
        key = name if name.startswith("balsam") else name.split(".")[0]
        key = ".".join(key.split(".")[:2]) if key.startswith("balsam") else key
        packages[key] = packages.get(key, 0) + self_us
    return sorted(rows, reverse=True)[:top], sorted(((v, k) for k, v in packages.items()), reverse=True)[:top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serial-jobs", type=int, default=500)
    parser.add_argument("--mpi-jobs", type=int, default=100)
    parser.add_argument("--importtime", action="store_true")
    parser.add_argument("--modes", default="serial,mpi")
    parser.add_argument("--end-to-end", action="store_true",
                        help="through the real site agent and local scheduler (times from the batch script's start)")
    args = parser.parse_args()

    compiled = compile_bytecode()  # as installed: a launcher is not timed compiling its sources
    print(f"balsam's bytecode compiled ahead, as installed ({compiled} files compiled now)")
    root = Path(tempfile.mkdtemp(prefix="balsam-launcher-timeline-"))
    dep = LocalDeployment(root / "deploy")
    try:
        dep.activate()
        site, Noop = bench_site(dep, "true", postprocess_in_launcher=True)
        tracer = root / "tracer.py"
        tracer.write_text(TRACER)
        ncpu = len(os.sched_getaffinity(0))
        print(f"launcher start-up timeline ({ncpu} CPUs, load average {os.getloadavg()[0]:.1f}); "
              f"wall: seconds from {'the batch script process start (end to end)' if args.end_to_end else 'just before BatchJob create'}; launcher CPU: the process's CPU seconds (all threads) so far; median of {args.rounds} rounds")
        for mode in args.modes.split(","):
            count = args.serial_jobs if mode == "serial" else args.mpi_jobs
            per_event: dict[tuple[str, str], list[tuple[float, float]]] = {}
            firsts = []
            console = ""
            for i in range(args.rounds + (1 if args.importtime and not args.end_to_end else 0)):
                if args.end_to_end:
                    events, first = one_round_end_to_end(root, mode, count, i, tracer)
                    firsts.append(first)
                    for what, t, thread, cpu in events:
                        per_event.setdefault((what, thread), []).append((t, cpu))
                    continue
                tag = f"{mode}-{i}"
                make_jobs(Noop, count, tag, site / "data", node_packing_count=ncpu)
                extra = i == args.rounds  # the -X importtime round: slower, not in the medians
                events, first, console = one_round(site, mode, tag, tracer, root / f"timeline-{mode}.jsonl", extra)
                if extra:
                    break
                firsts.append(first)
                for what, t, thread, cpu in events:
                    per_event.setdefault((what, thread), []).append((t, cpu))
            print(f"\n{mode}: first RUNNING median {statistics.median(firsts):.3f} s "
                  f"(rounds: {', '.join(f'{f:.3f}' for f in firsts)})")
            rows = sorted(((statistics.median(t for t, _ in v), statistics.median(c for _, c in v), k)
                           for k, v in per_event.items()), key=lambda r: r[0])
            print("     wall  launcher CPU  event [thread]")
            for t, cpu, (what, thread) in rows:
                print(f"  {t:7.3f}  {cpu:12.3f}  {what:48s} [{thread}]")
            if args.importtime and console:
                modules, packages = slowest_imports(console)
                total = sum(v for v, _ in slowest_imports(console, top=10**6)[1])
                print(f"  imports, an extra round under -X importtime: {total / 1000:.0f} ms of self time in all; "
                      "the largest packages and modules (ms):")
                for (p_us, package), (m_us, module) in zip(packages, modules):
                    print(f"    {p_us / 1000:6.1f}  {package:32s} {m_us / 1000:6.1f}  {module}")
        return 0
    finally:
        dep.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

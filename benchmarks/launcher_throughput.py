"""Launcher throughput on this machine, through a real server, real launchers and real mpiexec.

serial mode, one node: N no-op jobs (``true``); prints jobs/s from launcher start to the last job
end, and the time from launcher start to the first RUNNING. mpi mode: M single-rank no-op jobs, each
started with the platform's mpiexec; prints jobs/s.

Limits measured in the same run, just before and just after each mode's launcher (so a busy machine
shows as one; the ratios are to the higher of the two readings):

- the **fork/exec limit**: a pool of 4 threads spawning and reaping ``/bin/true`` (what serial mode
  does per job, with nothing else); serial mode's rate is printed as a fraction of it (target 60 %);
- the **bare mpiexec rate**: ``mpiexec -n 1 true`` started the same way, as many at a time as mpi
  mode runs (one per CPU, the jobs' node packing); mpi mode's rate as a fraction of it (target 60 %).

Also printed per mode: CPU per job by process (the launcher, its spawners, the tasks, the server,
the processing module with this script) beside the CPU each of the limit's own processes took, and
the CPU per job that 60 % of the limit leaves on this node for all of it: the tasks are the limit's
work, the rest is balsam's, so a run shows whether the target is in reach on this node at all.
The launcher's CPU by thread comes from the last line of its own log (it reads its threads' CPU
from ``/proc`` as it stops).
And the file system's cost just before each run (the CPU of one ``mkdir`` and of one new file):
the jobs' workdirs and their empty ``job.out`` are made ahead, as the processing module's
preprocess makes them (the launcher opens ``job.out``, and creates it only if it is missing);
``--workdirs-only`` makes the workdirs alone, as the preprocess did before 2 December 2026, so that
the launcher creates each ``job.out``: run both ways to compare.

What "end" means is printed with the figures: JOB_FINISHED when the site agent's processing module
is importable (it runs alongside the launcher) or when the launcher gives the default postprocess
itself (``launcher.default_postprocess_in_launcher``, the default: RUN_DONE and POSTPROCESSED in one
update), otherwise RUN_DONE. ``--postprocess module`` turns the launcher's part off, so that the
processing module takes every RUN_DONE to POSTPROCESSED, as in Balsam 0.7: run both ways to compare.

``--end-to-end`` runs the same jobs through the real site agent instead: a site made by
``init_site`` (default platform, ``local`` scheduler), the agent daemon started as ``balsam site
start`` does, and a BatchJob created through the API. The agent's scheduler module submits it to
the local queue, whose batch script starts the launcher from the job template; the agent's
processing module runs beside it (with ``--postprocess module`` it takes RUN_DONE jobs to
POSTPROCESSED). Printed: BatchJob created -> launcher process
start (the scheduler's own polling delay, ``scheduler.sync_period`` plus the submit command: reported
apart and excluded from the rates), launcher start -> first RUNNING, launcher start -> last
JOB_FINISHED, BatchJob created -> last JOB_FINISHED, and the CPU per job that the server and the
site agent took meanwhile.

Beside every first RUNNING: the **start-up bound**, the ratio the run would show if every job ran
at the limit's own rate from the first RUNNING on (``jobs / (first_running + jobs / limit) /
limit``). The rates count from the launcher's start, so over few or fast jobs the start-up alone
caps the ratio: 100 mpi jobs at a bare rate of 500/s take 0.2 s, and a start-up of 0.17 s then
caps them at 54 %.

``--extra-env N`` adds N variables to the environment first (everything started inherits them, the
limit's processes too): every job's environment is built from the launcher's, so the cost of a large
environment shows.

    .venv/bin/python benchmarks/launcher_throughput.py [--serial-jobs 5000] [--mpi-jobs 200] [--end-to-end] [--extra-env N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "launcher"))

from launcher_harness import LocalDeployment, start_launcher  # noqa: E402

from balsam.util import create_job_output  # noqa: E402


def _ts(value: dt.datetime) -> float:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def make_jobs(app, count: int, tag: str, data_path: Path, *, job_out_ahead: bool = True, **resources) -> list[int]:
    from balsam.api import Job

    jobs = [app.submit(workdir=f"{tag}/{i}", tags={"bench": tag}, save=False, **resources) for i in range(count)]
    created = []
    for start in range(0, len(jobs), 5000):
        created.extend(Job.objects.bulk_create(jobs[start : start + 5000]))
    # What the processing module's default preprocess() does, in bulk: the workdirs with an empty
    # job.out, then the state (``job_out_ahead=False``: the workdirs alone, as it did before
    # 2 December 2026, so that the launcher creates each job.out).
    for job in jobs:
        if job_out_ahead:
            create_job_output(data_path / job.workdir)
        else:
            (data_path / job.workdir).mkdir(parents=True, exist_ok=True)
    Job.objects.filter(tags={"bench": tag}).update(state="PREPROCESSED")
    return [j.id for j in created]


def file_create_cost(directory: Path, count: int = 1000) -> tuple[float, float]:
    """CPU seconds (this thread's, i.e. the kernel's work for it) per ``mkdir`` and per creation of
    an empty file, ``count`` of each in ``directory`` (kept until the run's temp dir is removed).

    Printed beside each run because this VM's ext4 varies tenfold: it runs without a journal, and
    then the inode allocator skips every inode freed in the last 60 s (300 s while its inode table
    block is unwritten), reading each one's table block; for minutes after many files were deleted
    (a previous run's clean-up), a new inode costs 0.1-0.7 ms of CPU instead of ~0.03."""
    directory.mkdir(parents=True, exist_ok=True)
    began = time.thread_time()
    for i in range(count):
        os.mkdir(directory / str(i))
    made = time.thread_time()
    for i in range(count):
        os.close(os.open(directory / str(i) / "job.out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    return (made - began) / count, (time.thread_time() - made) / count


class Processing:
    """The site agent's processing module, if it exists, cycling in a thread (to reach JOB_FINISHED)."""

    def __init__(self, site_path: Path) -> None:
        self.module = None
        self.error = ""
        try:
            from balsam.config import SiteConfig
            from balsam.launcher.service_calls import default_client
            from balsam.site.modules.processing import ProcessingModule

            site_config = SiteConfig(site_path)
            section = site_config.settings.sections.get("processing")
            self.module = ProcessingModule(site_config, section, default_client())
        except Exception as exc:  # the agent module is another engineer's; report and measure RUN_DONE
            self.error = f"{type(exc).__name__}: {exc}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                delay = self.module.run_cycle()
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                delay = 1.0
            self.stop.wait(min(delay if delay is not None else 0.05, 0.05))

    def __enter__(self):
        if self.module is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.module is not None:
            self.thread.join(30)
            try:
                self.module.close()
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"


def _cpu(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _children_cpu(pid: int) -> float:
    """CPU seconds of the children ``pid`` has reaped so far (the site agent's: its scheduler
    commands, a Python process per status poll of the local scheduler)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.children_user + times.children_system


def launcher_cpu_split(pid: int) -> Optional[dict[str, float]]:
    """CPU seconds so far of a live launcher: its own process (all threads), its spawner processes
    (serial mode runs one per CPU, up to 4), and the tasks they have reaped (their whole process
    trees: an ``mpiexec`` reaps its own children). None if the launcher has no spawner (it fell
    back to starting tasks itself)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        own = proc.cpu_times()
        spawners = [c.cpu_times() for c in proc.children() if any("spawner" in part for part in c.cmdline())]
    except psutil.Error:
        return None
    if not spawners:
        return None
    return {"launcher": own.user + own.system, "spawner": sum(t.user + t.system for t in spawners),
            "tasks": sum(t.children_user + t.children_system for t in spawners)}


def launcher_start_up(log_dir: Path, mode: str) -> str:
    """The launcher's own account of its start-up, from its newest log of this mode: "0.392 s after
    this process started, with 0.198 s of CPU spent by this process, 51 % of that time (by thread:
    ...)" (logged at its first job start), or ''."""
    marker = "first job started "
    for path in sorted(log_dir.glob(f"{mode}_mode_*.log"), key=lambda p: p.stat().st_mtime, reverse=True):
        for line in path.read_text(errors="replace").splitlines():
            if marker in line:
                return line.split(marker, 1)[1].rstrip()
    return ""


def steady_state(runs: dict[int, float], exits: dict[int, float], slots: int, limit: float, limit_threads: int) -> str:
    """Where the time after the first start went: from the first RUNNING to the last exit, the share
    of it with every slot busy (``slots``: the jobs one node runs at a time) and a job's mean run
    (RUNNING -> RUN_DONE, both the task's own times) beside a process of the limit's
    (``limit_threads / limit``). Idle slots are the launcher's doing (nothing started when a slot
    freed); runs longer than the limit's are the node's (the tasks share the CPUs with the launcher,
    the server and whatever else runs)."""
    both = [job for job in runs if job in exits]
    if not both or not limit:
        return "steady state: no job seen both RUNNING and ended"
    events = sorted([(runs[j], 1) for j in both] + [(exits[j], -1) for j in both])
    first, last = events[0][0], events[-1][0]
    busy, running, prev = 0.0, 0, first
    for when, step in events:
        if running >= slots:
            busy += when - prev
        running += step
        prev = when
    span = last - first
    mean_run = sum(exits[j] - runs[j] for j in both) / len(both)
    return (f"steady state: first RUNNING -> last RUN_DONE {span:.2f} s, every one of the {slots} slots busy "
            f"{100 * busy / span if span > 0 else 0:.0f} % of it; a job's run (RUNNING -> RUN_DONE) {1e3 * mean_run:.1f} ms "
            f"on average, a process of the limit {1e3 * limit_threads / limit:.1f} ms ({limit_threads} at a time)")


def launcher_threads_cpu(log_dir: Path, mode: str) -> str:
    """The launcher's own account of its CPU by thread, from the last line of its newest log of
    this mode ("MainThread 0.67 s, prefetch 0.22 s, ..."), or ''."""
    marker = "by thread, until the stop: "
    for path in sorted(log_dir.glob(f"{mode}_mode_*.log"), key=lambda p: p.stat().st_mtime, reverse=True):
        for line in reversed(path.read_text(errors="replace").splitlines()):
            if marker in line:
                return line.split(marker, 1)[1].rstrip().removesuffix(")")
    return ""


def _rusage(who: int) -> float:
    import resource

    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _rusage_self() -> float:
    import resource

    return _rusage(resource.RUSAGE_SELF)


def _cpu_ticks() -> tuple[int, int]:
    """(all, idle) CPU time of the machine so far, in clock ticks (/proc/stat; (0, 0) elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields), fields[3] + fields[4]  # idle + iowait


def run_mode(site: Path, mode: str, tag: str, ids: list[int], processing: bool, timeout: float, server_pid: int,
             postprocess_in_launcher: bool) -> dict:
    import resource

    from balsam.api import EventLog, Job

    cpu0 = (_cpu(server_pid), _rusage(resource.RUSAGE_CHILDREN), _rusage(resource.RUSAGE_SELF))

    end_state = "RUN_DONE"
    with (Processing(site) if processing else _Null()) as proc:
        if postprocess_in_launcher or (processing and getattr(proc, "module", None) is not None):
            end_state = "JOB_FINISHED"
        t0, ticks0 = time.time(), _cpu_ticks()
        # As the job template starts it: with its BatchJob's id in the environment.
        from balsam.api import BatchJob, Site

        site_id = Site.objects.get(path=str(site)).id
        batch_job = BatchJob.objects.create(site_id=site_id, project="local", queue="local", num_nodes=1,
                                            wall_time_min=30, job_mode=mode)
        launcher = start_launcher(site, mode, 30, "--tag", f"bench={tag}", tick_sec=10,
                                  env={"BALSAM_BATCH_JOB_ID": str(batch_job.id)})
        deadline = time.time() + timeout
        while time.time() < deadline:
            done = Job.objects.filter(tags={"bench": tag}, state={end_state, "FAILED", "RUN_ERROR"}).count()
            if done >= len(ids):
                break
            if launcher.poll() is not None and end_state == "RUN_DONE":
                break
            time.sleep(0.25)
        ticks1 = _cpu_ticks()
        # Read while the launcher and its spawner still live: every task has ended and been reaped.
        split = launcher_cpu_split(launcher.pid)
        launcher.terminate()
        launcher.wait(60)
        threads = launcher_threads_cpu(site / "log", mode)
    cpu1 = (_cpu(server_pid), _rusage(resource.RUSAGE_CHILDREN), _rusage(resource.RUSAGE_SELF))
    failed = list(EventLog.objects.filter(tags={"bench": tag}, to_state="RUN_ERROR"))
    result_errors = [f"job {e.job_id}: {e.data}" for e in failed[:3]]
    running = list(EventLog.objects.filter(tags={"bench": tag}, to_state="RUNNING"))
    first_running = min(_ts(e.timestamp) for e in running) - t0 if running else float("nan")
    run_done = list(EventLog.objects.filter(tags={"bench": tag}, to_state="RUN_DONE"))
    result = {"mode": mode, "jobs": len(ids), "first_running_s": first_running, "processing_error": getattr(proc, "error", ""),
              "figures": [], "cpu": [b - a for a, b in zip(cpu0, cpu1)], "cpu_split": split, "threads": threads,
              "errors": (len(failed), result_errors), "start_up": launcher_start_up(site / "log", mode),
              "runs": {e.job_id: _ts(e.timestamp) for e in running}, "exits": {e.job_id: _ts(e.timestamp) for e in run_done},
              "idle": (ticks1[1] - ticks0[1]) / (ticks1[0] - ticks0[0]) if ticks1[0] > ticks0[0] else float("nan")}
    for state in ("RUN_DONE", "JOB_FINISHED") if end_state == "JOB_FINISHED" else ("RUN_DONE",):
        ended = list(EventLog.objects.filter(tags={"bench": tag}, to_state=state))
        last = max(_ts(e.timestamp) for e in ended) - t0 if ended else float("nan")
        result["figures"].append((state, len(ended), last, len(ended) / last if ended else 0.0))
    return result


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def process_start_time(pid: int) -> float:
    """When process ``pid`` started (epoch seconds), to a clock tick (10 ms).

    Not psutil's ``create_time()``: it adds the process's start offset to the boot time of
    ``/proc/stat``, which is in whole seconds, so it is up to 1 s early (0.85 s on this VM: more
    than the whole 0.3 s target). Here the boot time is now minus ``CLOCK_BOOTTIME``, the clock the
    kernel's start offset counts on."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + since_boot


def _launcher_start(log_dir: Path, mode: str, seen: dict[str, float], stop: threading.Event) -> None:
    """Record when the batch job's launcher process started (watcher thread).

    The launcher's log file name ends with its pid (``<mode>_mode_<stamp>_<host>_<pid>.0.log``); the
    kernel's start time of that process is the batch script's start, which execs the launcher. A
    directory listing every 20 ms is cheap next to scanning every process."""
    while not stop.is_set() and "start" not in seen:
        for path in log_dir.glob(f"{mode}_mode_*.0.log"):
            try:
                pid = int(path.name.rsplit(".", 2)[0].rsplit("_", 1)[1])
                seen["start"] = process_start_time(pid)
                seen["pid"] = pid
            except (ValueError, IndexError, OSError):
                continue
            break
        stop.wait(0.02)


def run_end_to_end(root: Path, mode: str, count: int, command: str, ncpu: int, timeout: float,
                   postprocess_in_launcher: bool, server_pid: int, job_out_ahead: bool) -> dict:
    """``count`` no-op jobs run by a BatchJob through the real site agent (see the module docstring)."""
    from balsam.api import BatchJob, EventLog, Job
    from balsam.client import load_client
    from balsam.site.site_ops import init_site, start_agent, stop_agent

    name = f"e2e-{mode}"
    site_path = root / name
    client = load_client()
    site_id = init_site(site_path, name, "default", client, settings_overrides={
        "scheduler": {"sync_period": 1},
        "launcher": {"idle_ttl_sec": 2, "delay_sec": 1, "default_postprocess_in_launcher": postprocess_in_launcher},
        "processing": {"num_workers": 1},
    })
    app = noop_app(name, command)
    tag = f"e2e-{mode}"
    make_jobs(app, count, tag, site_path / "data", job_out_ahead=job_out_ahead, node_packing_count=ncpu)
    agent_pid = start_agent(site_path)
    seen: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_launcher_start, args=(site_path / "log", mode, seen, stop), daemon=True)
    watcher.start()
    result: dict = {"mode": mode, "jobs": count, "error": ""}
    try:
        cpu_before = _cpu(server_pid), _cpu(agent_pid), _children_cpu(agent_pid), _rusage_self()
        created = time.time()
        batch_job = BatchJob.objects.create(site_id=site_id, project="local", queue="local", num_nodes=1,
                                            wall_time_min=10, job_mode=mode, filter_tags={"bench": tag})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if Job.objects.filter(tags={"bench": tag}, state={"JOB_FINISHED", "FAILED"}).count() >= count:
                break
            time.sleep(0.25)
        else:
            result["error"] = f"timed out after {timeout:.0f} s"
        # The server's and the agent's CPU from the BatchJob's creation to the last job seen done
        # (the agent: its modules' polling, the scheduler module's submit, the processing module).
        result["cpu"] = (_cpu(server_pid) - cpu_before[0], _cpu(agent_pid) - cpu_before[1])
        # The agent's scheduler commands (reaped by it) and this script (its API polls), apart; the
        # launcher, its spawners and their tasks (read while the launcher lives: it waits
        # idle_ttl_sec after its last job): every process the run involves, by CPU per job.
        result["cpu_more"] = {"agent's commands": _children_cpu(agent_pid) - cpu_before[2],
                              "this script": _rusage_self() - cpu_before[3]}
        result["cpu_split"] = launcher_cpu_split(seen["pid"]) if "pid" in seen else None
        runs = {e.job_id: _ts(e.timestamp) for e in EventLog.objects.filter(tags={"bench": tag}, to_state="RUNNING")}
        exits = {e.job_id: _ts(e.timestamp) for e in EventLog.objects.filter(tags={"bench": tag}, to_state="RUN_DONE")}
        running = list(runs.values())
        finished = [_ts(e.timestamp) for e in EventLog.objects.filter(tags={"bench": tag}, to_state="JOB_FINISHED")]
        run_done = list(exits.values())
        start = seen.get("start", float("nan"))
        result.update(
            polling_delay=start - created,
            first_running=(min(running) - start) if running else float("nan"),
            finished=len(finished),
            to_last=(max(finished) - start) if finished else float("nan"),
            run_done=len(run_done),
            to_last_run_done=(max(run_done) - start) if run_done else float("nan"),
            total=(max(finished) - created) if finished else float("nan"),
            runs=runs, exits=exits,
        )
        # The launcher's log is buffered (logging.buffer_num_records) until it exits: idle_ttl_sec
        # after its last job.
        note_deadline = time.time() + 15
        while not result.get("start_up") and time.time() < note_deadline:
            result["start_up"] = launcher_start_up(site_path / "log", mode)
            time.sleep(0.25)
        client.put(f"/batch-jobs/{batch_job.id}", json={"state": "pending_deletion"})
    finally:
        stop.set()
        stop_agent(site_path, timeout=30, force=True)
    return result


def spawn_rate(argv: list[str], threads: int, seconds: float = 3.0) -> tuple[float, float]:
    """Processes started and reaped per second by ``threads`` threads, each one after the other,
    and the CPU seconds each of those processes took (its whole tree, as the kernel accounts it
    to the parent that reaped it)."""
    import resource
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    children0 = _rusage(resource.RUSAGE_CHILDREN)
    deadline = time.perf_counter() + seconds

    def loop() -> int:
        n = 0
        while time.perf_counter() < deadline:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            n += 1
        return n

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(lambda _: loop(), range(threads)))
    rate = total / (time.perf_counter() - start)
    return rate, (_rusage(resource.RUSAGE_CHILDREN) - children0) / max(total, 1)


def noop_app(site_name: str, command: str) -> type:
    """The benchmarks' no-op app on this site, synced (its command is the job's whole run)."""
    from balsam.api import ApplicationDefinition

    class Noop(ApplicationDefinition):
        site = site_name
        command_template = command

    Noop.sync()
    return Noop


def bench_site(dep: LocalDeployment, command: str, postprocess_in_launcher: bool) -> tuple[Path, type]:
    """The site the direct runs use (launchers started by hand, the processing module beside
    them) and its no-op app."""
    site = dep.make_site("bench", launcher={"idle_ttl_sec": 2, "delay_sec": 1,
                                            "default_postprocess_in_launcher": postprocess_in_launcher},
                         processing={"num_workers": 1})
    return site, noop_app("bench", command)


def plugin_package_dirs() -> list[str]:
    """The directories of the installed plugins' top-level packages (those of every entry point
    in a ``balsam*`` group): a launcher imports some of them as it starts (the plugins' hook
    modules, with the plugin manager)."""
    import importlib.metadata
    import importlib.util

    dirs = set()
    for ep in (ep for dist in importlib.metadata.distributions() for ep in dist.entry_points):
        if not ep.group.startswith("balsam"):
            continue
        top = ep.value.split(":", 1)[0].split(".", 1)[0].strip()
        if top == "balsam" or not top:
            continue
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            dirs.add(location)
    return sorted(dirs)


def compile_bytecode() -> int:
    """Write the bytecode of the balsam package and of the installed plugins' packages ahead, as
    an installed package has it (``pip install`` compiles it), so that a launcher's start is not
    measured compiling its own sources: a source checkout under ``PYTHONDONTWRITEBYTECODE=1`` (set
    on some machines, this VM included) never caches them, and each launcher then spends 0.05-0.1 s
    compiling (a few ms for the plugins' hook modules, which the plugin manager imports at every
    start). Returns how many source files were (re)compiled."""
    import compileall
    import io
    from contextlib import redirect_stdout

    import balsam

    with redirect_stdout(io.StringIO()) as out:
        for path in [*balsam.__path__, *plugin_package_dirs()]:
            compileall.compile_dir(path, quiet=0)
    compiled = sum(1 for line in out.getvalue().splitlines() if line.startswith("Compiling "))
    return compiled


def start_up_bound(jobs: int, first_running: float, limit: float) -> str:
    """The best ratio this run could show: every job at the limit's own rate from the first RUNNING
    on. The start-up is in the rate's time, so over few or fast jobs it alone caps the ratio."""
    if not jobs or not limit or first_running != first_running:  # nan: no RUNNING seen
        return "no start-up bound (no RUNNING seen)"
    best = jobs / (first_running + jobs / limit) / limit
    return f"that start-up alone caps {jobs} jobs at {best:.0%} of the limit (every job at the limit's rate after it)"


def limit_label(mode: str, ncpu: int) -> str:
    """What a mode's limit is, as the figures name it."""
    return "fork/exec of /bin/true (4 threads)" if mode == "serial" else f"bare `mpiexec -n 1 true` ({ncpu} at a time)"


def print_cpu_per_job(r: dict, ncpu: int, limit: float, limit_task_cpu: float) -> None:
    """CPU per job, by process, beside what the limit's own processes took and the CPU the 60 %
    target leaves per job on this node: the tasks are the limit's work, the rest is balsam's."""
    split, jobs = r.get("cpu_split"), r["jobs"]
    if not split or not jobs:
        print(f"  {r['mode']:6s} CPU per job: not split (the launcher ran without its spawner process)")
        return
    server, _, here = r["cpu"]
    ms = {name: 1e3 * value / jobs for name, value in split.items()}
    ms["server"], ms["processing module + this script"] = 1e3 * server / jobs, 1e3 * here / jobs
    ours = sum(value for name, value in ms.items() if name != "tasks")
    budget = 1e3 * ncpu / (0.6 * limit)
    print(f"  {r['mode']:6s} CPU per job (ms): tasks {ms['tasks']:.2f} (the limit's: {1e3 * limit_task_cpu:.2f} per process), "
          + ", ".join(f"{name} {value:.2f}" for name, value in ms.items() if name != "tasks")
          + f"; balsam's share {ours:.2f}, all {ours + ms['tasks']:.2f}; 60 % of the limit on {ncpu} CPUs leaves "
          f"{budget:.2f} per job for all of it")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serial-jobs", type=int, default=5000)
    parser.add_argument("--mpi-jobs", type=int, default=200)
    parser.add_argument("--no-processing", action="store_true", help="measure to RUN_DONE even if the processing module exists")
    parser.add_argument("--postprocess", choices=["launcher", "module"], default="launcher",
                        help="who gives the default postprocess: the launcher, in its RUN_DONE update (the default "
                             "setting), or the processing module (default_postprocess_in_launcher: false, as Balsam 0.7)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="through the real site agent and local scheduler, from a BatchJob created through the API")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument("--workdirs-only", action="store_true",
                        help="prepare the jobs as the preprocess did before 2 December 2026: the workdirs alone, each "
                             "job.out created by the launcher (to compare with the default, which makes job.out ahead)")
    parser.add_argument("--limit-sec", type=float, default=3.0,
                        help="how long each reading of the fork/exec limit lasts (the bare mpiexec rate's: 5/3 of it)")
    parser.add_argument("--command", default="true",
                        help="the no-op app's command template (default 'true', exec'd without a shell; "
                             "e.g. 'true;' goes through bash)")
    parser.add_argument("--extra-env", type=int, default=0, metavar="N",
                        help="add N variables (40 characters each) to the environment of everything this starts, "
                             "the limit's processes included: a login environment with modules loaded holds hundreds")
    args = parser.parse_args()
    for i in range(args.extra_env):
        os.environ[f"BALSAM_BENCH_EXTRA_{i:04d}"] = "x" * 40
    # SIGTERM unwinds through the finally blocks: servers stopped, temp dirs removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    compiled = compile_bytecode()
    root = Path(tempfile.mkdtemp(prefix="balsam-launcher-bench-"))
    dep = LocalDeployment(root / "deploy")
    try:
        dep.activate()
        in_launcher = args.postprocess == "launcher"
        site, Noop = bench_site(dep, args.command, in_launcher)
        ncpu = len(os.sched_getaffinity(0))
        load_before = os.getloadavg()[0]
        from balsam.builtin.default_platform import find_mpiexec

        def measure_limit(mode: str) -> tuple[float, float]:
            if mode == "serial":
                return spawn_rate(["/bin/true"], 4, seconds=args.limit_sec)
            return spawn_rate([find_mpiexec(), "-n", "1", "true"], ncpu, seconds=args.limit_sec * 5 / 3)

        if args.end_to_end:
            e2e = []
            for mode, count in (("serial", args.serial_jobs), ("mpi", args.mpi_jobs)):
                if count:
                    before = measure_limit(mode)
                    result = run_end_to_end(root, mode, count, args.command, ncpu, timeout=600, postprocess_in_launcher=in_launcher,
                                            server_pid=dep.proc.pid, job_out_ahead=not args.workdirs_only)
                    result["limits"] = (before[0], measure_limit(mode)[0])
                    e2e.append(result)
            print(f"launcher throughput end to end ({ncpu} CPUs, load average before the run {load_before:.1f}; real "
                  f"uvicorn + SQLite server, the site agent with the local scheduler, real mpiexec; app command {args.command!r}; "
                  f"default postprocess by the {args.postprocess}; "
                  f"job.out {'created by the launcher' if args.workdirs_only else 'made ahead, with the workdir'})")
            print(f"  balsam's bytecode compiled ahead, as installed ({compiled} files compiled now)")
            for r in e2e:
                limit = max(r["limits"])
                what = limit_label(r["mode"], ncpu)
                print(f"  {r['mode']:6s} limit, {what}: {r['limits'][0]:,.1f}/s just before the run, {r['limits'][1]:,.1f}/s "
                      "just after; ratios below are to the higher")
                rate = r["finished"] / r["to_last"] if r["finished"] else 0.0
                print(f"  {r['mode']:6s} BatchJob created -> launcher process start (scheduler polling, excluded): "
                      f"{r['polling_delay']:.2f} s")
                print(f"  {r['mode']:6s} launcher start -> first RUNNING {r['first_running']:.3f} s; "
                      + start_up_bound(r["jobs"], r["first_running"], limit))
                print(f"  {r['mode']:6s} the launcher's log: first job started {r.get('start_up') or '(line not found)'}")
                print(f"  {r['mode']:6s} " + steady_state(r["runs"], r["exits"], ncpu, limit,
                                                         4 if r["mode"] == "serial" else ncpu))
                print(f"  {r['mode']:6s} {r['finished']:5d}/{r['jobs']} jobs, launcher start -> last JOB_FINISHED "
                      f"{r['to_last']:.2f} s: {rate:8.1f} jobs/s = {rate / limit:.0%} of the limit "
                      f"(BatchJob created -> last JOB_FINISHED {r['total']:.2f} s)")
                done_rate = r["run_done"] / r["to_last_run_done"] if r["run_done"] else 0.0
                print(f"  {r['mode']:6s} {r['run_done']:5d}/{r['jobs']} jobs, launcher start -> last RUN_DONE "
                      f"{r['to_last_run_done']:.2f} s: {done_rate:8.1f} jobs/s = {done_rate / limit:.0%} of the limit "
                      + ("(the launcher's update carries POSTPROCESSED too)" if in_launcher else
                         "(the launcher alone; JOB_FINISHED waits for the agent's processing module)"))
                server_cpu, agent_cpu = r["cpu"]
                more = r.get("cpu_more", {})
                print(f"  {r['mode']:6s} CPU per job from BatchJob created to the last job seen done (ms; this script looks "
                      f"every 0.25 s): server {1e3 * server_cpu / r['jobs']:.2f}, site agent {1e3 * agent_cpu / r['jobs']:.2f}"
                      + "".join(f", {name} {1e3 * value / r['jobs']:.2f}" for name, value in more.items()))
                split = r.get("cpu_split")
                if split:
                    # The launcher's from its start (its start-up included), not from the BatchJob's creation.
                    budget = 1e3 * ncpu / (0.6 * limit)
                    ours = sum(v for k, v in split.items() if k != "tasks") + server_cpu + agent_cpu + sum(more.values())
                    print(f"  {r['mode']:6s} CPU per job (ms): tasks {1e3 * split['tasks'] / r['jobs']:.2f}, launcher "
                          f"{1e3 * split['launcher'] / r['jobs']:.2f} (start-up included), spawner "
                          f"{1e3 * split['spawner'] / r['jobs']:.2f}; balsam's share with the above {1e3 * ours / r['jobs']:.2f}, "
                          f"all {1e3 * (ours + split['tasks']) / r['jobs']:.2f}; 60 % of the limit on {ncpu} CPUs leaves "
                          f"{budget:.2f} per job for all of it")
                else:  # read after the last JOB_FINISHED: a launcher idle past its idle_ttl has exited
                    print(f"  {r['mode']:6s} CPU per job by launcher process: not read (the launcher had exited "
                          "before the last job was seen done)")
                if r["error"]:
                    print(f"         {r['error']}")
            return 0
        results = []
        for mode, count in (("serial", args.serial_jobs), ("mpi", args.mpi_jobs)):
            if not count:
                continue
            ids = make_jobs(Noop, count, mode, site / "data", job_out_ahead=not args.workdirs_only, node_packing_count=ncpu)
            # The limit just before and just after the run: the machine's speed drifts (another
            # tenant, thermal, the page cache), and a limit read minutes away misstates the ratio.
            fs_cost = file_create_cost(root / f"fs-probe-{mode}")
            before = measure_limit(mode)
            result = run_mode(site, mode, mode, ids, not args.no_processing, timeout=600, server_pid=dep.proc.pid,
                              postprocess_in_launcher=in_launcher)
            after = measure_limit(mode)
            result["limits"] = (before[0], after[0])
            result["limit_task_cpu"] = (before[1] + after[1]) / 2
            result["fs_cost"] = fs_cost
            results.append(result)
        print(f"launcher throughput ({ncpu} CPUs, load average before the run {load_before:.1f}; "
              f"real uvicorn + SQLite server, real mpiexec; app command {args.command!r}; "
              f"{len(os.environ)} environment variables; default postprocess by the {args.postprocess})")
        print(f"  balsam's bytecode compiled ahead, as installed ({compiled} files compiled now)")
        for r in results:
            # Against the higher of the two readings: the ratio is never flattered by a slow moment.
            limit = max(r["limits"])
            what = limit_label(r["mode"], ncpu)
            print(f"  {r['mode']:6s} limit, {what}: {r['limits'][0]:,.1f}/s just before the run, {r['limits'][1]:,.1f}/s "
                  "just after; ratios below are to the higher")
            for state, count, elapsed, rate in r["figures"]:
                print(f"  {r['mode']:6s} {count:5d}/{r['jobs']} jobs to {state:12s}: {rate:8.1f} jobs/s "
                      f"({elapsed:.2f} s from launcher start to the last {state}) = {rate / limit:.0%} of the limit")
            print(f"  {r['mode']:6s} first RUNNING {r['first_running_s']:.3f} s after launcher start; "
                  + start_up_bound(r["jobs"], r["first_running_s"], limit))
            if r["start_up"]:
                print(f"  {r['mode']:6s} the launcher's log: first job started {r['start_up']}")
            print(f"  {r['mode']:6s} " + steady_state(r["runs"], r["exits"], ncpu, limit, 4 if r["mode"] == "serial" else ncpu))
            print(f"  {r['mode']:6s} CPUs idle {100 * r['idle']:.0f} % of the time from launcher start until this "
                  "script saw the last job done (/proc/stat; it looks every 0.25 s)")
            server, launcher, here = r["cpu"]
            print(f"  {r['mode']:6s} CPU seconds: server {server:.1f}, launcher with its tasks {launcher:.1f}, "
                  f"processing module + this script {here:.1f}")
            print_cpu_per_job(r, ncpu, limit, r["limit_task_cpu"])
            if r["threads"]:
                print(f"  {r['mode']:6s} launcher CPU by thread, start-up included (from its log): {r['threads']}")
            mkdir_cpu, create_cpu = r["fs_cost"]
            print(f"  {r['mode']:6s} file system just before the run (ms of CPU): a mkdir {1e3 * mkdir_cpu:.3f}, a new "
                  f"job.out {1e3 * create_cpu:.3f} ("
                  + ("the workdirs were made ahead and the launcher created each job.out, as before 2 December 2026)"
                     if args.workdirs_only else
                     "the workdirs and their job.out were made ahead, as the processing module's preprocess makes them)"))
            if r["errors"][0]:
                print(f"         {r['errors'][0]} jobs ended RUN_ERROR, e.g. {r['errors'][1]}")
            if r["processing_error"]:
                print(f"         processing module not used: {r['processing_error']}")
        print("  targets: serial >= 60 % of the fork/exec limit, first RUNNING < 0.3 s, mpi >= 60 % of bare mpiexec "
              "(Balsam 0.7: 1.9 serial, 1.7 mpi jobs/s, 4.7 s to first RUNNING)")
        return 0
    finally:
        dep.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


if __name__ == "__main__":
    sys.exit(main())

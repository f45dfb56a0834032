"""The main job: ``balsam demo`` (or ``python -m balsam.demo``) runs a real campaign on this machine.

With nothing but balsam installed it:

1. starts the embedded API server (SQLite) unless it is running, and logs in as you;
2. creates a site on the ``local`` scheduler and ``default`` platform (``$BALSAM_HOME/demo-site``
   unless ``--site-path`` says otherwise; an existing demo site is reused) and starts its agent;
3. registers a shell app, a Python ``run()`` app and an MPI app (mpi4py);
4. creates about 1,000 jobs, among them a small dependency DAG;
5. submits a serial-mode and an mpi-mode BatchJob, shows live progress, and ends with a summary:
   jobs per state, throughput, the DAG's result, where the outputs are, and what to try next.

The site stays: ``balsam job ls``, ``balsam queue ls``, ``balsam site ls`` keep working.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn, Optional

import click

DEFAULT_NUM_JOBS = 1000
DEMO_SITE_NAME = "demo"
#: Settings that make the demo snappy: submit and poll every second, launchers exit when idle.
DEMO_SETTINGS = {
    "scheduler": {"sync_period": 1},
    "launcher": {"idle_ttl_sec": 5, "delay_sec": 1},
    "processing": {"num_workers": 2},
}
BATCH_JOB_WALL_TIME_MIN = 10
DONE = ("JOB_FINISHED", "FAILED")
STATE_ORDER = (
    "AWAITING_PARENTS", "READY", "STAGED_IN", "PREPROCESSED", "RUNNING", "RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT",
    "RESTART_READY", "POSTPROCESSED", "JOB_FINISHED", "FAILED",
)


class DemoError(click.ClickException):
    pass


class _Left:
    """What this demo run has started, for the one line a Ctrl-C leaves (:func:`interrupted_line`)."""

    def __init__(self) -> None:
        self.step = ""
        self.server_started = False
        self.site_path: Optional[Path] = None
        self.agent_pid: Optional[int] = None
        self.agent_started = False
        self.run_id: Optional[str] = None
        self.batch_job_ids: list[int] = []


def interrupted_line(left: _Left) -> str:
    """One line: what a demo stopped by Ctrl-C leaves running, and the commands that stop it."""
    return "Interrupted: " + left_running(left)


def left_running(left: _Left) -> str:
    """What ``left`` says goes on running, and the commands that stop each ("still running: ..."),
    else "the demo started nothing that runs on": the end of a Ctrl-C's line, of a closed output's
    (:func:`_output_closed`) and of a campaign that timed out."""
    parts = []
    where = f" {left.site_path}" if left.site_path else ""
    if left.batch_job_ids:
        ids = ", ".join(str(i) for i in left.batch_job_ids)
        parts.append(f"BatchJobs {ids} go on running the jobs tagged demo_run={left.run_id} "
                     f"(`balsam job ls --tag demo_run={left.run_id} --by-state`; `balsam queue term --id ID` ends one)")
    elif left.step == "batch":
        parts.append(f"a BatchJob for the jobs tagged demo_run={left.run_id} may have been submitted "
                     "(`balsam queue ls`; `balsam queue term --id ID` ends one)")
    elif left.run_id and left.step == "jobs":
        parts.append(f"some jobs tagged demo_run={left.run_id} may have been created and wait for a launcher "
                     f"(`balsam job ls --tag demo_run={left.run_id}`)")
    if left.agent_pid is not None:
        started = "started by the demo" if left.agent_started else "already running before"
        parts.append(f"the site agent [pid {left.agent_pid}] ({started}; `balsam site stop{where}` stops it)")
    elif left.step == "agent":
        parts.append(f"the site agent may be starting (`balsam site stop{where}`)")
    if left.server_started:
        parts.append("the Balsam server the demo started (`balsam server stop`)")
    elif left.step == "server":
        parts.append("the Balsam server may be starting (`balsam server status`; `balsam server stop`)")
    if not parts:
        return "the demo started nothing that runs on"
    return "still running: " + "; ".join(parts)


#: Exit status of a demo whose output was closed (`balsam demo | head`): what a shell reports for a
#: process that SIGPIPE killed (128 + 13); Python ignores SIGPIPE, so the write raises instead.
BROKEN_PIPE_EXIT_CODE = 141


def _to_devnull(stream: Any) -> None:
    """Point ``stream``'s file descriptor at /dev/null, as Python's docs advise for a
    BrokenPipeError: the interpreter flushes the standard streams at exit, and the data a failed
    write left in the buffer raised again there ("Exception ignored ... BrokenPipeError")."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (click's CliRunner)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def demo_log_path(left: _Left) -> Path:
    """Where the demo writes what it cannot say on a closed stderr: the site's log directory once
    it exists, else $BALSAM_HOME."""
    from balsam.config import balsam_home

    if left.site_path is not None and (left.site_path / "log").is_dir():
        return left.site_path / "log" / "demo.log"
    return balsam_home() / "demo.log"


def _output_closed(left: _Left) -> NoReturn:
    """End a demo whose output was closed by its reader (`balsam demo 2>&1 | head -8`) as a Ctrl-C
    ends it: nothing more started, one line naming what goes on running, a non-zero exit. It died
    after "Creating jobs" with click's silent status 1, leaving the jobs and the site agent it
    started and no word of either. The line goes to stderr, else (closed too) to
    :func:`demo_log_path`."""
    line = "balsam demo: output closed (broken pipe), demo stopped: " + left_running(left)
    _to_devnull(sys.stdout)
    try:
        click.echo(line, err=True)
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        _to_devnull(sys.stderr)
        try:
            log = demo_log_path(left)
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as fh:
                fh.write(f"{dt.datetime.now().isoformat(timespec='seconds')} {line}\n")
        except OSError:
            pass  # nowhere left to say it: the exit status still tells
    raise click.exceptions.Exit(BROKEN_PIPE_EXIT_CODE)


class _DemoCommand(click.Command):
    """``python -m balsam.demo`` (no ``balsam`` group above it) ends a Ctrl-C as ``balsam demo``
    does: its one line and exit status 130, not click's "Aborted!" and 1."""

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.parent is not None:  # under `balsam`: its group reports the interrupt
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            from balsam.cli import _interrupted

            _interrupted(exc)


def _step(message: str) -> None:
    click.secho(f"==> {message}", bold=True)


def _balsam_cli() -> list[str]:
    """The ``balsam`` command of this installation (next to its interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / "balsam"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("balsam")
    return [found] if found else [sys.executable, "-c", "from balsam.cli import main; main()"]


# -- 1. server ------------------------------------------------------------------------------------

DEFAULT_SERVER_PORT = 8765


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



def ensure_server(left: Optional[_Left] = None) -> Any:
    """A logged-in client; starts the embedded server first when no server answers (noted in
    ``left``)."""
    from balsam.client import load_client

    try:
        client = load_client()
        client.retry_count = 0
        client.get("/sites/", params={"limit": 1})
        client.retry_count = 10
    except Exception:
        client = None
    if client is not None:
        if left is not None:
            # A closed output from here on must not say a server "may be starting": the demo
            # uses one it did not start.
            left.step = "server in use"
        # Outside the try: a closed output (BrokenPipeError) there started a second server.
        click.echo(f"    using the Balsam server at {client.api_root}")
        return client
    command = [*_balsam_cli(), "server", "start"]
    if not _port_free(DEFAULT_SERVER_PORT):
        # Another server (someone else's, or another BALSAM_HOME's) holds the default port.
        command += ["--port", str(_free_port())]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if left is not None and proc.returncode == 0:
        left.server_started = not any("already running" in line for line in proc.stdout.splitlines())
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise DemoError(f"`balsam server start` failed: {said[-1] if said else f'exit code {proc.returncode}'}")
    for line in proc.stdout.strip().splitlines():
        click.echo(f"    {line}")
    client = load_client()
    client.get("/sites/", params={"limit": 1})
    return client


# -- 2. site --------------------------------------------------------------------------------------


def ensure_site(client: Any, site_path: Path) -> int:
    from balsam.site.site_ops import init_site

    marker = site_path / ".balsam-site"
    if marker.is_file():
        site_id = int(marker.read_text().split()[0])
        try:
            client.get(f"/sites/{site_id}")
            click.echo(f"    reusing site {site_id} at {site_path}")
            return site_id
        except Exception as exc:
            if getattr(exc, "status_code", None) != 404:
                raise
            stale = site_path.with_name(f"{site_path.name}.stale-{dt.datetime.now():%Y%m%d-%H%M%S}")
            site_path.rename(stale)
            click.echo(f"    {site_path} belonged to a site the server no longer knows: moved it to {stale}")
    elif site_path.exists() and any(site_path.iterdir()):
        raise DemoError(f"{site_path} exists and is not a Balsam site: pass another --site-path")
    taken = {s["name"] for s in client.get("/sites/", params={"limit": 10000}).get("results", [])}
    name, n = DEMO_SITE_NAME, 1
    while name in taken:
        n += 1
        name = f"{DEMO_SITE_NAME}-{n}"
    site_id = init_site(site_path, name, "default", client, echo=click.echo, settings_overrides=DEMO_SETTINGS)
    click.echo(f"    created site {name!r} (id {site_id}) at {site_path} [scheduler local, platform default]")
    return site_id


def ensure_agent(site_path: Path, left: Optional[_Left] = None) -> int:
    from balsam.site.agent import agent_running
    from balsam.site.site_ops import start_agent

    running = agent_running(site_path)
    if running is not None:
        click.echo(f"    site agent already running [pid {running[1]}]")
        if left is not None:
            left.agent_pid = running[1]
        return running[1]
    pid = start_agent(site_path)
    if left is not None:
        left.agent_pid, left.agent_started = pid, True
    click.echo(f"    started the site agent [pid {pid}] (logs in {site_path / 'log'})")
    return pid


# -- 3. apps --------------------------------------------------------------------------------------


def register_apps(site_id: int) -> dict[str, type]:
    from balsam.api import ApplicationDefinition

    python = sys.executable

    class DemoHello(ApplicationDefinition):
        """Shell app: greets and writes the square of x to square.txt."""

        site = site_id
        # No quotes around {{ name }}: parameters are shell-quoted when rendered.
        command_template = 'echo Hello, {{ name }}! && echo $(( {{ x }} * {{ x }} )) > square.txt'

    class DemoSum(ApplicationDefinition):
        """Shell app of the DAG's join step: adds up its parents' square.txt files."""

        site = site_id
        command_template = "cat ../square_*/square.txt | awk '{ total += $1 } END { print total }' | tee sum.txt"

    class DemoPower(ApplicationDefinition):
        """Python run() app: returns x to the power p (the value comes back with job.result())."""

        site = site_id

        def run(self, x, p=2):
            return x**p

    class DemoMPI(ApplicationDefinition):
        """MPI app: mpi4py's hello world, one line per rank."""

        site = site_id
        command_template = f"{python} -m mpi4py.bench helloworld"

    apps = {"hello": DemoHello, "sum": DemoSum, "power": DemoPower, "mpi": DemoMPI}
    for cls in apps.values():
        cls.sync()
    return apps


# -- 4. jobs --------------------------------------------------------------------------------------


def plan_counts(total: int) -> dict[str, int]:
    dag = 6
    # A run() job starts a Python interpreter (~0.5 s of CPU) and an MPI job an mpiexec: keep them a
    # small share so the campaign fits in about a minute on a 2-core machine.
    mpi = max(4, min(20, total // 50))
    python = max(4, min(40, total // 25))
    shell = max(1, total - dag - mpi - python)
    return {"shell": shell, "python": python, "mpi": mpi, "dag": dag}


def create_jobs(apps: dict[str, type], run_id: str, total: int) -> dict[str, int]:
    from balsam.api import Job

    counts = plan_counts(total)
    serial = {"demo_run": run_id, "mode": "serial"}
    mpi_tags = {"demo_run": run_id, "mode": "mpi"}
    jobs = [
        Job(f"{run_id}/hello/{i:04d}", apps["hello"], parameters={"name": f"job {i}", "x": i}, tags=serial,
            node_packing_count=64)
        for i in range(counts["shell"])
    ]
    jobs += [
        Job(f"{run_id}/power/{i:04d}", apps["power"], parameters={"x": i, "p": 2}, tags=serial, node_packing_count=64)
        for i in range(counts["python"])
    ]
    jobs += [
        Job(f"{run_id}/mpi/{i:03d}", apps["mpi"], tags=mpi_tags, ranks_per_node=2, node_packing_count=1)
        for i in range(counts["mpi"])
    ]
    Job.objects.bulk_create(jobs)
    # The DAG: four squares -> their sum -> a report; children start when all parents finish.
    stages = Job.objects.bulk_create(
        [
            Job(f"{run_id}/dag/square_{x}", apps["hello"], parameters={"name": f"dag {x}", "x": x},
                tags={**serial, "dag": "square"})
            for x in range(1, 5)
        ]
    )
    (join,) = Job.objects.bulk_create(
        [Job(f"{run_id}/dag/sum", apps["sum"], tags={**serial, "dag": "sum"},
             parent_ids={j.id for j in stages})]
    )
    Job.objects.bulk_create(
        [Job(f"{run_id}/dag/report", apps["hello"], parameters={"name": "DAG done", "x": 0},
             tags={**serial, "dag": "report"}, parent_ids={join.id})]
    )
    return counts


def submit_batch_jobs(site_id: int, run_id: str, wall_time_min: int,
                      modes: tuple[str, ...] = ("serial", "mpi")) -> list[Any]:
    from balsam.api import BatchJob

    made = []
    for mode in modes:
        made.append(
            BatchJob.objects.create(
                site_id=site_id, project="local", queue="local", num_nodes=1, wall_time_min=wall_time_min,
                job_mode=mode, filter_tags={"demo_run": run_id, "mode": mode},
            )
        )
    return made


# -- 5. progress and summary ----------------------------------------------------------------------


#: How long --stop-agent waits for the BatchJobs to end (launchers idle out after 5 s) before it
#: stops the agent.
STOP_AGENT_WAIT_SEC = 60


def _live_batch_jobs(client: Any, ids: list[int]) -> list[int]:
    """Those of ``ids`` whose BatchJob may still run a launcher, from one listing (the id and state
    filters) whatever their number; when the listing fails, all count as live."""
    from balsam.site.service_client import list_all

    if not ids:
        return []
    try:
        rows = list_all(client, "/batch-jobs/", {"id": list(ids), "state": list(LIVE_BATCH_JOB_STATES)})
    except Exception:
        return list(ids)
    live = {row["id"] for row in rows}
    return [batch_job_id for batch_job_id in ids if batch_job_id in live]


def _wait_for_batch_jobs(client: Any, ids: list[int], wait_sec: float) -> list[int]:
    """Wait up to ``wait_sec`` for the BatchJobs ``ids`` to end; those still live then."""
    deadline = time.monotonic() + wait_sec
    while ids and time.monotonic() < deadline:
        time.sleep(1)
        ids = _live_batch_jobs(client, ids)
    return ids


def job_rows(client: Any, run_id: str) -> list[dict]:
    from balsam.site.service_client import list_all

    return list_all(client, "/jobs/", {"tags": f"demo_run:{run_id}"})


def job_states(client: Any, run_id: str) -> Counter:
    return Counter(row["state"] for row in job_rows(client, run_id))


#: Job states a launcher can start now, and BatchJob states whose launcher will (still) take them.
RUNNABLE = ("PREPROCESSED", "RESTART_READY")
LIVE_BATCH_JOB_STATES = ("pending_submission", "queued", "running", "pending_deletion")
#: Replacement BatchJobs the demo submits per job mode at most (see _BatchJobKeeper).
MAX_REPLACEMENTS = 2
CHECK_BATCH_JOBS_EVERY_SEC = 2.0
#: Without a terminal (`demo.sh | tee demo.log`, CI) rich draws no live bar: a plain line this often.
PLAIN_PROGRESS_EVERY_SEC = 10.0


def _deleted(batch_job: dict) -> bool:
    """Whether a BatchJob ended because its scheduler job was deleted (`balsam queue term`): the
    agent records the scheduler's word for the end in status_info, the local scheduler's
    ``CANCELLED`` (message ``deleted``), and ``deleted`` for a deleted job the scheduler keeps no
    record of. It lasts, unlike the ``pending_deletion`` state (one or two scheduler sync periods:
    a keeper reading the BatchJob only while jobs of its mode wait missed it, and the killed
    launcher's jobs, back to RESTART_READY, had the terminated BatchJob replaced)."""
    info = batch_job.get("status_info") or {}
    return info.get("scheduler_state") == "CANCELLED" or info.get("scheduler_message") == "deleted"


class _BatchJobKeeper:
    """Replaces a mode's BatchJob whose launcher ended while jobs of that mode still wait to run.

    The demo's launchers exit after a few idle seconds (DEMO_SETTINGS) so that the campaign ends
    promptly; but a launcher can start before the agent has preprocessed its mode's jobs (with
    --num-jobs 3000 the MPI jobs, created last, are preprocessed after ~2,900 shell jobs, and
    under load even with 1,000), or the serial one can find nothing while the DAG's join waits for
    its parents. It then idles out and the jobs left would wait until --timeout. At most
    MAX_REPLACEMENTS per mode, and none for a BatchJob ended by `balsam queue term`
    (:func:`_deleted`)."""

    def __init__(self, site_id: int, run_id: str, wall_time_min: int, batch_jobs: list[Any], left: Optional[_Left]):
        self.site_id, self.run_id, self.wall_time_min, self.left = site_id, run_id, wall_time_min, left
        self.current = {b.job_mode: b.id for b in batch_jobs}
        self.replaced: Counter = Counter()
        self.terminated: set[int] = set()
        self.next_check = 0.0

    def check(self, client: Any, rows: list[dict], say: Any) -> None:
        # A BatchJob's state changes at the agent's pace (seconds): no GET per mode every poll.
        if time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + CHECK_BATCH_JOBS_EVERY_SEC
        waiting = Counter(row.get("tags", {}).get("mode") for row in rows if row["state"] in RUNNABLE)
        for mode, batch_job_id in list(self.current.items()):
            if not waiting[mode] or batch_job_id in self.terminated:
                continue
            row = client.get(f"/batch-jobs/{batch_job_id}")
            state = row["state"]
            if state == "pending_deletion" or _deleted(row):
                self.terminated.add(batch_job_id)
                continue
            if state in LIVE_BATCH_JOB_STATES or self.replaced[mode] >= MAX_REPLACEMENTS:
                continue
            (new,) = submit_batch_jobs(self.site_id, self.run_id, self.wall_time_min, modes=(mode,))
            self.replaced[mode] += 1
            self.current[mode] = new.id
            if self.left is not None:
                self.left.batch_job_ids.append(new.id)
            say(f"    BatchJob {batch_job_id} ({mode}) is {state} with {waiting[mode]} {mode} job(s) still to run: "
                f"submitted BatchJob {new.id}")


def watch(client: Any, run_id: str, total: int, timeout: float,
          keeper: Optional[_BatchJobKeeper] = None) -> tuple[Counter, float]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    plain = not console.is_terminal
    start = time.monotonic()
    last_line = -PLAIN_PROGRESS_EVERY_SEC
    states: Counter = Counter()
    with Progress(
        TextColumn("    jobs done"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console, transient=False, refresh_per_second=4, disable=plain,
    ) as progress:
        task = progress.add_task("", total=total)
        say = click.echo if plain else progress.console.print
        while True:
            rows = job_rows(client, run_id)
            states = Counter(row["state"] for row in rows)
            done = sum(states[s] for s in DONE)
            busy = ", ".join(f"{s} {states[s]}" for s in STATE_ORDER if states[s] and s not in DONE)
            progress.update(task, completed=done, description=busy or "all done")
            finished = done >= total or time.monotonic() - start > timeout
            now = time.monotonic() - start
            if plain and (finished or now - last_line >= PLAIN_PROGRESS_EVERY_SEC):
                last_line = now
                click.echo(f"    jobs done {done}/{total}  {dt.timedelta(seconds=int(now))}  {busy or 'all done'}")
            if finished:
                break
            if keeper is not None:
                keeper.check(client, rows, say)
            time.sleep(0.5)
    return states, time.monotonic() - start


def throughput(client: Any, run_id: str) -> Optional[tuple[float, float, int]]:
    """(seconds from the first RUNNING to the last JOB_FINISHED, jobs/s, jobs finished) from the event log."""
    from balsam.serialization import parse_datetime
    from balsam.site.service_client import list_all

    started = list_all(client, "/events/", {"tags": f"demo_run:{run_id}", "to_state": "RUNNING"})
    finished = list_all(client, "/events/", {"tags": f"demo_run:{run_id}", "to_state": "JOB_FINISHED"})
    if not started or not finished:
        return None
    first = min(parse_datetime(e["timestamp"]) for e in started)
    last = max(parse_datetime(e["timestamp"]) for e in finished)
    span = max((last - first).total_seconds(), 1e-3)
    return span, len(finished) / span, len(finished)


def summary(client: Any, site_path: Path, run_id: str, states: Counter, elapsed: Optional[float],
            apps: dict[str, type]) -> int:
    """The summary; ``elapsed`` None: the campaign did not finish within --timeout (no wall time)."""
    from balsam.api import Job

    _step("Summary")
    width = max(len(s) for s in states) if states else 10
    for state in STATE_ORDER:
        if states[state]:
            click.echo(f"    {state:<{width}}  {states[state]:>5}")
    click.echo(f"    {'total':<{width}}  {sum(states.values()):>5}")
    figures = throughput(client, run_id)
    if figures:
        span, rate, finished = figures
        click.echo(f"    throughput: {finished} jobs finished in {span:.1f} s from the first RUNNING: {rate:.1f} jobs/s")
    if elapsed is None:
        click.echo("    wall time of the campaign: none, it did not finish within the timeout")
    else:
        click.echo(f"    wall time of the campaign (jobs created -> all done): {elapsed:.1f} s")
    data = site_path / "data" / run_id
    dag_sum = data / "dag" / "sum" / "sum.txt"
    if dag_sum.is_file():
        click.echo(f"    DAG: 1^2 + 2^2 + 3^2 + 4^2 = {dag_sum.read_text().strip()}  ({dag_sum})")
    try:
        sample = Job.objects.filter(tags={"demo_run": run_id}, app_id=apps["power"].__app_id__, state="JOB_FINISHED")[:3]
        results = [f"{job.get_parameters()['x']}^2 = {job.result_nowait()}" for job in sample]
        if results:
            click.echo(f"    Python run() results: {', '.join(results)}")
    except Exception as exc:
        click.echo(f"    (could not read the run() results: {exc})")
    click.echo(f"    outputs: {data}/<app>/<job>/job.out (stdout+stderr), balsam.log (hook output)")
    click.echo(f"    site: {site_path}   logs: {site_path / 'log'}")
    click.echo("    next: cd " + str(site_path) + f" && balsam job ls --tag demo_run={run_id} --by-state;"
               " balsam queue ls --history; balsam site ls")
    return 0 if states["FAILED"] == 0 and sum(states[s] for s in DONE) == sum(states.values()) else 1


@click.command("demo", cls=_DemoCommand)
@click.option("--site-path", type=click.Path(file_okay=False), help="Site directory (default: $BALSAM_HOME/demo-site)")
@click.option("-n", "--num-jobs", default=DEFAULT_NUM_JOBS, show_default=True, help="Jobs in the campaign")
@click.option("--timeout", default=300.0, show_default=True, help="Give up waiting after this many seconds")
@click.option("--stop-agent", is_flag=True, help="Stop the site agent at the end (default: leave it running)")
def demo(site_path: Optional[str], num_jobs: int, timeout: float, stop_agent: bool) -> None:
    """Run a real Balsam campaign on this machine: server, site, apps, ~1,000 jobs, two BatchJobs.

    Ctrl-C ends it with exit status 130 and one line saying what goes on running (the BatchJobs, the
    site agent, the server it started) and the commands that stop each."""
    from balsam.cli import Interrupted

    left = _Left()
    try:
        _campaign(site_path, num_jobs, timeout, stop_agent, left)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_line(left)) from None
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        _output_closed(left)


def _stop_agent_after_batch_jobs(client: Any, path: Path, left: _Left) -> list[int]:
    """--stop-agent: wait up to STOP_AGENT_WAIT_SEC for the demo's BatchJobs to end (their
    launchers idle out, the agent records them as finished), then stop the site agent; the
    BatchJobs still live then."""
    from balsam.site.site_ops import stop_agent

    live = _live_batch_jobs(client, left.batch_job_ids)
    if live:
        click.echo(f"    waiting up to {STOP_AGENT_WAIT_SEC} s for BatchJobs {', '.join(map(str, live))} "
                   "to end before stopping the site agent")
        live = _wait_for_batch_jobs(client, live, STOP_AGENT_WAIT_SEC)
    stop_agent(path)
    left.agent_pid = None
    return live


def _campaign(site_path: Optional[str], num_jobs: int, timeout: float, stop_agent: bool, left: _Left) -> None:
    from balsam.config import balsam_home

    t0 = time.monotonic()
    path = Path(site_path).expanduser().resolve() if site_path else balsam_home() / "demo-site"
    _step("Starting the Balsam API server")
    left.step = "server"
    client = ensure_server(left)
    from balsam._api.model import reset_default_client

    reset_default_client()
    _step("Setting up the site")
    left.step, left.site_path = "site", path
    site_id = ensure_site(client, path)
    os.environ["BALSAM_SITE_PATH"] = str(path)
    left.step = "agent"
    ensure_agent(path, left)
    _step("Registering apps: DemoHello (shell), DemoSum (shell), DemoPower (Python run()), DemoMPI (mpi4py)")
    left.step = "apps"
    apps = register_apps(site_id)
    run_id = f"run-{dt.datetime.now():%Y%m%d-%H%M%S}"
    _step(f"Creating jobs (tag demo_run={run_id})")
    left.step, left.run_id = "jobs", run_id
    t_jobs = time.monotonic()
    counts = create_jobs(apps, run_id, num_jobs)
    total = sum(counts.values())
    click.echo(
        f"    {total} jobs: {counts['shell']} shell, {counts['python']} Python run(), {counts['mpi']} MPI (2 ranks), "
        f"and a DAG of {counts['dag']} (4 squares -> sum -> report)"
    )
    _step("Submitting a serial-mode and an mpi-mode BatchJob (1 node each, local scheduler)")
    left.step = "batch"
    batch_jobs = submit_batch_jobs(site_id, run_id, wall_time_min=BATCH_JOB_WALL_TIME_MIN)
    left.batch_job_ids = [b.id for b in batch_jobs]
    click.echo("    BatchJobs " + ", ".join(f"{b.id} ({b.job_mode})" for b in batch_jobs))
    _step("Running")
    left.step = "running"
    keeper = _BatchJobKeeper(site_id, run_id, BATCH_JOB_WALL_TIME_MIN, batch_jobs, left)
    states, _ = watch(client, run_id, total, timeout, keeper)
    elapsed = time.monotonic() - t_jobs
    timed_out = sum(states[s] for s in DONE) < total
    if timed_out:
        click.echo(f"    the campaign did not finish within the timeout (--timeout {timeout:g} s): "
                   f"{sum(states[s] for s in DONE)} of {total} jobs done")
    left.step = "summary"
    done = sum(states[s] for s in DONE)
    live: list[int] = []
    if timed_out and stop_agent:
        # The launchers run jobs while the demo waits: wait first, then count the jobs as they are
        # after the wait (one listing), not as they stood at the timeout.
        live = _stop_agent_after_batch_jobs(client, path, left)
        states = job_states(client, run_id)
    code = summary(client, path, run_id, states, None if timed_out else elapsed, apps)
    if not timed_out and stop_agent:
        # The campaign is done: its summary first, then the wait (up to STOP_AGENT_WAIT_SEC).
        live = _stop_agent_after_batch_jobs(client, path, left)
    elif timed_out and not stop_agent:
        live = _live_batch_jobs(client, left.batch_job_ids)
    if stop_agent:
        click.echo("    site agent stopped (start it again with `balsam site start " + str(path) + "`)")
    if timed_out and stop_agent:
        # The exit status stays 1 (documented): the campaign did not finish within --timeout.
        finished = states["JOB_FINISHED"]
        if finished == sum(states.values()) > done:
            click.echo(f"    all {finished} jobs finished after the timeout, during the --stop-agent wait")
    if timed_out or live:
        # What goes on running, as a Ctrl-C says it: only the BatchJobs still live.
        left.batch_job_ids = live
        running = left_running(left) if live or left.agent_pid is not None or left.server_started else ""
        click.echo("    " + (running or "nothing the demo started goes on running"))
    click.echo(f"    demo {'ended' if timed_out else 'finished'} in {time.monotonic() - t0:.1f} s")
    if timed_out:
        raise DemoError(f"some jobs did not finish within --timeout {timeout:g} s: see the summary above and "
                        "the logs in " + str(path / "log"))
    if code:
        raise DemoError("some jobs did not finish: see the summary above and the logs in " + str(path / "log"))


commands = [demo]


def main() -> None:
    demo(prog_name="python -m balsam.demo")


if __name__ == "__main__":
    main()

"""Helpers shared by the launcher tests (imported by name: pytest's conftest modules are not)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import types
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import yaml

#: Sessions of the launcher tests' server expire after this many seconds without a heartbeat.
SESSION_EXPIRE_SEC = 4


def make_runnable(jobs: Iterable[Any]) -> list[int]:
    """Create jobs and move them to PREPROCESSED, as the processing module's default preprocess does."""
    from balsam.api import Job

    created = Job.objects.bulk_create(list(jobs))
    ids = [j.id for j in created]
    Job.objects.filter(id=ids).update(state="PREPROCESSED")
    return ids


def wait_for_states(ids: list[int], states: set[str], timeout: float = 60.0) -> dict[int, Any]:
    """Poll until every job is in one of ``states``; return {id: Job}."""
    from balsam.api import Job

    deadline = time.monotonic() + timeout
    while True:
        jobs = {j.id: j for j in Job.objects.filter(id=ids)}
        if all(str(j.state) in states for j in jobs.values()) and len(jobs) == len(ids):
            return jobs
        if time.monotonic() > deadline:
            summary = {i: str(j.state) for i, j in jobs.items()}
            raise AssertionError(f"jobs not in {sorted(states)} after {timeout} s: {summary}")
        time.sleep(0.2)


def events_of(ids: list[int]) -> dict[int, list[Any]]:
    """Each job's EventLog rows, oldest first."""
    from balsam.api import EventLog

    by_job: dict[int, list[Any]] = {i: [] for i in ids}
    for event in EventLog.objects.filter(job_id=ids):
        by_job[event.job_id].append(event)
    for rows in by_job.values():
        rows.sort(key=lambda e: (e.timestamp, e.id))
    return by_job


def mpi_mode(tmp_path: Any, cpus: int = 2, **settings: Any) -> Any:
    """An MPIMode on one node of ``cpus`` CPUs (default platform), with ``settings`` over the launcher defaults."""
    import types

    from balsam.builtin.default_platform import DefaultPlatform
    from balsam.config.schema import LauncherSettings
    from balsam.launcher.job_mode import LauncherContext
    from balsam.launcher.modes.mpi import MPIMode
    from balsam.platform import NodeInfo

    launcher = LauncherSettings(**settings) if settings else LauncherSettings()
    context = LauncherContext(site_config=None, settings=types.SimpleNamespace(launcher=launcher), site_id=1,
                              data_path=tmp_path, log_path=tmp_path, platform=DefaultPlatform(),
                              nodes=[NodeInfo("0", "h0", list(range(cpus)))], wall_time_min=10)
    return MPIMode(context)


def worker_rank_pid(path: Path) -> Optional[int]:
    """The serial worker of rank 1: the serial_worker process that has the rank's log open."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"balsam.launcher.modes.serial_worker" not in (entry / "cmdline").read_bytes():
                continue
            targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(t.startswith(str(path / "log")) and t.endswith(".1.log") for t in targets):
            return int(entry.name)
    return None


def rerun_timeouts_until_done(ids: list[int], timeout: float) -> set[int]:
    """Act as the processing module's default handle_timeout until every job is RUN_DONE: re-queue
    what comes back RUN_TIMEOUT. Returns the ids re-queued."""
    from balsam.api import Job

    requeued: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j.id: j for j in Job.objects.filter(id=ids)}
        timed_out = [j for j in jobs.values() if str(j.state) == "RUN_TIMEOUT"]
        for job in timed_out:
            job.state = "RESTART_READY"
        if timed_out:
            Job.objects.bulk_update(timed_out)
            requeued.update(j.id for j in timed_out)
        if all(str(j.state) == "RUN_DONE" for j in jobs.values()):
            return requeued
        assert time.monotonic() < deadline, {i: str(j.state) for i, j in jobs.items()}
        time.sleep(0.2)


class FakePool:
    """The pool interface MPIMode uses; a task 'runs' until finish() (or end(), which finishes it -15)."""

    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake
        self.running: dict[int, bool] = {}
        self.held: dict[int, float] = {}
        self.queued: dict[int, Any] = {}
        self.events = False
        self.can_queue = False
        self.exits: list[tuple[int, int, str, float]] = []
        self.starts: list[int] = []
        self.ended: list[int] = []
        self.terminated: list[list[int]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.running)

    def start(self, job_id: int, cmd: str, workdir: Any, env: dict, cpu_ids: Any = ()) -> None:
        assert job_id not in self.running, f"job {job_id} started while a run of it is running"
        self.running[job_id] = True
        self.starts.append(job_id)

    def job_ids(self) -> list[int]:
        return list(self.running)

    def end(self, ids: list[int], grace: float) -> None:
        for job_id in ids:
            if job_id in self.running:
                self.ended.append(job_id)
                self.finish(job_id, -15)

    def finish(self, job_id: int, rc: int = 0, tail: str = "") -> None:
        with self._lock:
            self.exits.append((job_id, rc, tail, time.time()))
        self.wake.set()

    def reap(self) -> list[tuple[int, int, str, float]]:
        with self._lock:
            out, self.exits = self.exits, []
        for record in out:
            self.running.pop(record[0], None)
        return out

    def cancel(self, job_id: int) -> None:
        pass

    def take_started(self) -> list:
        return []

    def take_dropped(self) -> list:
        return []

    def terminate_all(self, grace: float) -> tuple[list[int], list]:
        victims = list(self.running)
        self.terminated.append(victims)
        self.running.clear()
        return victims, []


class RecordingUpdater:
    """The updater interface MPIMode uses; it records every ``(job id, state)`` put in ``puts``
    (under the ``changed`` condition, notified on each put)."""

    gave_up = False

    def __init__(self) -> None:
        self.puts: list[tuple[int, str]] = []
        self.changed = threading.Condition()

    def put(self, job_id: int, state: Any, **kw: Any) -> None:
        with self.changed:
            self.puts.append((job_id, str(getattr(state, "value", state))))
            self.changed.notify_all()

    def put_updates(self, updates: list[dict]) -> None:
        for u in updates:
            self.put(u["id"], u["state"])

    def flush(self, timeout: Optional[float] = None) -> bool:
        return True

    def send_soon(self) -> None:
        pass

    def close(self) -> None:
        pass


class WholeNodePrep:
    """The preparer interface MPIMode uses: every job runs ``true`` and asks for the default demand."""

    def end_stale_runs(self, jobs: Any) -> None:
        pass

    def prepare(self, job: Any) -> Any:
        from balsam.launcher.app_run import PreparedJob
        from balsam.launcher.node_manager import Demand

        return PreparedJob(job=job, id=job.id, workdir=Path("."), cmdline="true", env={}, demand=Demand())


def fake_mpi_leases(mode: Any, pool: Any, preparer: Any, source: Any, updater: Any) -> None:
    """Gives ``mode`` (an MPIMode) ``pool`` and ``preparer``, no oversized probe, and leases that yield
    ``source`` and ``updater``: its loop then runs with no server."""
    mode.pool = pool
    mode.handover.pool = pool
    mode.preparer = preparer
    mode._probe_oversized = False

    @contextlib.contextmanager
    def lease() -> Iterator[tuple[Any, Any]]:
        yield source, updater

    mode.lease = lease


@contextlib.contextmanager
def mode_running(mode: Any, wait_sec: float = 30.0) -> Iterator[None]:
    """Runs ``mode``'s loop in a thread for the ``with`` block; then stops the mode and asserts the
    thread ended within ``wait_sec``."""
    thread = threading.Thread(target=mode.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        mode.request_stop("test over")
        thread.join(wait_sec)
        assert not thread.is_alive()


def synced_app(site_name: str, name: str, command_template: str) -> Any:
    """Syncs to site ``site_name`` an app named ``name`` running ``command_template``; returns its class."""
    from balsam.api import ApplicationDefinition

    app = type(name, (ApplicationDefinition,), {"site": site_name, "command_template": command_template})
    app.sync()
    return app


def run_counts(ids: list[int]) -> dict[int, int]:
    """How many times each job of ``ids`` (with events) went RUNNING, from its events."""
    return {job_id: sum(str(e.to_state) == "RUNNING" for e in rows) for job_id, rows in events_of(ids).items()}


def site_logs(site_path: Path) -> str:
    """The text of every file in the site's log folder, one after another."""
    import glob

    return "".join(open(f, errors="replace").read() for f in glob.glob(str(site_path / "log" / "*")))


def closed_port() -> int:
    """A local TCP port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_site(tmp_path: Path, api_root: str, **client_fields: Any) -> tuple[Path, dict[str, str]]:
    """A site directory (id 7, default platform, local scheduler) and a client file for ``api_root``
    (with ``client_fields``) under ``tmp_path``, no server needed to write them; then the site's path
    and the bare environment (no BALSAM_* of this process) a launcher run with them needs."""
    site = tmp_path / "site"
    site.mkdir()
    (site / ".balsam-site").write_text("7\n")
    settings = {"launcher": {"platform": "default"}, "scheduler": {"name": "local"}}
    (site / "settings.yml").write_text(yaml.safe_dump(settings))
    client = tmp_path / "client.yml"
    client.write_text(yaml.safe_dump({"api_root": api_root, "token": "t", "username": "u", **client_fields}))
    client.chmod(0o600)
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"], "BALSAM_HOME": str(tmp_path / "balsam-home"),
           "BALSAM_CLIENT_PATH": str(client), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return site, env


#: A task that counts its runs, writes its pid, and on SIGTERM says it saved its state and exits 1
#: (the spawner stop-signal tests: an app checkpointing as its allocation ends).
SAVES_AND_EXITS_1 = ("bash -c 'echo run >> runs; trap \"echo saved checkpoint; exit 1\" TERM; echo $$ > pid; "
                     "sleep 30 & wait'")


def wait_for_task_pid(path: Path) -> int:
    """The pid a task wrote to ``path`` (SAVES_AND_EXITS_1's ``pid``), once written."""
    deadline = time.monotonic() + 20
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, "the task did not start"
        time.sleep(0.01)
    return int(path.read_text())


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: its run ended, its parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it exited while being read
        return False


#: Generous, for the tests that watch a real launcher end a run: the outcome is waited for, never timed.
RUN_END_WAIT_SEC = 45


def wait_for(what, timeout: float = RUN_END_WAIT_SEC, message: str = "") -> None:
    """Poll ``what()`` until it is true; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, message or "condition not met"
        time.sleep(0.1)


class PreambleApp:
    """An app as JobPreparer loads one (``load_app``), for the shell-preamble tests: a subclass sets
    ``command``, ``preamble`` and, where its test needs one, its environment."""

    command: str = ""
    preamble: Any = ""

    def __init__(self, job: Any) -> None:
        self.job = job

    def get_arg_str(self) -> str:
        return self.command

    def get_environ_vars(self) -> dict:
        return {}

    def shell_preamble(self) -> Any:
        return self.preamble


def prepared_job(job_id: int, workdir: str, **fields: Any) -> Any:
    """A one-rank job as JobPreparer reads one (``fields`` adds or overrides attributes)."""
    return types.SimpleNamespace(**{
        "id": job_id, "app_id": job_id, "workdir": workdir, "num_nodes": 1, "ranks_per_node": 1,
        "threads_per_rank": 1, "threads_per_core": 1, "gpus_per_rank": 0, "node_packing_count": 1,
        "launch_params": {}, **fields})


def reap_all(pool: Any, tasks: Iterable[int], timeout: float = 30.0) -> dict[int, int]:
    """Reap ``pool`` (a launcher's ProcessPool or SpawnerPool) until every job id of ``tasks`` is
    reported: job id -> returncode."""
    done: dict[int, int] = {}
    tasks = set(tasks)
    deadline = time.monotonic() + timeout  # only keeps a broken test from hanging
    while len(done) < len(tasks) and time.monotonic() < deadline:
        time.sleep(0.01)
        for job_id, rc, _tail, _when in pool.reap():
            done[job_id] = rc
    assert set(done) == set(tasks), f"not reported: {set(tasks) - set(done)}"
    return done


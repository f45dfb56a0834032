"""A launcher SIGKILLed after its stop signal, before it reported its jobs (the batch system's kill
delay, Slurm's ``KillWait``, shorter than the launcher's grace plus its reporting).

Reproduced with real components: a real server (5-minute session expiry, its periodic sweep hourly),
a real launcher in mpi and serial mode (mpiexec, ranks, spawner) whose jobs ignore SIGTERM (``trap ''
TERM``, as a long checkpoint does), the allocation's SIGTERM to the launcher's process group, then
SIGKILL to every process of the launcher's tree and of its jobs, as Slurm does after ``KillWait``.
The jobs used to stay RUNNING until the Session expired (5 minutes); the launcher now announces
its end at the SIGTERM (balsam.client.lease, "An announced end"), so the stored expiry is within
``ENDING_IN_SEC`` of the kill and the server's own sweep times the jobs out then. Asserted on the
Session's stored expiry and the jobs' states, not on durations (the time from the kill to the
RUN_TIMEOUT is printed).
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from launcher_harness import start_launcher
from launcher_helpers import events_of, make_runnable, wait_for_states

pytestmark = [pytest.mark.mpi]

EXPIRE_SEC = 300  # the server's default: a killed launcher's jobs waited this long
#: The time left a stopping launcher announces: balsam.client.lease.ENDING_IN_SEC, read from the
#: launcher under test (its tests' bounds follow it); 10 s against a launcher without it, so that
#: the test runs, and fails on its assertions, there.
ENDING_IN_SEC = float(getattr(importlib.import_module("balsam.client.lease"), "ENDING_IN_SEC", 10.0))


@pytest.fixture(scope="module")
def _default_expiry_server(live_server_factory: Any) -> Any:
    return live_server_factory(env={"BALSAM_SESSION_EXPIRE_SEC": str(EXPIRE_SEC), "BALSAM_SESSION_SWEEP_SEC": "3600"})


@pytest.fixture
def live_server(_default_expiry_server: Any, request: pytest.FixtureRequest) -> str:
    request.node._balsam_live_server = _default_expiry_server
    return _default_expiry_server.url


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdecimal():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _tree(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(tree.get(p, []))
    return found


def _kill_everything(launcher_pid: int, job_pids: list[int]) -> None:
    """SIGKILL every process of the allocation: the batch system's kill after its delay."""
    for pid in _tree(launcher_pid) + [q for p in job_pids for q in _tree(p)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in job_pids:  # each job's group (its own): what the tree walk may have missed
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _sessions() -> list[dict]:
    from balsam._api.model import get_default_client

    return get_default_client().get("/sessions/")["results"]


def _expiry(session: dict) -> dt.datetime:
    beat = dt.datetime.fromisoformat(session["heartbeat"]).replace(tzinfo=dt.timezone.utc)
    return beat + dt.timedelta(seconds=EXPIRE_SEC)


@pytest.mark.parametrize("mode", ["mpi", "serial"])
def test_a_launcher_killed_after_its_stop_signal_leaves_its_jobs_to_a_prompt_session_expiry(mode: str, new_site: Any) -> None:
    from balsam.api import ApplicationDefinition
    from balsam.server.jobs_logic import SESSION_EXPIRED_MSG

    name, path = new_site(idle_ttl_sec=120)

    class Stubborn(ApplicationDefinition):
        site = name
        command_template = "bash -c 'echo $$ > pid; trap \"\" TERM; sleep 300 & wait; sleep 300'"

    Stubborn.sync()
    ids = make_runnable([Stubborn.submit(workdir=f"k/{i}", node_packing_count=2, save=False) for i in range(2)])
    proc = start_launcher(path, mode, 10, tick_sec=30)
    killed = False
    job_pids: list[int] = []
    try:
        pid_files = [path / "data" / "k" / str(i) / "pid" for i in range(2)]
        deadline = time.monotonic() + 60
        while not all(p.exists() and p.read_text().strip() for p in pid_files):
            assert time.monotonic() < deadline and proc.poll() is None, Path(proc.console_path).read_text()[-3000:]
            time.sleep(0.05)
        job_pids = [int(p.read_text()) for p in pid_files]
        wait_for_states(ids, {"RUNNING"}, timeout=30)
        os.killpg(proc.pid, signal.SIGTERM)  # the allocation's end: the jobs ignore it, the launcher waits its grace
        # The launcher's stop is under way (its grace is 10 s): what has it told the server by now?
        # Looked at until the stored expiry is short, or for 5 s (the announcement goes out at once).
        look_until = time.monotonic() + 5
        while time.monotonic() < look_until:
            now = dt.datetime.now(dt.timezone.utc)
            if _sessions() and all(_expiry(s) <= now + dt.timedelta(seconds=ENDING_IN_SEC + 1) for s in _sessions()):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the launcher ended before the kill: " + Path(proc.console_path).read_text()[-3000:]
        _kill_everything(proc.pid, job_pids)
        killed_at = dt.datetime.now(dt.timezone.utc)
        killed_mono = time.monotonic()
        killed = True
        proc.wait(10)
        # What the server holds now: each of the launcher's Sessions expires within ENDING_IN_SEC of
        # its last heartbeat (before: a full EXPIRE_SEC after it, its jobs RUNNING all that time).
        sessions = _sessions()
        assert sessions, "the launcher's Session is gone: its jobs were reported before the kill"
        for session in sessions:
            assert _expiry(session) <= killed_at + dt.timedelta(seconds=ENDING_IN_SEC + 1), (
                session, killed_at, Path(proc.console_path).read_text()[-3000:])
        # And the server's own sweep (its periodic one is hourly here) times the jobs out then.
        jobs = wait_for_states(ids, {"RUN_TIMEOUT", "RESTART_READY"}, timeout=ENDING_IN_SEC + 30)
        print(f"{mode}: kill to RUN_TIMEOUT {time.monotonic() - killed_mono:.1f} s (session expiry {EXPIRE_SEC} s)")
        assert len(jobs) == len(ids)
        for job_id, rows in events_of(ids).items():
            ends = [e for e in rows if str(e.from_state) == "RUNNING"]
            assert [str(e.to_state) for e in ends] == ["RUN_TIMEOUT"], (job_id, [(e.to_state, e.data) for e in rows])
            assert ends[0].data.get("message") == SESSION_EXPIRED_MSG, ends[0].data
    finally:
        if not killed:
            _kill_everything(proc.pid, job_pids)
            proc.wait(10)


# -- the lease's side, against the real server ------------------------------------------------------

class _OlderServer:
    """The real client, answering as a server that does not know ``ending_in_sec`` (this project's
    earlier ones ignore the field; Balsam 0.7's tick reads no body): the field is not sent on, and
    the answer has no ``expires``."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.bodies: list[dict] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        self.bodies.append(dict(json or {}))
        body = {k: v for k, v in (json or {}).items() if k != "ending_in_sec"}
        answer = self._client.put(path, json=body, **kw)
        return {k: v for k, v in answer.items() if k != "expires"}


def _site_id(new_site: Any) -> int:
    _name, path = new_site()
    return int((path / ".balsam-site").read_text())


def test_announce_end_shortens_the_sessions_expiry_at_once_and_stops_acquiring(new_site: Any) -> None:
    from balsam._api.model import get_default_client
    from balsam.client.lease import JobLease

    site_id = _site_id(new_site)
    lease = JobLease(get_default_client(), site_id, tick_period=3600)
    try:
        before = [s for s in _sessions() if s["id"] == lease.session_id]
        assert _expiry(before[0]) > dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=EXPIRE_SEC - 30)
        asked = dt.datetime.now(dt.timezone.utc)
        lease.announce_end()
        look_until = time.monotonic() + 20  # the heartbeat thread sends it at once; bounded against a hang
        while time.monotonic() < look_until:
            session = [s for s in _sessions() if s["id"] == lease.session_id][0]
            if _expiry(session) <= asked + dt.timedelta(seconds=ENDING_IN_SEC + 1):
                break
            time.sleep(0.05)
        assert _expiry(session) <= asked + dt.timedelta(seconds=ENDING_IN_SEC + 1), session
        assert lease.acquire(5) == []  # nothing leased to a launcher that is ending
    finally:
        lease.close()


def test_a_session_gone_after_the_announced_end_is_not_replaced(new_site: Any) -> None:
    from balsam._api.model import get_default_client
    from balsam.client.lease import JobLease

    client = get_default_client()
    site_id = _site_id(new_site)
    lease = JobLease(client, site_id, tick_period=3600, heartbeat_thread=False)
    first = lease.session_id
    lease.announce_end()
    lease.tick_if_due()  # the announcement (a lease without its thread: at its owner's call)
    client.delete(f"/sessions/{first}")  # as the server's sweep does at the announced moment
    assert lease.tick() == []
    assert lease.session_id == first and [s["id"] for s in _sessions()] == []  # no new Session opened
    lease.close()


def test_an_older_server_is_tolerated_with_one_info_line(new_site: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from balsam._api.model import get_default_client
    from balsam.client.lease import JobLease

    older = _OlderServer(get_default_client())
    site_id = _site_id(new_site)
    lease = JobLease(older, site_id, tick_period=3600, heartbeat_thread=False)
    with caplog.at_level(logging.INFO, logger="balsam.client.lease"):
        lease.announce_end()
        lease.tick_if_due()
        lease.tick()
    notes = [r for r in caplog.records if "does not take an announced end" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO, [r.getMessage() for r in caplog.records]
    assert [("ending_in_sec" in b) for b in older.bodies] == [True, False]  # asked once, then plain heartbeats
    session = [s for s in _sessions() if s["id"] == lease.session_id][0]
    assert _expiry(session) > dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=EXPIRE_SEC - 30)  # as before
    lease.close()

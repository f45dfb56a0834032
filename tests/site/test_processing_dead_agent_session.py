"""The next agent ends a dead agent's processing Session itself where that agent certainly died (on
this host, its pid gone), once the dead agent's recorded hook results are sent: its jobs are taken
at once, not after the Session's expiry (minutes in real use; ``SESSION_EXPIRE_SEC`` here, longer
than the wait below, so the code before this change fails the first test by its wait).

Real server (SQLite, PostgreSQL), real agents' processing modules in processes of their own (the
audit test's loop), real hook workers. Agent A is SIGKILLed while one hook hangs (the jobs behind it
in its chunk not started); agent B starts at once. What holds: B takes A's jobs, ending A's Session
(its log says so); every job gets its preprocess result once (one STAGED_IN -> PREPROCESSED
transition each); only the hook running at the kill ran twice (docs/reliability.md: at least once).
An agent of another host, taken for dead from its silent lock file only, keeps its Session (it may
live, cut off): the second test.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import pytest

from site_test_utils import job_rows
from test_processing_at_scale_audit import _lines, _process_gone, _start, job_events

pytestmark = pytest.mark.slow

#: Longer than WAIT_SEC: B takes A's jobs within it only if it ends A's Session itself.
SESSION_EXPIRE_SEC = 120
WAIT_SEC = 60
JOBS = 20
HANG = 8  # this job's preprocess hangs under A (until A's kill), not under B
#: processing.HOOK_RESULTS_DIR, spelled out: the test also runs against older code.
HOOK_RESULTS_DIR = "hook-results"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def _long_expiry_server(request: pytest.FixtureRequest, live_server_factory: Any) -> Any:
    return live_server_factory(database=request.param,
                               env={"BALSAM_SESSION_EXPIRE_SEC": str(SESSION_EXPIRE_SEC), "BALSAM_SESSION_SWEEP_SEC": "1"})


@pytest.fixture
def live_server(_long_expiry_server: Any, request: pytest.FixtureRequest) -> str:
    request.node._balsam_live_server = _long_expiry_server
    return _long_expiry_server.url


def _app(site_id: int) -> Any:
    from balsam.api import ApplicationDefinition

    class Hang(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def _note(self, what):
            import os
            from pathlib import Path
            fd = os.open(str(Path.cwd().parent / "hooks.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(fd, f"{what} {self.job.id} {os.getpid()} {self.job.data['i']}\n".encode())
            os.close(fd)

        def preprocess(self):
            import os
            import time
            from pathlib import Path
            self._note("pre-start")
            if self.job.data["i"] == 8:  # HANG (the app is shipped as source: no module globals)
                try:  # the first run only (A's): hangs until A's kill ends its worker
                    os.close(os.open(str(Path.cwd().parent / "hung"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    time.sleep(3600)
                except FileExistsError:
                    pass
            self._note("pre-done")
            self.job.state = "PREPROCESSED"

    Hang.sync()
    return Hang


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.2)


def test_next_agent_ends_a_dead_agents_session(make_site, client, tmp_path) -> None:
    from balsam.api import Job

    out = tmp_path / "out"
    out.mkdir()
    site = make_site(overrides={"processing": {"num_workers": 2, "hook_timeout_sec": 3600}})
    app = _app(site.site_id)
    jobs = Job.objects.bulk_create([Job(f"j/{i}", app, data={"i": i}) for i in range(JOBS)])
    ids = sorted(j.id for j in jobs)
    by_id = {j.id: int(j.data["i"]) for j in jobs}
    hooks_log = Path(site.data_path) / "j/hooks.log"

    a = _start(site, out, "A")
    b = None
    try:
        _wait(lambda: any(l[0] == "pre-start" and l[3] == str(HANG) for l in _lines(hooks_log)), 120, "the hang")
        time.sleep(1.5)  # the other chunks' quick hooks complete
        a.send_signal(signal.SIGKILL)
        a.wait(30)
        at_kill = _lines(hooks_log)
        _wait(lambda: all(_process_gone(int(l[2])) for l in at_kill), 30, "A's hook workers gone")
        at_kill = _lines(hooks_log)
        started = {int(l[1]) for l in at_kill if l[0] == "pre-start"}
        done = {int(l[1]) for l in at_kill if l[0] == "pre-done"}
        assert {by_id[i] for i in started - done} == {HANG}, at_kill  # the hang runs at the kill
        t_b = time.monotonic()
        b = _start(site, out, "B")
        # A's jobs: the hung one and those never started (held by A's Session, behind it).
        a_jobs = set(ids) - done
        _wait(lambda: any(l[0] == "pre-start" and int(l[1]) in a_jobs for l in _lines(hooks_log)[len(at_kill):]),
              WAIT_SEC, "B takes A's jobs")
        print(f"B took A's jobs {time.monotonic() - t_b:.1f} s after its start (A's Session expires after "
              f"{SESSION_EXPIRE_SEC} s)")
        _wait(lambda: all(r["state"] == "PREPROCESSED" for r in job_rows(client, site_id=site.site_id)), WAIT_SEC,
              "every job preprocessed")
        (out / "stop").write_text("")
        b.wait(60)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    log_b = (out / "agent-B.log").read_text()
    assert "ended session" in log_b and "of the stopped agent" in log_b, log_b[-3000:]
    lines = _lines(hooks_log)
    starts = Counter(int(l[1]) for l in lines if l[0] == "pre-start")
    # Each hook ran once, but the one running at the kill (at least once).
    assert {by_id[i] for i, n in starts.items() if n > 1} <= {HANG}, starts
    assert set(starts) == set(ids), starts
    transitions = Counter((e["job_id"], e["from_state"], e["to_state"])
                          for e in job_events(client, job_id=",".join(map(str, ids))))
    assert [k for k, n in transitions.items() if n > 1] == [], transitions
    assert sum(1 for k in transitions if k[2] == "PREPROCESSED") == JOBS, transitions


def _session_exists(client: Any, session_id: int) -> bool:
    return client.get("/sessions/", params={"id": session_id})["count"] == 1


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _dead_folder(site: Any, name: str, session_id: int, *, silent: bool, boot: Optional[str] = "this",
                 results_of: Optional[int] = None, age: float = 86400) -> Path:
    """A results folder as a dead agent left it: its lock file unlocked, naming its host's boot id
    (``boot``: "this" kernel's, another, or None: a lock file of the version before boot ids, whose
    bare id line is not ended) and its Session; ``results_of``: an (empty) results file under that
    session (whose session is ended where its agent certainly died, also by the code before)."""
    folder = site.spool_path / HOOK_RESULTS_DIR / name
    folder.mkdir(parents=True)
    lock = folder.parent / f"{name}.lock"
    if boot is None:
        lock.write_text(f"{session_id}\n")
    else:
        lock.write_text(f"boot {_boot_id() if boot == 'this' else boot}\nprocessing {session_id}\n")
    if results_of is not None:
        (folder / f"0-s{results_of}.jsonl").write_text("")
    if silent:  # untouched for ``age`` (a day: past any agent silence limit)
        os.utime(lock, (time.time() - age, time.time() - age))
    return folder


def test_only_a_certainly_dead_agents_session_is_ended(make_site, client) -> None:
    from balsam.site.modules.processing import ProcessingModule

    site = make_site()
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is gone
    local = client.post("/sessions/", json={"site_id": site.site_id})["id"]
    remote = client.post("/sessions/", json={"site_id": site.site_id})["id"]
    local_folder = _dead_folder(site, f"{socket.gethostname()}-{dead.pid}-{time.time_ns()}", local, silent=False)
    remote_folder = _dead_folder(site, f"other-host.example-4242-{time.time_ns()}", remote, silent=True)
    module = ProcessingModule(site, site.settings.processing, client)
    try:
        module.run_cycle()
    finally:
        module.close()
    # Both folders were taken for dead agents' (and dropped, nothing in them to send)...
    assert not local_folder.exists() and not remote_folder.exists()
    # ...but only the one of this host, its pid gone, had its Session ended.
    assert not _session_exists(client, local)
    assert _session_exists(client, remote)
    client.delete(f"/sessions/{remote}")


def test_a_session_is_ended_only_for_an_agent_of_this_kernel(make_site, client) -> None:
    """A folder named for this host whose pid is gone is a dead agent's of this kernel only if its
    lock file names this kernel's boot id: another node of the same host name (flock seen on one
    node only) has another, and its agent may live. A lock file without a boot id (the version
    before) counts only once silent for 3 x LOCK_TOUCH_SEC, and only its results files' sessions
    are ended (its bare id lines are not: any line not marked ``processing`` is ignored)."""
    from balsam.site.modules.processing import ProcessingModule

    site = make_site()
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is gone
    new = lambda: client.post("/sessions/", json={"site_id": site.site_id})["id"]  # noqa: E731
    here = f"{socket.gethostname()}-{dead.pid}"
    same_kernel, other_kernel, old_silent, old_bare, old_fresh = new(), new(), new(), new(), new()
    _dead_folder(site, f"{here}-{time.time_ns()}", same_kernel, silent=False)
    # The other node's agent, its lock touched now: also its results file's session is kept.
    _dead_folder(site, f"{here}-{time.time_ns()}", other_kernel, silent=False,
                 boot="00000000-0000-0000-0000-000000000000", results_of=other_kernel)
    _dead_folder(site, f"{here}-{time.time_ns()}", old_bare, silent=True, age=60, boot=None, results_of=old_silent)
    _dead_folder(site, f"{here}-{time.time_ns()}", old_fresh, silent=False, boot=None, results_of=old_fresh)
    module = ProcessingModule(site, site.settings.processing, client)
    try:
        module.run_cycle()
    finally:
        module.close()
    ended = {s for s in (same_kernel, other_kernel, old_silent, old_bare, old_fresh) if not _session_exists(client, s)}
    assert ended == {same_kernel, old_silent}, {"same_kernel": same_kernel, "other_kernel": other_kernel,
                                                "old_silent": old_silent, "old_bare": old_bare,
                                                "old_fresh": old_fresh, "ended": ended}
    for s in (other_kernel, old_bare, old_fresh):
        client.delete(f"/sessions/{s}")


def test_the_whole_lock_file_is_read(tmp_path: Path) -> None:
    """The newest session is noted last: a lock file past 64 KiB still names it."""
    from balsam.site.modules import processing

    lock_path = tmp_path / "a.lock"
    lines = ["boot b-1"] + [f"processing {i}" for i in range(1, 12001)] + ["12", "launcher 5", "processing 20077"]
    lock_path.write_text("\n".join(lines) + "\nprocessing 9")  # the last line torn
    assert lock_path.stat().st_size > 1 << 16
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        boot, sessions = processing._lock_record(fd)
    finally:
        os.close(fd)
    assert boot == "b-1"
    assert sessions == list(range(1, 12001)) + [20077]


def _noted_app(site_id: int) -> Any:
    from balsam.api import ApplicationDefinition

    class Noted(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def preprocess(self):
            import os
            from pathlib import Path
            fd = os.open(str(Path.cwd().parent / "hooks.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(fd, f"pre {self.job.id}\n".encode())
            os.close(fd)
            self.job.state = "PREPROCESSED"

    Noted.sync()
    return Noted


def test_a_spooled_result_of_the_dead_session_is_sent_before_it_ends(make_site, client) -> None:
    """rev8's repro: a dead agent's Session S holds a job whose hook completed; its result is in the
    site's spool (the dead agent's updater spooled it in an outage). The next agent's spool replay
    claims the file (renamed ``*.jsonl.claimed-...``) and queues it on its updater's thread in the
    same cycle that finds the dead folder: S must be ended only after that result is sent, else the
    server refuses it (S no longer holds the job) and the hook runs again."""
    from balsam.api import Job
    from balsam.client.lease import JobLease
    from balsam.client.status_updater import SESSION_KEY, write_spool
    from balsam.site.modules.processing import ProcessingModule
    from balsam.states import PROCESSABLE_STATES

    site = make_site()
    app = _noted_app(site.site_id)
    job = Job.objects.create(workdir="r/0", app_id=app.__app_id__)
    (Path(site.data_path) / "r/0").mkdir(parents=True, exist_ok=True)
    lease = JobLease(client, site.site_id, states=PROCESSABLE_STATES, name="processing session", heartbeat_thread=False)
    assert [j["id"] for j in lease.acquire(10)] == [job.id]
    dead_session = lease.session_id
    write_spool(site.spool_path, [{"id": job.id, "state": "PREPROCESSED", "state_timestamp": time.time(),
                                   SESSION_KEY: dead_session}])
    dead = subprocess.Popen(["true"])
    dead.wait()
    # Its results file names S too: the code before boot ids ends S as well (the test fails there).
    _dead_folder(site, f"{socket.gethostname()}-{dead.pid}-{time.time_ns()}", dead_session, silent=False,
                 results_of=dead_session)
    module = ProcessingModule(site, site.settings.processing, client)
    try:
        module.run_cycle()
        module.flush(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (Job.objects.get(id=job.id).state != "PREPROCESSED"
                                               or _session_exists(client, dead_session)):
            module.run_cycle()
            module.flush(5)
            time.sleep(0.2)
    finally:
        module.close()
    hooks = Path(site.data_path) / "r/hooks.log"
    assert not hooks.exists(), "the hook ran again: the spooled result was refused after the session's DELETE"
    assert Job.objects.get(id=job.id).state == "PREPROCESSED"
    transitions = [(e["from_state"], e["to_state"]) for e in client.get("/events/", params={"job_id": job.id})["results"]]
    assert transitions.count(("STAGED_IN", "PREPROCESSED")) == 1, transitions
    assert not _session_exists(client, dead_session), "the dead agent's Session was not ended once its spool was sent"

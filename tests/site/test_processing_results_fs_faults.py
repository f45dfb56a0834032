"""The processing module's hook results folder (``<site>/spool/hook-results/<host>-<pid>-<ns>/`` and
its ``.lock``) on file systems that do not behave, and the replay of a dead agent's folder.

- ``flock`` refused (Lustre ``noflock``: ENOSYS; some FUSE/DVS mounts) or a full disk (mkdir
  ENOSPC): every submit of a hook job raised, each cycle re-raised it, and the acquired jobs stayed
  leased and were never processed. Now one WARNING and a folder in /tmp (or no results files).
- The lock file was created, then locked: a starting agent's recovery could take it in between,
  find no folder and delete it. Now it is locked under another name, then renamed.
- With node-local locks (Lustre ``localflock``, NFS ``local_lock=flock``) an agent on another host
  saw a live agent's folder unlocked, replayed and deleted it. Now a folder of another host also
  needs a lock file untouched for the agent silence limit; one of this host, a pid that is gone.
- A server older than leases (the updater then strips ``session_id``) would apply a dead agent's
  results unchecked: they are dropped instead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from balsam.client.rest import RESTClient
from balsam.site.modules import processing
from balsam.site.modules.processing import ProcessingModule
from site_test_utils import job_rows

HOOK_RESULTS_DIR = "hook-results"
WARNING = "cannot keep the hook results in"


# -- a hook job processed on a site whose results folder cannot be made --------------------------------

def _hook_app(site_id: int) -> Any:
    from balsam.api import ApplicationDefinition

    class Hooked(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def postprocess(self):
            self.job.state = "POSTPROCESSED"

    Hooked.sync()
    return Hooked


def _run_done_job(client: Any, site: Any) -> int:
    from balsam.api import Job

    job = Job.objects.create(workdir="h/0", app_id=_hook_app(site.site_id).__app_id__)
    (Path(site.data_path) / "h/0").mkdir(parents=True)
    session = client.post("/sessions/", json={"site_id": site.site_id})["id"]
    client.patch("/jobs/", json=[{"id": job.id, "state": "PREPROCESSED"}])
    client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})
    client.patch("/jobs/", json=[{"id": job.id, "state": "RUNNING"}])
    client.patch("/jobs/", json=[{"id": job.id, "state": "RUN_DONE"}])
    client.delete(f"/sessions/{session}")
    return job.id


def _flock_enosys(fd: int, operation: int) -> None:
    raise OSError(errno.ENOSYS, "Function not implemented")


def _no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    # The module's name only: the rest of the process (the forkserver, the server) keeps flock.
    fake = types.SimpleNamespace(flock=_flock_enosys, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, LOCK_UN=fcntl.LOCK_UN)
    monkeypatch.setattr(processing, "fcntl", fake)


def _full_disk_under(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    mkdir = pathlib.Path.mkdir

    def full(self: Path, *args: Any, **kwargs: Any) -> None:
        if str(self).startswith(str(root)):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", full)


def _no_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(processing, "tempfile", types.SimpleNamespace(mkdtemp=mkdtemp, gettempdir=tempfile.gettempdir),
                        raising=False)


@pytest.mark.parametrize("fault", ["flock ENOSYS", "mkdir ENOSPC", "flock ENOSYS and no /tmp"])
def test_a_hook_job_is_processed_where_the_results_folder_cannot_be_made(make_site, client, monkeypatch, caplog,
                                                                         fault) -> None:
    site = make_site()
    job_id = _run_done_job(client, site)
    if "flock" in fault:
        _no_flock(monkeypatch)
    else:
        _full_disk_under(monkeypatch, Path(site.spool_path) / HOOK_RESULTS_DIR)
    if "no /tmp" in fault:
        _no_tmp(monkeypatch)
    module = ProcessingModule(site, site.settings.processing, client)
    caplog.set_level(logging.WARNING, logger="balsam.site.modules.processing")
    state = None
    try:
        deadline = time.monotonic() + 60  # only keeps a broken test from hanging
        cycles = 0
        while time.monotonic() < deadline:
            module.run_cycle()  # raised the OSError every cycle
            module.flush()
            cycles += 1
            state = job_rows(client, id=[job_id])[0]["state"]
            if state == "JOB_FINISHED":
                break
            time.sleep(0.1)
        assert state == "JOB_FINISHED", fault
        warnings = [r for r in caplog.records if WARNING in r.getMessage()]
        assert len(warnings) == 1, (cycles, [r.getMessage() for r in warnings])
        if "no /tmp" in fault:
            assert module._results_dir is None
            # The worker got no path (not "None": a file of that name in its working directory).
            assert not (Path.cwd() / "None").exists()
        else:
            assert module._results_dir is not None and not str(module._results_dir).startswith(str(site.spool_path))
        fallback = module._results_dir
    finally:
        module.close()
    assert fallback is None or not fallback.exists(), "the /tmp folder goes with the agent"


# -- recovery, without a server ------------------------------------------------------------------------

class _Client:
    """Records the bulk PATCHes; ``old_server``: refuses ``session_id`` as an unknown field, as a
    server older than leases does."""

    def __init__(self, old_server: bool = False) -> None:
        self.old_server = old_server
        self.applied: list[dict] = []

    def patch(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        if self.old_server and any("session_id" in u for u in json):
            error = RuntimeError("422 unknown field")
            error.status_code = 422  # type: ignore[attr-defined]
            error.detail = [{"loc": ["body", 0, "session_id"], "msg": "unknown field"}]  # type: ignore[attr-defined]
            raise error
        self.applied.extend(json)
        return len(json)


def _module(tmp_path: Path, client: Any = None) -> ProcessingModule:
    site = types.SimpleNamespace(site_path=tmp_path, spool_path=tmp_path / "spool", data_path=tmp_path / "data",
                                 site_id=1)
    return ProcessingModule(site, processing.ProcessingSettings(), client or _Client())


def _dead_folder(module: ProcessingModule, name: str, job_id: int = 5, session: int = 7) -> tuple[Path, Path]:
    """A results folder with one completed hook's result, and its lock file, unlocked."""
    parent = module.hook_results_path
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / f"0-s{session}.jsonl").write_text(json.dumps({"start": job_id, "pid": 1}) + "\n" + json.dumps(
        {"id": job_id, "state": "POSTPROCESSED", "state_timestamp": "2026-12-05T00:00:00"}) + "\n")
    lock = parent / f"{name}.lock"
    lock.touch()
    return folder, lock


def _recover(module: ProcessingModule) -> list[dict]:
    module._updater()
    module._recover_results()
    for updater in (getattr(module, "replay_updater", None), module.updater):
        if updater is not None:
            assert updater.flush(10)
    module._retire()
    return module.client.applied


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def module(tmp_path: Path) -> Any:
    made = _module(tmp_path)
    yield made
    made.close()


def test_a_live_agents_locked_folder_is_not_replayed(module) -> None:
    folder, lock_path = _dead_folder(module, f"{socket.gethostname()}-{_dead_pid()}-{time.time_ns()}")
    lock = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: as another agent holds it
        assert _recover(module) == []
        assert folder.is_dir() and lock_path.exists()
    finally:
        os.close(lock)


def test_an_unlocked_folder_of_a_dead_agent_of_this_host_is_replayed(module) -> None:
    folder, lock_path = _dead_folder(module, f"{socket.gethostname()}-{_dead_pid()}-{time.time_ns()}")
    assert [(u["id"], u["state"], u["session_id"]) for u in _recover(module)] == [(5, "POSTPROCESSED", 7)]
    assert not folder.exists() and not lock_path.exists()


def test_an_unlocked_folder_of_a_live_pid_of_this_host_is_not_replayed(module) -> None:
    """A lock seen free where its agent's pid still runs (a file system that ignores flock)."""
    folder, lock_path = _dead_folder(module, f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}")
    assert _recover(module) == []
    assert folder.is_dir() and lock_path.exists()


def test_a_pid_reused_by_a_later_process_is_a_dead_agent(module) -> None:
    # This process started after the folder's time: another process had its pid then.
    folder, _ = _dead_folder(module, f"{socket.gethostname()}-{os.getpid()}-1000000000")
    assert [u["id"] for u in _recover(module)] == [5]
    assert not folder.exists()


def test_another_hosts_folder_is_replayed_only_once_its_lock_is_silent(module) -> None:
    """Node-local locks: the lock of a live agent on another host is seen free here. Its lock
    file's mtime (touched every LOCK_TOUCH_SEC by its agent) says it lives."""
    folder, lock_path = _dead_folder(module, f"other-login-2.example-{os.getpid()}-{time.time_ns()}")
    assert _recover(module) == []
    assert folder.is_dir() and lock_path.exists()

    module._recovered = False
    silent = time.time() - 3600  # well past the agent silence limit (minutes)
    os.utime(lock_path, (silent, silent))
    assert [u["id"] for u in _recover(module)] == [5]
    assert not folder.exists() and not lock_path.exists()


def test_the_agent_touches_its_lock_file(module, monkeypatch) -> None:
    path = module._make_results_dir()
    lock_path = path.parent / f"{path.name}.lock"
    old = time.time() - 3600
    os.utime(lock_path, (old, old))
    module._touched = time.monotonic() - 60  # LOCK_TOUCH_SEC ago and more
    getattr(module, "_touch_lock", lambda: None)()
    assert time.time() - lock_path.stat().st_mtime < 60


def test_a_starting_agents_recovery_never_sees_a_new_lock_file_unlocked(tmp_path: Path, monkeypatch) -> None:
    """Between the lock file's creation and its flock, another agent's recovery took the lock,
    found no folder and deleted the lock file: the new agent's folder then had none."""
    starting, recovering = _module(tmp_path), _module(tmp_path)
    seen: list[list[str]] = []
    real_flock = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if not seen:  # the starting agent's own lock: the other agent's recovery runs just before it
            seen.append(sorted(p.name for p in starting.hook_results_path.glob("*.lock")))
            recovering._updater()
            recovering._recover_results()
        real_flock(fd, operation)

    monkeypatch.setattr(processing, "fcntl", types.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX,
                                                                   LOCK_NB=fcntl.LOCK_NB))
    try:
        path = starting._make_results_dir()
        assert seen == [[]], "no <agent>.lock exists before it is locked"
        assert (path.parent / f"{path.name}.lock").exists()
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name, f"{path.name}.lock"]
    finally:
        starting.close()
        recovering.close()


def test_replayed_results_are_not_sent_without_their_session_to_an_older_server(tmp_path: Path, caplog) -> None:
    """The updater's older-server fallback strips ``session_id``: a dead agent's result would be
    applied unchecked (over the job's next run). It is dropped; the folder goes."""
    module = _module(tmp_path, _Client(old_server=True))
    try:
        folder, lock_path = _dead_folder(module, f"{socket.gethostname()}-{_dead_pid()}-{time.time_ns()}")
        assert _recover(module) == []
        assert not folder.exists() and not lock_path.exists()
        # The module's own results still go (the older server has no check to lose for them).
        module._send([{"id": 9, "state": "POSTPROCESSED"}])
        assert module.updater is not None and module.updater.flush(10)
        assert [u["id"] for u in module.client.applied] == [9]
    finally:
        module.close()


# -- review of 4bea6b2: re-checks, the toucher thread, the replay updater, clock skew, .lock.new -------

def test_a_folder_skipped_as_fresh_is_replayed_once_its_agent_falls_silent(module, monkeypatch) -> None:
    """Recovery ran in the first cycle only: another host's folder seen "fresh" then (a prompt
    ``site start`` elsewhere) was never looked at again, and its hooks ran again."""
    monkeypatch.setattr(processing, "LOCK_TOUCH_SEC", 0.0)
    folder, lock_path = _dead_folder(module, f"other-login-2.example-{os.getpid()}-{time.time_ns()}")
    assert _recover(module) == []
    silent = time.time() - 3600
    os.utime(lock_path, (silent, silent))
    getattr(module, "_recheck_skipped", lambda: None)()  # what each cycle does after the first
    assert _recover_flushed(module) == [5]
    assert not folder.exists() and not lock_path.exists()


def _recover_flushed(module: ProcessingModule) -> list[int]:
    if module.replay_updater is not None:
        assert module.replay_updater.flush(10)
    module._retire()
    return [u["id"] for u in module.client.applied]


def test_the_lock_is_touched_by_a_thread_while_no_cycle_runs(module, monkeypatch) -> None:
    """Touched from run_cycle only, a cycle blocked for minutes (API outage retries) made the agent
    look dead to the agents of other hosts."""
    monkeypatch.setattr(processing, "LOCK_TOUCH_SEC", 0.05)
    path = module._make_results_dir()
    lock_path = path.parent / f"{path.name}.lock"
    old = time.time() - 3600
    os.utime(lock_path, (old, old))
    deadline = time.monotonic() + 5
    while time.time() - lock_path.stat().st_mtime > 60 and time.monotonic() < deadline:
        time.sleep(0.05)  # this thread is "the blocked cycle": it never calls the module
    assert time.time() - lock_path.stat().st_mtime < 60
    module.close()
    assert not [t for t in threading.enumerate() if t.name == "processing-lock-touch"]


class _Rest(RESTClient):
    """A RESTClient that records the keyword arguments of its PATCHes (the updater's own call)."""

    def __init__(self) -> None:  # no connection
        self.calls: list[dict] = []
        self.applied: list[dict] = []

    def __repr__(self) -> str:
        return f"_Rest(calls={self.calls})"

    def patch(self, path: str, json: Any = None, params: Any = None, **kw: Any) -> Any:
        self.calls.append(kw)
        self.applied.extend(json)
        return len(json)


def test_replayed_results_go_through_the_updaters_own_patch(tmp_path: Path) -> None:
    """The replay updater's send= hook bypassed its PATCH: no Idempotency-Key, and full client
    retries while stopping (a 5 s give-up that took 35 s, sends after the locks were let go)."""
    module = _module(tmp_path, _Rest())
    try:
        _dead_folder(module, f"{socket.gethostname()}-{_dead_pid()}-{time.time_ns()}")
        assert [u["id"] for u in _recover(module)] == [5]
        assert module.client.calls and module.client.calls[0].get("idempotency_key")
        assert module.replay_updater is None, "closed once nothing is left to recover"
        replay = module._replay_updater()
        replay._stopping = True
        replay._patch([{"id": 6, "state": "POSTPROCESSED", "session_id": 7}], "key")
        # No deadline: close() has not begun (a closing call's deadline is close()'s give-up + 5 s).
        assert module.client.calls[-1] == {"idempotency_key": "key", "retry_count": 0, "deadline": None}
        with pytest.raises(processing._UncheckedReplay):
            replay._patch([{"id": 6, "state": "POSTPROCESSED"}], "key")
    finally:
        module.close()


def _skewed(monkeypatch: pytest.MonkeyPatch, offset: float) -> None:
    """This host's clock ``offset`` seconds off the file system's (the module's view only)."""
    real = time.time
    monkeypatch.setattr(processing, "time", types.SimpleNamespace(
        time=lambda: real() + offset, monotonic=time.monotonic, time_ns=time.time_ns, sleep=time.sleep))


def test_a_live_agents_folder_is_not_replayed_by_a_host_whose_clock_is_ahead(module, monkeypatch) -> None:
    module._results_dir = module._make_results_dir()
    _skewed(monkeypatch, 36000.0)
    folder, lock_path = _dead_folder(module, f"other-login-2.example-{os.getpid()}-{time.time_ns()}")
    assert _recover(module) == []
    assert folder.is_dir() and lock_path.exists()


def test_a_silent_folder_is_replayed_by_a_host_whose_clock_is_behind(module, monkeypatch) -> None:
    module._results_dir = module._make_results_dir()
    _skewed(monkeypatch, -36000.0)
    folder, lock_path = _dead_folder(module, f"other-login-2.example-{os.getpid()}-{time.time_ns()}")
    silent = time.time() - 3600
    os.utime(lock_path, (silent, silent))
    assert [u["id"] for u in _recover(module)] == [5]
    assert not folder.exists()


def test_a_new_lock_file_left_by_a_dead_agent_is_deleted(module) -> None:
    """An agent that died between the O_EXCL create of ``<agent>.lock.new`` and its rename."""
    parent = module.hook_results_path
    parent.mkdir(parents=True)
    dead_here = parent / f"{socket.gethostname()}-{_dead_pid()}-{time.time_ns()}.lock.new"
    silent_there = parent / f"other-login-2.example-{os.getpid()}-{time.time_ns()}.lock.new"
    fresh_there = parent / f"other-login-3.example-{os.getpid()}-{time.time_ns()}.lock.new"
    live_here = parent / f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}.lock.new"
    for path in (dead_here, silent_there, fresh_there, live_here):
        path.touch()
    silent = time.time() - 3600
    os.utime(silent_there, (silent, silent))
    assert _recover(module) == []
    assert sorted(p.name for p in parent.iterdir()) == sorted([fresh_there.name, live_here.name])

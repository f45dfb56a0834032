"""The launcher's notes on its BatchJob (``status_info``): one writer thread per launcher process
(balsam.launcher.batch_job_notes), against a real server behind a real proxy.

Before, each note was a GET and a PUT of the whole ``status_info`` made by the thread that had
something to say: (a) a full-disk pause's PUT that the server answered slowly landed after its
resume's, and the BatchJob said "paused" after the pause had ended; a note's PUT built from a read
made before another thread's note wiped that note's key; (b) mpi mode wrote its notes on its loop
thread, so an API that did not answer held job launching for the client's retries; (c) the site
agent's scheduler module PATCHed ``status_info`` from a copy read at its cycle's start, which put
back a note's older message. Now a note is one ``PUT`` with ``status_info_merge`` (the server
merges its keys under the row's lock), and the agent merges its own keys the same way.

Real components: a uvicorn server (tests' ``balsam_env``), the RESTClient, and the proxy of
tests/failure_proxy.py whose forwarding holds one chosen request until the test releases it (a
slow server, at the moment the test picks).
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from balsam.client.rest import RESTClient
from balsam.launcher import runner, service_calls
from balsam.launcher.batch_job_notes import BatchJobNotes
from balsam.launcher.service_calls import note_batch_job
from failure_proxy import FailureProxy, wait_until  # tests/failure_proxy.py


class Gate:
    """Stands for the proxy's upstream client: the first ``count`` requests of ``method`` whose path
    matches ``pattern`` wait, before they reach the server, until ``release`` is set (``arrived``
    is set when the first does). ``done``: every request forwarded, (method, path), in the order of
    their answers."""

    def __init__(self, real: Any, method: str, pattern: str, count: int = 1) -> None:
        self.real, self.method, self.pattern, self.left = real, method, pattern, count
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.done: list[tuple[str, str]] = []

    def request(self, method: str, path: str, **kw: Any) -> Any:
        with self.lock:
            hold = method == self.method and re.search(self.pattern, path) is not None and self.left > 0
            if hold:
                self.left -= 1
        if hold:
            self.arrived.set()
            self.release.wait(60)
        answer = self.real.request(method, path, **kw)
        with self.lock:
            self.done.append((method, path))
        return answer

    def count(self, method: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.done if m == method and re.search(self.pattern, p))

    def close(self) -> None:
        self.release.set()
        self.real.close()


@pytest.fixture(autouse=True)
def _forget_writers() -> Iterator[None]:
    """The process's note writers (one per BatchJob id, each bound to the client of its first write)
    are forgotten after each test: the next test's BatchJob of the same id (a fresh database) would
    otherwise be written through this test's client, bound to its closed proxy."""
    yield
    from balsam.launcher import batch_job_notes

    with batch_job_notes._writers_lock:
        batch_job_notes._writers.clear()


@pytest.fixture
def batch_job(balsam_env: Any, tmp_path: Path) -> Any:
    from balsam.api import BatchJob, Site

    site = Site.objects.create(name=f"notes-{uuid.uuid4().hex[:8]}", path=str(tmp_path / "site"))
    return BatchJob.objects.create(site_id=site.id, project="p", queue="q", num_nodes=1, wall_time_min=10, job_mode="mpi")


@pytest.fixture
def proxy(balsam_env: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[FailureProxy]:
    """The launcher's client goes through the proxy."""
    front = FailureProxy(balsam_env.url)
    monkeypatch.setattr(service_calls, "default_client", lambda: RESTClient(front.url, balsam_env.token))
    yield front
    front.close()


def _gate(proxy: FailureProxy, method: str, batch_job_id: int) -> Gate:
    gate = Gate(proxy.upstream, method, rf"^/batch-jobs/{batch_job_id}$")
    proxy.upstream = gate  # type: ignore[assignment]
    return gate


def _status_info(balsam_env: Any, batch_job_id: int) -> dict[str, str]:
    return RESTClient(balsam_env.url, balsam_env.token).get(f"/batch-jobs/{batch_job_id}")["status_info"]


def _flush() -> None:
    # Imported here: the code before the note writer had none (this test then fails on its
    # assertion above, not on an import).
    from balsam.launcher.batch_job_notes import flush_notes

    assert flush_notes(30)


def test_a_pause_answered_slowly_is_followed_by_its_resume(balsam_env: Any, batch_job: Any, proxy: FailureProxy,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pause's PUT is held at the proxy while the acquirer thread sees room again and notes the
    resume: the BatchJob ends with the resume (before: "paused", the slow PUT landed last)."""
    full = {"note": ""}
    monkeypatch.setattr(runner, "disk_full_note", lambda path: full["note"])
    monkeypatch.setattr(runner, "DISK_RECHECK_SEC", 0.0)
    gate = _gate(proxy, "PUT", batch_job.id)
    disk = runner.DiskWait()
    disk.watch(tmp_path, lambda text: note_batch_job(batch_job.id, "disk_full", text))  # room: no note
    full["note"] = f"the file system of {tmp_path} is full"
    loop = threading.Thread(target=disk.note_full, args=(str(tmp_path), full["note"]), daemon=True)
    loop.start()  # a run ended on the full disk: the pause (the loop thread)
    assert gate.arrived.wait(30)  # its PUT is at the server, unanswered
    full["note"] = ""
    acquirer = threading.Thread(target=disk.paused, daemon=True)  # room again: the resume (the acquirer thread)
    acquirer.start()
    acquirer.join(30)
    gate.release.set()
    assert wait_until(lambda: gate.count("PUT") >= 2, 30), gate.done
    loop.join(30)
    assert _status_info(balsam_env, batch_job.id)["disk_full"].startswith("resumed at "), gate.done
    _flush()


def test_two_threads_notes_keep_both_keys(balsam_env: Any, batch_job: Any, proxy: FailureProxy) -> None:
    """One thread's note is slow (its PUT held); another's, of another key, goes meanwhile: both
    keys end on the BatchJob (before: the slow PUT, built from a read made before the other note,
    wiped it)."""
    gate = _gate(proxy, "PUT", batch_job.id)
    first = threading.Thread(target=note_batch_job, args=(batch_job.id, "launcher", "stopped acquiring"), daemon=True)
    first.start()
    assert gate.arrived.wait(30)
    second = threading.Thread(target=note_batch_job, args=(batch_job.id, "nodes_out", "node x taken out"), daemon=True)
    second.start()
    second.join(30)
    gate.release.set()
    assert wait_until(lambda: gate.count("PUT") >= 2, 30), gate.done
    first.join(30)
    info = _status_info(balsam_env, batch_job.id)
    assert info.get("launcher") == "stopped acquiring" and info.get("nodes_out") == "node x taken out", info
    _flush()


def test_an_unanswered_api_does_not_hold_the_mpi_loop(balsam_env: Any, batch_job: Any, proxy: FailureProxy,
                                                       tmp_path: Path) -> None:
    """mpi mode's launch-limit note and node take-out, made on its loop thread, return while the
    server has not answered the note's write (before: the loop waited for the answer); the notes
    are written once it answers."""
    import types

    from balsam.builtin.default_platform import DefaultPlatform
    from balsam.config.schema import LauncherSettings
    from balsam.launcher.job_mode import LauncherContext
    from balsam.launcher.modes.mpi import MPIMode
    from balsam.platform import LaunchLimit, NodeInfo

    gate = _gate(proxy, "PUT", batch_job.id)
    # Two nodes: one can be taken out (the last one never is).
    context = LauncherContext(site_config=None, settings=types.SimpleNamespace(launcher=LauncherSettings()), site_id=1,
                              data_path=tmp_path, log_path=tmp_path, platform=DefaultPlatform(),
                              nodes=[NodeInfo("0", "h0", [0]), NodeInfo("1", "h1", [0])], wall_time_min=10,
                              batch_job_id=batch_job.id)
    mode = MPIMode(context)
    try:
        mode.launch_limit = LaunchLimit(3, "this machine allows 3 launches")
        loop = threading.Thread(target=lambda: (mode._report_launch_limit(), mode._take_out(1, ())), daemon=True)
        loop.start()
        assert gate.arrived.wait(30)  # a note's write is at the server, unanswered
        loop.join(20)
        returned = not loop.is_alive()
        gate.release.set()
        assert returned, "the mpi loop waited for the BatchJob note's HTTP call"
        _flush()
        info = _status_info(balsam_env, batch_job.id)
        assert "this machine allows 3 launches" in info.get("launcher", "") and "taken out" in info.get("nodes_out", ""), info
    finally:
        gate.release.set()
        mode.pool.close()


def test_the_agents_cycle_from_an_older_copy_keeps_the_notes_resume(balsam_env: Any, batch_job: Any,
                                                                     proxy: FailureProxy) -> None:
    """The site agent's scheduler cycle reads the BatchJob, the launcher's resume is written, and the
    cycle's bulk PATCH merges a key of its own (``status_info_merge``, as the scheduler module sends
    it): the resume stays, with no read-back by the note writer (before: the cycle's PATCH of its
    whole copy put "paused" back, and the writer read the BatchJob again to write the resume again)."""
    client = RESTClient(balsam_env.url, balsam_env.token)
    note_batch_job(batch_job.id, "disk_full", "paused at T0")
    _flush()
    client.get(f"/batch-jobs/{batch_job.id}")  # the agent's cycle starts: its copy says "paused at T0"
    note_batch_job(batch_job.id, "disk_full", "resumed at T1")
    _flush()
    client.patch("/batch-jobs/", json=[{"id": batch_job.id, "status_info_merge": {"scheduler_reason": "Priority"}}])
    info = _status_info(balsam_env, batch_job.id)
    assert info == {"disk_full": "resumed at T1", "scheduler_reason": "Priority"}, info
    # The writer's requests: its two writes, never a read.
    path = rf"^/batch-jobs/{batch_job.id}$"
    assert len(proxy.requests("PUT", path)) == 2 and proxy.requests("GET", path) == []


def test_a_note_is_tried_again_through_an_outage_and_the_exit_wait_is_bounded(balsam_env: Any, batch_job: Any,
                                                                               proxy: FailureProxy,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The note writer's own retries (one try per call, a backoff between them): two writes of the
    note answered 502 by the proxy, then the note is written. A server that stays away makes
    the exit's flush give up after its bound, and a second flush (the serial launcher's after its
    mode's) does not wait again."""
    from balsam.launcher import batch_job_notes

    monkeypatch.setattr(batch_job_notes, "RETRY_FIRST_SEC", 0.05)
    proxy.lose_next("PUT", rf"^/batch-jobs/{batch_job.id}$", "502")
    proxy.lose_next("PUT", rf"^/batch-jobs/{batch_job.id}$", "502")
    note_batch_job(batch_job.id, "launcher", "after an outage")
    writer = batch_job_notes.notes_for(batch_job.id)
    assert writer.flush(30)
    assert _status_info(balsam_env, batch_job.id) == {"launcher": "after an outage"}
    assert [status for _m, _p, status, mode in proxy.requests("PUT", rf"^/batch-jobs/{batch_job.id}$")][:3] == [200, 200, 200]
    assert [mode for _m, _p, _s, mode in proxy.requests("PUT", rf"^/batch-jobs/{batch_job.id}$")][:3] == ["502", "502", None]

    monkeypatch.setattr(batch_job_notes, "RETRY_FIRST_SEC", 60.0)  # no retry within the test but the flush's own
    for _ in range(50):  # the server's front answers 502 from now on
        proxy.lose_next("PUT", rf"^/batch-jobs/{batch_job.id}$", "502")
    note_batch_job(batch_job.id, "launcher", "noted during the outage")
    assert writer.flush(0.5) is False
    assert writer.flush(30) is False  # returned at once: the first flush found the API away
    with proxy.lock:
        proxy.rules.clear()  # it answers again: a new note is waited for (the writer stays idle after the test)
    note_batch_job(batch_job.id, "launcher", "written once it answers")
    assert writer.flush(30)
    assert _status_info(balsam_env, batch_job.id) == {"launcher": "written once it answers"}


# -- one refused value loses no other key -------------------------------------------------------


def _held_notes(balsam_env: Any, batch_job_id: int, wrap: Any = None) -> tuple[BatchJobNotes, threading.Event]:
    """A writer whose client is made (its first write starts) only once the returned event is set:
    the notes made before it are written together, in one request."""
    go = threading.Event()

    def client() -> Any:
        assert go.wait(30)
        real = RESTClient(balsam_env.url, balsam_env.token)
        return wrap(real) if wrap is not None else real

    return BatchJobNotes(batch_job_id, client=client), go


@pytest.mark.parametrize("spoiled", ["node x taken out (job output a\x00b)", "no room on /data/\udcff: 0 bytes free"],
                         ids=["nul", "lone-surrogate"])
def test_a_note_with_text_the_server_refuses_is_cleaned_and_keeps_the_other_notes(balsam_env: Any, batch_job: Any,
                                                                                   spoiled: str) -> None:
    """A NUL (PostgreSQL text refuses it) or a lone surrogate (not UTF-8: the server answers
    "malformed JSON") in a note, from a job's output line (mpi mode's node take-out quotes one):
    before, the server's 422 dropped every note of the request (serial mode's error with it)."""
    notes, go = _held_notes(balsam_env, batch_job.id)
    notes.note("error", "launcher failed: real reason", error_time="T")
    notes.note("nodes_out", spoiled)
    go.set()
    assert notes.flush(10)
    info = _status_info(balsam_env, batch_job.id)
    assert info["error"] == "launcher failed: real reason" and info["error_time"] == "T", info
    assert info["nodes_out"] == spoiled.replace("\x00", "\ufffd").replace("\udcff", "\ufffd"), info


class SpoilsKey:
    """The writer's REST client, with the value of one key made one the server refuses (a NUL: the
    real server answers 422) in every request that holds it: a value refused for any reason."""

    def __init__(self, inner: Any, key: str) -> None:
        self.inner, self.key = inner, key

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put(self, path: str, json: dict, **kw: Any) -> Any:
        merge = dict(json["status_info_merge"])
        if self.key in merge:
            merge[self.key] = "refused\x00"
        return self.inner.put(path, json={"status_info_merge": merge}, **kw)


def test_a_refused_key_is_dropped_alone_and_named_once(balsam_env: Any, batch_job: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    notes, go = _held_notes(balsam_env, batch_job.id, lambda real: SpoilsKey(real, "nodes_out"))
    notes.note("error", "launcher failed: real reason", error_time="T")
    notes.note("nodes_out", "node x taken out")
    notes.note("launcher", "stopped acquiring")
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.batch_job_notes"):
        go.set()
        assert not notes.flush(10)  # done, but a note was dropped: the exit's flush says so
        info = _status_info(balsam_env, batch_job.id)
        assert info == {"error": "launcher failed: real reason", "error_time": "T", "launcher": "stopped acquiring"}
        refused = [r.getMessage() for r in caplog.records if "could not record" in r.getMessage()]
        # The batch's refusal is not logged; the key's is, once, with the server's reason.
        assert len(refused) == 1 and "could not record nodes_out on BatchJob" in refused[0], refused
        assert "NUL" in refused[0] or "422" in refused[0] or "null" in refused[0].lower(), refused
        assert any("notes nodes_out were dropped" in r.getMessage() for r in caplog.records)
        # The writer goes on: the next notes are written, and the flush reports nothing dropped.
        caplog.clear()
        notes.note("disk_full", "paused at T0")
        assert notes.flush(10)
    assert _status_info(balsam_env, batch_job.id)["disk_full"] == "paused at T0"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_launchers_exit_flush_is_imported_at_the_top_of_entry() -> None:
    """entry.py imported flush_notes inside its exit's ``finally`` (an import that fails there would
    replace the launcher's own exception); service_calls imports batch_job_notes at its top already."""
    import ast

    from balsam.launcher import entry

    tree = ast.parse(Path(entry.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "batch_job_notes"]
    nested = [n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, ast.ImportFrom) and (n.module or "").endswith("batch_job_notes")]
    assert top and not nested, nested


class _Refused(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_credential_drops_the_batch_at_once(status: int) -> None:
    """A 401 or 403 refuses the credential, not a value: the batch is dropped in one request. Split
    key by key, each request renewed the token and stopped the launcher once more."""
    sent: list[list[str]] = []

    class Client:
        def put(self, path: str, json: Any, **kw: Any) -> None:
            sent.append(sorted(json["status_info_merge"]))
            raise _Refused(status)

    notes = BatchJobNotes(7, client=Client)
    notes.note("disk_full", "text", error="text", nodes_out="text")  # one batch of three keys
    assert not notes.flush(5)
    assert sent == [["disk_full", "error", "nodes_out"]], sent

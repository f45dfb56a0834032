"""A hook worker's "no room" is a field of its result, not its text (docs/reliability.md, "When the
disk is full").

- The processing module told a hook worker's workdir that had no room (ENOSPC, EDQUOT) by the error's
  text (``cannot prepare workdir ...: [Errno 28]``): a hook that set that text on its own job's
  FAILED was held, tried again every ``NO_ROOM_RETRY_SEC`` for ever, never FAILED. Now the worker
  marks its result (``hooks_runner.WORKDIR_KEY``), the module takes the mark off before the PATCH,
  and such a hook's job is FAILED as any failing hook.
- The results the module harvested while feeding queued hook jobs to the workers (between cycles)
  were sent as they were: a no-room result there FAILED its job. Now every harvest takes them.
- A dead agent's worker's no-room result was sent by the next agent (its job FAILED). Now it is not:
  the job is released with the dead session, and given back.
- "job workdirs can be prepared again" (INFO) came on any result of a job given back: one whose
  workdir then failed for another reason said the disk had room. Now it comes once the workdirs of
  those given back are made.
- No-room results harvested by ``close()``: their jobs stay STAGED_IN, released with the session,
  nothing with the mark sent (checked on a copy without close()'s harvest taking them: FAILED); the
  WARNING promising retries "every 10 s until there is room" came just before "stopping: ... are
  released": now a DEBUG line. A dead agent's ``not_made`` result goes with its mark taken off.
- The hold's WARNING told of statvfs(data_path), not of the file system where the workdir failed
  (a tmpfs without a free inode read 'data has 82 GB free'): now that one, bytes and inodes free.

Real components: a real API server, the real hook workers, and a real full tmpfs (no free inode: no
workdir can be made in it; mounted as root, else those tests are skipped, as in tests/launcher).
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from balsam.site import hooks_runner
from balsam.site.modules import processing
from balsam.site.modules.processing import ProcessingModule
from full_tmpfs import FullTmpfs, mounted_tmpfs  # tests/full_tmpfs.py
from site_test_utils import events, job_rows, process_until

#: A job's own error that reads as balsam's no-room one (what the module matched before).
LOOKALIKE_ERROR = "cannot prepare workdir 'mine': OSError: [Errno 28] No space left on device: 'scratch/out'"


def _states(client: Any, ids: list[int]) -> dict[int, str]:
    return {r["id"]: r["state"] for r in job_rows(client, id=ids)}


@pytest.fixture
def module(make_site: Any, client: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, ProcessingModule]]:
    # Cycles of 0.1 s, not 1 s: an idle cycle's acquire waits up to the period for jobs to come.
    monkeypatch.setattr(ProcessingModule, "period", property(lambda self: 0.1))
    site = make_site(overrides={"processing": {"num_workers": 1}})
    made = ProcessingModule(site, site.settings.processing, client)
    yield site, made
    made.close()


@pytest.fixture
def full_dir(module: Any) -> Iterator[FullTmpfs]:
    """``<data>/full``: a tmpfs of 64 inodes, all taken."""
    site, _ = module
    with mounted_tmpfs(Path(site.data_path) / "full", nr_inodes=64) as tmpfs:
        tmpfs.fill()
        yield tmpfs


def _hook_app(site_id: int, name: str, error: str = "") -> Any:
    """An app of the site with a preprocess of its own (run in a hook worker): PREPROCESSED, or its
    job FAILED with ``error`` as the job's own error text (printed to its balsam.log too)."""
    from balsam.api import ApplicationDefinition

    class HookApp(ApplicationDefinition):
        site = site_id
        command_template = "true"
        own_error = error

        def preprocess(self) -> None:
            if self.own_error:
                print(self.own_error)
                self.job.state = "FAILED"
                self.job.state_data = {"message": "the app's own check", "error": self.own_error}
            else:
                self.job.state = "PREPROCESSED"

    HookApp.__name__ = HookApp.__qualname__ = name
    HookApp.sync()
    return HookApp


def _jobs(app: Any, workdirs: list[str]) -> list[int]:
    from balsam.api import Job

    return [j.id for j in Job.objects.bulk_create([Job(w, app) for w in workdirs])]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every update queued on a status updater (the module's, its replay of a dead agent's results)."""
    from balsam.client.status_updater import BulkStatusUpdater

    queued: list[dict] = []
    real = BulkStatusUpdater.put_update

    def spy(self: Any, update: dict, **kwargs: Any) -> int:
        queued.append(dict(update))
        return real(self, update, **kwargs)

    monkeypatch.setattr(BulkStatusUpdater, "put_update", spy)
    return queued


def test_a_dead_agents_no_room_result_is_not_sent(module: Any, full_dir: FullTmpfs, client: Any,
                                                  sent: list[dict]) -> None:
    """A dead agent's worker recorded a no-room result (a workdir in the full tmpfs) and a completed
    one: the next agent sends the completed one (without the mark) and not the other (before: sent,
    FAILED); that job is released with the dead session and given back by this module."""
    from balsam.client.lease import JobLease
    from balsam.states import PROCESSABLE_STATES

    site, mod = module
    app = _hook_app(site.site_id, "DeadAgents")
    # not_made: a workdir that fails otherwise (its parent a file: ENOTDIR), marked WORKDIR_NOT_MADE.
    (Path(site.data_path) / "afile").write_text("a file where the workdir's parent should be\n")
    no_room, done, not_made = _jobs(app, ["full/0", "ok/0", "afile/0"])
    lease = JobLease(client, site.site_id, states=PROCESSABLE_STATES, name="processing session", heartbeat_thread=False)
    jobs = lease.acquire(10)
    assert sorted(j["id"] for j in jobs) == sorted([no_room, done, not_made])
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is gone: an agent of this host that certainly died
    name = f"{socket.gethostname()}-{dead.pid}-{time.time_ns()}"
    folder = Path(site.spool_path) / processing.HOOK_RESULTS_DIR / name
    folder.mkdir(parents=True)
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    (folder.parent / f"{name}.lock").write_text(f"boot {boot}\nprocessing {lease.session_id}\n")
    # What the dead agent's hook worker recorded: the real worker entry, in this process.
    record = client.get(f"/apps/{app.__app_id__}")
    hooks_runner.run_hooks(record, sorted(jobs, key=lambda j: j["id"]), False, str(site.data_path),
                           results_path=str(folder / f"0-s{lease.session_id}.jsonl"))
    process_until(mod, lambda: _states(client, [done])[done] == "PREPROCESSED" and len(mod.no_room) == 1
                  and _states(client, [not_made])[not_made] == "FAILED"
                  or _states(client, [no_room])[no_room] == "FAILED", "the results of the dead agent", timeout=30)
    assert _states(client, [no_room, done, not_made]) == {no_room: "STAGED_IN", done: "PREPROCESSED",
                                                          not_made: "FAILED"}
    assert [j["id"] for j in mod.no_room] == [no_room]
    # The not_made result went with its mark taken off (with it, the server refused the PATCH, 422,
    # and the job was FAILED for that refusal, its reason lost), as the worker's reason.
    failed = [e for e in events(client, job_id=[not_made]) if e["to_state"] == "FAILED"]
    assert len(failed) == 1 and "Not a directory" in str(failed[0]["data"]), failed
    assert "refused" not in str(failed[0]["data"]), failed
    assert not [u for u in sent if hooks_runner.WORKDIR_KEY in u], sent


def test_a_full_tmpfs_gives_hook_jobs_back_also_between_cycles(
        module: Any, full_dir: FullTmpfs, client: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Workdirs in a real full tmpfs, made by the hook worker (a preprocess of the app's own): given
    back, none FAILED, whichever harvest took their results (one job a chunk, one worker: most are
    harvested while the module feeds the queued ones between cycles, where before they were sent as
    FAILED); then preprocessed once the tmpfs has room, with one INFO. The WARNING names the tmpfs,
    with its bytes and inodes free.

    Among them, a hook that sets balsam's no-room text on its own job's FAILED: FAILED as any failing
    hook (before: held as if its workdir had no room, tried again for ever, never FAILED)."""
    site, mod = module
    monkeypatch.setattr(processing, "WORKER_CHUNK", 1)
    monkeypatch.setattr(processing, "NO_ROOM_RETRY_SEC", 3600.0)  # held until the test makes room
    app = _hook_app(site.site_id, "HookInFull")
    says_no_room = _hook_app(site.site_id, "SaysNoRoom", LOOKALIKE_ERROR)
    ids = _jobs(app, [f"full/{i}" for i in range(4)])
    own = _jobs(says_no_room, ["mine/0", "mine/1"])

    def own_settled() -> int:
        return sum(state != "STAGED_IN" for state in _states(client, own).values())

    with caplog.at_level(logging.INFO):
        process_until(mod, lambda: len(mod.no_room) + own_settled() == 6 or "FAILED" in _states(client, ids).values(),
                      "the 4 jobs given back, the 2 others FAILED", timeout=30)
        assert _states(client, ids) == {i: "STAGED_IN" for i in ids}, "given back, not FAILED"
        assert _states(client, own) == {i: "FAILED" for i in own}, "a hook's own error: FAILED, not held"
        assert sorted(j["id"] for j in mod.no_room) == sorted(ids)
        failed = [e for e in events(client, job_id=own) if e["to_state"] == "FAILED"]
        assert len(failed) == 2 and all(LOOKALIKE_ERROR in str(e["data"]) for e in failed), failed
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "[Errno 28]" in warnings[0], warnings
        # The file system whose room is wanting, the tmpfs (before: the data directory's, with its
        # bytes free only: 'data has 82 GB free').
        assert f"; {full_dir.path} has " in warnings[0] and " bytes free and 0 inodes free:" in warnings[0], warnings

        full_dir.make_room()
        mod._no_room_retry_at = 0.0  # due now
        process_until(mod, lambda: set(_states(client, ids).values()) == {"PREPROCESSED"}, "PREPROCESSED", timeout=30)
    assert all((full_dir.path / str(i) / "job.out").exists() for i in range(4))
    assert sum("can be prepared again" in r.getMessage() for r in caplog.records) == 1
    assert not mod.no_room


@pytest.mark.parametrize("hooks", ["default", "worker"])
def test_room_again_is_said_only_once_a_workdir_is_made(
        module: Any, full_dir: FullTmpfs, client: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, sent: list[dict], hooks: str) -> None:
    """Given back for want of room, then tried again where the workdir fails otherwise (its parent
    is a file now: ENOTDIR): FAILED, with the worker's reason (its mark taken off: the server
    refuses a field it does not know, 422), and no "can be prepared again" (before: said on that
    FAILED). A job prepared later says it."""
    from balsam.api import ApplicationDefinition

    site, mod = module
    site_id = site.site_id
    monkeypatch.setattr(processing, "NO_ROOM_RETRY_SEC", 3600.0)
    if hooks == "worker":
        app = _hook_app(site_id, "WorkerHook")
    else:
        class DefaultHook(ApplicationDefinition):  # the default preprocess: in the agent process
            site = site_id
            command_template = "true"

        app = DefaultHook
        app.sync()
    ids = _jobs(app, ["full/parent/0"])
    with caplog.at_level(logging.INFO):
        process_until(mod, lambda: len(mod.no_room) == 1 or "FAILED" in _states(client, ids).values(),
                      "given back", timeout=20)
        full_dir.make_room()
        (full_dir.path / "parent").write_text("a file where the workdir's parent should be\n")
        mod._no_room_retry_at = 0.0
        process_until(mod, lambda: set(_states(client, ids).values()) == {"FAILED"}, "FAILED", timeout=20)
        failed = [e for e in events(client, job_id=ids) if e["to_state"] == "FAILED"]
        assert len(failed) == 1 and "Not a directory" in str(failed[0]["data"]), failed
        assert not any("can be prepared again" in r.getMessage() for r in caplog.records)

        # Full again: a new WARNING (nothing given back was left), and room once a workdir is made.
        full_dir.fill()
        more = _jobs(app, ["full/again/0"])
        process_until(mod, lambda: len(mod.no_room) == 1, "given back", timeout=20)
        assert sum(r.levelno >= logging.WARNING and "given back" in r.getMessage() for r in caplog.records) == 2
        full_dir.make_room()
        mod._no_room_retry_at = 0.0
        process_until(mod, lambda: set(_states(client, more).values()) == {"PREPROCESSED"}, "PREPROCESSED", timeout=20)
    assert sum("can be prepared again" in r.getMessage() for r in caplog.records) == 1
    assert sorted(u["id"] for u in sent) == sorted(ids + more)
    assert not [u for u in sent if hooks_runner.WORKDIR_KEY in u], sent


def test_no_room_results_harvested_at_stop_are_released_not_sent(
        module: Any, full_dir: FullTmpfs, client: Any, sent: list[dict], caplog: pytest.LogCaptureFixture) -> None:
    """Hook workers' no-room results harvested by ``close()`` (the module stops with them in): their
    jobs stay STAGED_IN and are released with the session (another session acquires them), nothing
    with the mark is sent, and no WARNING promises retries of a module that is stopping (before, the
    WARNING said "tried again every 10 s until there is room", then "stopping: ... are released")."""
    from balsam.client.lease import JobLease
    from balsam.states import PROCESSABLE_STATES

    site, mod = module
    app = _hook_app(site.site_id, "StopsFull")
    ids = _jobs(app, ["full/0", "full/1"])
    process_until(mod, lambda: mod.in_flight(), "the hooks handed to a worker", timeout=20)
    with caplog.at_level(logging.DEBUG):
        # Their results in, not yet harvested (no cycle runs): close() harvests them.
        concurrent.futures.wait(list(mod.pending), timeout=30)
        mod.close()
    assert _states(client, ids) == {i: "STAGED_IN" for i in ids}
    assert not [u for u in sent if u.get("id") in ids], sent
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("balsam")]
    assert not [m for level, m in logged if level >= logging.WARNING], logged
    assert (logging.INFO, f"stopping: 2 jobs held for want of room in {site.data_path} are released") in logged
    lease = JobLease(client, site.site_id, states=PROCESSABLE_STATES, name="the next agent", heartbeat_thread=False)
    try:
        assert sorted(j["id"] for j in lease.acquire(10)) == sorted(ids)
    finally:
        lease.close()

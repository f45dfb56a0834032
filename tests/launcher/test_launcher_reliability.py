"""Launcher faults found by the reliability drills (issue 12): each test failed before its fix.

- same-second launchers wrote the same ``serial_mode_<second>...`` files;
- a workdir outside data/ (``../x``, ``/abs``, ``.``) ran there;
- a full disk gave RUN_ERROR with an empty error and nothing in any log;
- a SIGTERM'd launcher whose API is gone took 34 s to exit (now seconds, and nothing it could not
  send is lost: it is spooled in the site for the agent).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from launcher_harness import start_launcher  # noqa: E402
from launcher_helpers import make_runnable, wait_for_states  # noqa: E402


# -- 1. unique per-launcher files ---------------------------------------------------------------------

def _context(tmp_path: Path, **kw: Any) -> Any:
    from balsam.launcher.job_mode import LauncherContext
    from balsam.platform import NodeInfo

    return LauncherContext(site_config=None, settings=None, site_id=1, data_path=tmp_path / "data",
                           log_path=tmp_path / "log", platform=None, nodes=[NodeInfo(node_id="0", hostname="h", cpu_ids=(0,))],
                           wall_time_min=1, job_mode="serial", **kw)


def test_launchers_started_in_the_same_second_get_their_own_files(tmp_path: Path) -> None:
    from balsam.launcher.job_mode import launcher_stamp

    second = dt.datetime(2026, 1, 2, 3, 4, 5)
    code = "import datetime, sys; from balsam.launcher.job_mode import launcher_stamp; " \
           "print(launcher_stamp(datetime.datetime(2026, 1, 2, 3, 4, 5)))"
    others = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
              for _ in range(2)}
    stamps = others | {launcher_stamp(second)}
    assert len(stamps) == 3 and all(s.startswith("2026-01-02_030405_") for s in stamps)
    assert _context(tmp_path).log_file("serial.json") != _context(tmp_path, timestamp=others.pop()).log_file("serial.json")


def test_a_serial_config_file_is_never_shared(tmp_path: Path) -> None:
    """Even a clash of names (which the stamps prevent) would fail loudly rather than swap configs."""
    from balsam.launcher.modes.serial import SerialMode

    ctx = _context(tmp_path, timestamp="same")
    ctx.log_path.mkdir(parents=True)
    ctx.log_file("serial.json").write_text("{}")
    mode = SerialMode.__new__(SerialMode)
    mode.context = ctx
    # The workers' launch line is built before the file is written (a line the platform refuses
    # stops the start first); this context has no platform, and the line is not this test's subject.
    mode.command = lambda config_path: "true"  # type: ignore[method-assign]
    with pytest.raises(FileExistsError):
        SerialMode.run(mode)


# -- 6. workdirs stay inside data/ -------------------------------------------------------------------

class _TrueApp:
    """An app whose command line is ``true``, as JobPreparer loads one."""

    def __init__(self, job: Any) -> None:
        self.job = job

    def get_arg_str(self) -> str:
        return "true"

    def get_environ_vars(self) -> dict:
        return {}

    def shell_preamble(self) -> str:
        return ""


def _single_rank_job(workdir: str) -> Any:
    return types.SimpleNamespace(id=1, app_id=1, workdir=workdir, num_nodes=1, ranks_per_node=1, threads_per_rank=1,
                                 threads_per_core=1, gpus_per_rank=0, node_packing_count=1, launch_params={})


@pytest.mark.parametrize("workdir", ["../../x", "/abs/x", "a/../../..", "", "."])
def test_the_launcher_refuses_a_workdir_outside_data(tmp_path: Path, workdir: str) -> None:
    from balsam.launcher.app_run import JobBuildError, JobPreparer

    preparer = JobPreparer(tmp_path / "site" / "data", load_app=lambda _app_id: _TrueApp)
    with pytest.raises(JobBuildError, match="workdir"):
        preparer.prepare(_single_rank_job(workdir))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was created anywhere


@pytest.mark.parametrize("workdir", ["a", "a/./b", ".hidden/x", "a..b/c", "runs/0001/", "a//b", "./a"])
def test_the_launcher_takes_every_workdir_inside_data(tmp_path: Path, workdir: str) -> None:
    """The usual workdirs pass the launcher's check without splitting the path; the same as the
    full check (the names with dots in them are not '..')."""
    from balsam.launcher.app_run import JobPreparer

    data = tmp_path / "data"
    prepared = JobPreparer(data, load_app=lambda _app_id: _TrueApp).prepare(_single_rank_job(workdir))
    assert prepared.workdir == data / workdir and (prepared.workdir / "job.out").is_file()


def test_an_apps_own_environment_is_turned_into_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An app that overrides get_environ_vars may return non-strings: the launcher converts them
    (the default get_environ_vars returns strings, and its result is used as it is)."""
    from balsam.api import ApplicationDefinition
    from balsam.launcher.app_run import JobPreparer

    class Plain(ApplicationDefinition):
        site = 1
        command_template = "true"
        environment_variables = {"LEVEL": 3}

    class Own(Plain):
        def get_environ_vars(self) -> dict:
            return {"PATH": os.environ["PATH"], "COUNT": 2, 7: None}

    job = types.SimpleNamespace(**vars(_single_rank_job("w")), parameters={}, serialized_parameters="",
                                get_parameters=lambda: {})
    own = JobPreparer(tmp_path, load_app=lambda _app_id: Own).prepare(job)
    assert own.env == {"PATH": os.environ["PATH"], "COUNT": "2", "7": "None", "BALSAM_JOB_ID": "1", "OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("BALSAM_TEST_LATE", "set after the first job")
    plain = JobPreparer(tmp_path, load_app=lambda _app_id: Plain).prepare(job)
    assert plain.env["LEVEL"] == "3" and plain.env["BALSAM_TEST_LATE"] == "set after the first job"
    assert all(type(k) is str and type(v) is str for k, v in plain.env.items())


def test_preparing_creates_job_out_and_a_missing_workdir_and_keeps_what_is_there(tmp_path: Path) -> None:
    from balsam.launcher.app_run import JobBuildError, JobPreparer

    data = tmp_path / "data"
    preparer = JobPreparer(data, load_app=lambda _app_id: _TrueApp)
    # No preprocess made this one: the launcher makes the directory itself.
    prepared = preparer.prepare(_single_rank_job("new/deep/dir"))
    assert prepared.workdir == data / "new" / "deep" / "dir"
    assert (prepared.workdir / "job.out").read_text() == ""
    # Made ahead by the processing module, with a job.out from an earlier run: left as it is here
    # (the spawner truncates it when the task starts).
    (data / "made").mkdir()
    (data / "made" / "job.out").write_text("earlier run\n")
    assert preparer.prepare(_single_rank_job("made")).workdir == data / "made"
    assert (data / "made" / "job.out").read_text() == "earlier run\n"
    # A workdir that cannot exist: the job fails with the reason.
    (data / "afile").write_text("")
    with pytest.raises(JobBuildError, match="cannot create the job's workdir .*afile/sub"):
        preparer.prepare(_single_rank_job("afile/sub"))


# -- 8. a full disk says so ----------------------------------------------------------------------------

@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Any:
    """A 256 KiB tmpfs (a real file system that fills up); needs root, as CI and this machine have."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_job_killed_by_a_full_disk_says_no_space_left(tiny_filesystem: Path, tmp_path: Path, caplog: Any) -> None:
    from balsam.launcher.runner import ProcessPool

    workdir = tiny_filesystem / "job"
    workdir.mkdir()
    pool = ProcessPool(10)
    # The job fills the disk, so its own complaint cannot reach job.out either.
    pool.start(7, "head -c 10000000 /dev/zero > big; echo failed >&2; exit 3", workdir, dict(os.environ))
    deadline = time.monotonic() + 30
    done: list = []
    while not done:
        assert time.monotonic() < deadline
        done = pool.reap()
        time.sleep(0.05)
    (job_id, rc, tail, _when), = done
    assert (job_id, rc) == (7, 3)
    assert "No space left on device" in tail
    assert "No space left on device" in caplog.text  # the launcher log says it too


def test_the_disk_check_is_quiet_on_a_disk_with_room(tmp_path: Path) -> None:
    from balsam.launcher.runner import disk_full_note

    assert disk_full_note(tmp_path) == ""


# -- 9. SIGTERM with the API gone ------------------------------------------------------------------------

def test_sigterm_with_the_api_gone_exits_in_seconds_and_spools_the_updates(
    live_server_factory: Any, register: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher's updates after the API vanished are kept in the site's spool/ (nothing lost),
    and the launcher is gone within seconds of SIGTERM (it took 34 s)."""
    import yaml

    from balsam._api.model import reset_default_client
    from launcher_harness import make_site

    server = live_server_factory()
    username, _password, _uid, token, expiry = register(server.url)
    home = tmp_path / "home"
    home.mkdir()
    client_path = home / "client.yml"
    # The default retry budget of a real client.yml: the slow exit came from retrying with it.
    client_path.write_text(yaml.safe_dump({"api_root": server.url, "token": token, "token_expiry": expiry.isoformat(),
                                           "username": username}))
    monkeypatch.setenv("BALSAM_HOME", str(home))
    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(client_path))
    reset_default_client()
    from balsam.api import ApplicationDefinition

    path = make_site(tmp_path / "gone", "gone", {"idle_ttl_sec": 60})

    class Sleepy(ApplicationDefinition):
        site = "gone"
        command_template = "sleep {{ t }}"

    Sleepy.sync()
    quick = make_runnable([Sleepy.submit(workdir=f"q{i}", t=0, save=False) for i in range(2)])
    slow = make_runnable([Sleepy.submit(workdir="slow", t=300, save=False)])
    proc = start_launcher(path, "mpi", 10, env={"BALSAM_CLIENT_PATH": str(client_path)})
    wait_for_states(quick, {"RUN_DONE"})
    wait_for_states(slow, {"RUNNING"})
    server.stop()  # the API is gone
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    proc.wait(timeout=60)
    took = time.monotonic() - t0
    assert took < 15, f"the launcher took {took:.1f} s to exit"
    spooled = [json.loads(line) for f in sorted((path / "spool").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert [(u["id"], u["state"]) for u in spooled] == [(slow[0], "RUN_TIMEOUT")], spooled
    reset_default_client()


def test_spooled_updates_are_replayed_once_the_api_is_back(balsam_env: Any, tmp_path: Path) -> None:
    from balsam._api.model import get_default_client, reset_default_client
    from balsam.client.status_updater import BulkStatusUpdater, SpoolReplayer, write_spool

    reset_default_client()
    client = get_default_client()
    site = client.post("/sites/", json={"name": "spool", "path": str(tmp_path)})
    app = client.post("/apps/", json={"site_id": site["id"], "name": "S", "serialized_class": "eA==", "source_code": "x"})
    jobs = client.post("/jobs/", json=[{"workdir": f"s{i}", "app_id": app["id"]} for i in range(3)])
    ids = [j["id"] for j in jobs]
    client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids])
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in ids])
    spool = tmp_path / "spool"
    write_spool(spool, [{"id": ids[0], "state": "RUN_DONE", "return_code": 0},
                        {"id": ids[1], "state": "RUN_ERROR", "state_data": {"error": "boom"}},
                        {"id": ids[2], "state": "JOB_FINISHED"}])  # refused (not from RUNNING): dropped, others kept
    with BulkStatusUpdater(client, spool_dir=spool) as updater:
        replayer = SpoolReplayer(spool, updater)
        assert replayer.poll() == 3
        assert updater.flush(30)
        replayer.poll()
    assert list(spool.glob("*.jsonl")) == []
    states = {j["id"]: j["state"] for j in client.get("/jobs/", params={"id": ids})["results"]}
    assert states == {ids[0]: "RUN_DONE", ids[1]: "RUN_ERROR", ids[2]: "RUNNING"}
    reset_default_client()


def test_spooled_updates_of_deleted_jobs_cost_one_call_not_one_per_job(balsam_env: Any, tmp_path: Path) -> None:
    """Half of a spool's jobs were deleted while the API was away: the server names every one in
    its refusal (``refused_ids``), and the updater drops those and sends the rest in the next call
    (it split the call in halves down to single updates: ~2 calls per deleted job)."""
    from balsam._api.model import get_default_client, reset_default_client
    from balsam.client.status_updater import BulkStatusUpdater, SpoolReplayer, write_spool

    reset_default_client()
    client = get_default_client()
    site = client.post("/sites/", json={"name": "spool-deleted", "path": str(tmp_path)})
    app = client.post("/apps/", json={"site_id": site["id"], "name": "S", "serialized_class": "eA==", "source_code": "x"})
    ids = [j["id"] for j in client.post("/jobs/", json=[{"workdir": f"s{i}", "app_id": app["id"]} for i in range(200)])]
    client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids])
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in ids])
    deleted, kept = ids[::2], ids[1::2]
    client.delete("/jobs/", params={"id": deleted})
    spool = tmp_path / "spool"
    write_spool(spool, [{"id": i, "state": "RUN_DONE", "return_code": 0} for i in ids])
    before = sum(n for key, n in client.request_counts.items() if key.startswith("PATCH"))
    with BulkStatusUpdater(client, spool_dir=spool) as updater:
        replayer = SpoolReplayer(spool, updater)
        assert replayer.poll() == 200
        assert updater.flush(30)
        replayer.poll()
    patches = sum(n for key, n in client.request_counts.items() if key.startswith("PATCH")) - before
    assert patches == 2  # refused naming the 100 deleted jobs; the 100 others
    assert sorted(u["id"] for u, _ in updater.dropped) == sorted(deleted)
    assert {j["state"] for j in client.get("/jobs/", params={"id": kept})["results"]} == {"RUN_DONE"}
    assert list(spool.glob("*.jsonl")) == []
    reset_default_client()


def test_the_updater_gives_up_quickly_once_closing_with_the_api_gone(tmp_path: Path) -> None:
    from balsam.client.status_updater import BulkStatusUpdater

    calls: list[float] = []

    def unreachable(_chunk: list) -> None:
        calls.append(time.monotonic())
        raise ConnectionError("connection refused")

    updater = BulkStatusUpdater(send=unreachable, close_timeout=1.0, spool_dir=tmp_path / "spool")
    updater.put(1, "RUN_DONE")
    updater.put(2, "RUN_ERROR", state_data={"error": "x"})
    t0 = time.monotonic()
    updater.close()
    assert time.monotonic() - t0 < 6
    assert updater.spooled == 2 and len(updater.spool_files) == 1
    lines = updater.spool_files[0].read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [1, 2]


def test_grouped_updates_reach_the_server_in_one_call_in_order(tmp_path: Path) -> None:
    """put_updates: a job's RUN_DONE and POSTPROCESSED are never split between two calls (another
    client would see the job half done), even at a call's size limit; the sequence numbers count
    updates; a group that cannot be sent is spooled whole, in order."""
    from balsam.client.status_updater import BulkStatusUpdater
    from balsam.models import MAX_ITEMS_PER_BULK_OP

    calls: list[list[tuple[int, str]]] = []
    updater = BulkStatusUpdater(send=lambda chunk: calls.append([(u["id"], u["state"]) for u in chunk]), max_wait_sec=3600)
    try:
        for job_id in range(MAX_ITEMS_PER_BULK_OP - 1):
            updater.put(job_id, "RUN_DONE")
        last = updater.put_updates([{"id": -1, "state": "RUN_DONE"}, {"id": -1, "state": "POSTPROCESSED"}])
        assert last == MAX_ITEMS_PER_BULK_OP + 1
        updater.put(-2, "RUN_DONE")
        assert updater.flush(30) and updater.done_through(last + 1)
    finally:
        updater.close()
    assert [len(c) for c in calls] == [MAX_ITEMS_PER_BULK_OP - 1, 3]  # the group did not fit beside the rest
    assert calls[1] == [(-1, "RUN_DONE"), (-1, "POSTPROCESSED"), (-2, "RUN_DONE")]

    def unreachable(_chunk: list) -> None:
        raise ConnectionError("connection refused")

    gone = BulkStatusUpdater(send=unreachable, close_timeout=1.0, spool_dir=tmp_path / "spool")
    gone.put_updates([{"id": 1, "state": "RUN_DONE"}, {"id": 1, "state": "POSTPROCESSED"}])
    gone.put(2, "RUN_ERROR")
    gone.close()
    lines = [json.loads(line) for line in gone.spool_files[0].read_text().splitlines()]
    assert [(u["id"], u["state"]) for u in lines] == [(1, "RUN_DONE"), (1, "POSTPROCESSED"), (2, "RUN_ERROR")]


def test_a_successful_exit_is_postprocessed_in_the_same_call_only_when_asked() -> None:
    from balsam.launcher.runner import report_exit

    class Recording:
        def __init__(self) -> None:
            self.items: list[Any] = []

        def put(self, job_id: int, state: Any = None, **fields: Any) -> None:
            self.items.append(("put", job_id, str(state), fields))

        def put_updates(self, updates: list) -> None:
            self.items.append(("group", [(u["id"], u["state"], u["state_timestamp"]) for u in updates]))

    rec = Recording()
    report_exit(rec, 1, 0, "", 1_700_000_000.0, True)
    report_exit(rec, 2, 0, "", 1_700_000_000.0)
    report_exit(rec, 3, 1, "boom", 1_700_000_000.0, True)  # a failed run is the processing module's (handle_error)
    stamp = dt.datetime.fromtimestamp(1_700_000_000.0, dt.timezone.utc).isoformat()
    assert rec.items[0] == ("group", [(1, "RUN_DONE", stamp), (1, "POSTPROCESSED", stamp)])
    assert [i[:3] for i in rec.items[1:]] == [("put", 2, "RUN_DONE"), ("put", 3, "RUN_ERROR")]


def test_the_launcher_postprocesses_only_apps_that_keep_the_default_hook(tmp_path: Path) -> None:
    """The same test as the processing module's: an app (or a base class of the user's) that defines
    postprocess, and a run() app (its return value is read from job.out), go through the processing
    module; so does every app when the setting is off."""
    from balsam.api import ApplicationDefinition
    from balsam.launcher.app_run import JobPreparer, _keeps_default_postprocess

    class Plain(ApplicationDefinition):
        site = 1
        command_template = "true"

    class OwnHook(Plain):
        def postprocess(self) -> None:
            self.job.state = "POSTPROCESSED"

    class Inherits(OwnHook):
        command_template = "echo"

    class Pythonic(ApplicationDefinition):
        site = 1

        def run(self) -> int:
            return 1

    job = types.SimpleNamespace(**vars(_single_rank_job("w")), parameters={}, serialized_parameters="",
                                get_parameters=lambda: {})
    apps = {1: Plain, 2: OwnHook, 3: Inherits}
    on = JobPreparer(tmp_path, load_app=apps.__getitem__, default_postprocess=True)
    off = JobPreparer(tmp_path, load_app=apps.__getitem__)
    seen = {}
    for app_id in apps:
        job.app_id = app_id
        seen[app_id] = (on.prepare(job).postprocess_on_exit, off.prepare(job).postprocess_on_exit)
    assert seen == {1: (True, False), 2: (False, False), 3: (False, False)}
    # A run() app's job cannot be prepared without a synced app; the decision is the same function's.
    assert [_keeps_default_postprocess(cls) for cls in (Plain, Pythonic)] == [True, False]


def test_refused_updates_are_isolated_by_bisection() -> None:
    from balsam.client.status_updater import isolate_refused

    class Refused(Exception):
        status_code = 400

    sent: list[list[int]] = []

    def send(items: list) -> None:
        if 13 in items or 77 in items:
            raise Refused("bad record")
        sent.append(items)

    refused = isolate_refused(send, list(range(100)))
    assert [item for item, _err in refused] == [13, 77]
    assert sorted(i for batch in sent for i in batch) == [i for i in range(100) if i not in (13, 77)]
    assert len(sent) < 20  # halves, not one call per record


class _Refusal(Exception):
    """A refusal as RESTClient raises it: its status and the records the server named."""

    def __init__(self, status_code: int, refused_ids: set) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code, self.refused_ids = status_code, frozenset(refused_ids)


def _server(deleted: set, invalid: set) -> tuple:
    """A bulk PATCH as the server answers it: 404 naming every update of a deleted job, else 409
    naming every job with an invalid change (here: a RUNNING of a job in ``invalid``), else applied."""
    calls: list[list[dict]] = []
    applied: list[dict] = []

    def send(items: list) -> None:
        calls.append(items)
        missing = {u["id"] for u in items} & deleted
        if missing:
            raise _Refusal(404, missing)
        bad = {u["id"] for u in items if u["id"] in invalid and u["state"] == "RUNNING"}
        if bad:
            raise _Refusal(409, bad)
        applied.extend(items)

    return send, calls, applied


def test_refused_records_named_by_the_server_are_dropped_without_bisection() -> None:
    from balsam.client.status_updater import isolate_refused

    # A spool of 5,000 updates of jobs deleted since: one call (halves took 9,999).
    send, calls, applied = _server(deleted=set(range(5000)), invalid=set())
    refused = isolate_refused(send, [{"id": i, "state": "RUN_DONE"} for i in range(5000)])
    assert len(refused) == 5000 and len(calls) == 1 and applied == []

    # 3 deleted, 2 invalid of 1,000: the others go in the second call, the named ones are refused.
    updates = [{"id": i, "state": "RUN_DONE"} for i in range(1000)]
    send, calls, applied = _server(deleted={5, 500, 999}, invalid={7, 8})
    updates[7], updates[8] = {"id": 7, "state": "RUNNING"}, {"id": 8, "state": "RUNNING"}
    refused = isolate_refused(send, updates)
    assert sorted(u["id"] for u, _ in refused) == [5, 7, 8, 500, 999]
    assert [u["id"] for u in applied] == [i for i in range(1000) if i not in (5, 7, 8, 500, 999)]
    assert len(calls) == 3  # all; without the 404's; without the 409's

    # A job's RUNNING is refused, its RUN_DONE after it in the same call is not: it is sent, in order.
    send, calls, applied = _server(deleted=set(), invalid={1})
    updates = [{"id": 1, "state": "RUNNING"}, {"id": 2, "state": "RUNNING"}, {"id": 1, "state": "RUN_DONE"},
               {"id": 2, "state": "RUN_DONE"}]
    refused = isolate_refused(send, updates)
    assert [u for u, _ in refused] == [{"id": 1, "state": "RUNNING"}]
    assert applied == [{"id": 2, "state": "RUNNING"}, {"id": 2, "state": "RUN_DONE"}, {"id": 1, "state": "RUN_DONE"}]
    assert len(calls) <= 5

    # Every item a record's: halves among them, as without names.
    send, calls, applied = _server(deleted=set(), invalid={3})
    refused = isolate_refused(send, [{"id": 3, "state": "RUNNING"}, {"id": 3, "state": "RUN_DONE"}])
    assert [u for u, _ in refused] == [{"id": 3, "state": "RUNNING"}] and applied == [{"id": 3, "state": "RUN_DONE"}]


# -- idle time counts from the start of work, not of a slow start-up -----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["serial", "mpi"])
def test_a_slow_start_up_is_not_idle_time(new_site: Any, mode: str) -> None:
    """The platform takes 4 s to load, longer than idle_ttl_sec (2 s): the launcher used to end as
    "idle" with 0 jobs started the moment its first acquisition came back empty."""
    from balsam.api import ApplicationDefinition

    from launcher_helpers import make_runnable

    name, path = new_site(idle_ttl_sec=2, platform="testplugin")

    class Quick(ApplicationDefinition):
        site = name
        command_template = "true"

    Quick.sync()
    ids = make_runnable([Quick.submit(workdir=f"q{i}", save=False) for i in range(3)])
    proc = start_launcher(path, mode, 1, env={"BALSAM_TESTPLUGIN_FAULTS": "slow-start"})
    wait_for_states(ids, {"RUN_DONE"}, timeout=90)
    assert proc.wait(60) == 0


def _reap_until(pool: Any, predicate: Any, timeout: float = 30.0) -> list:
    deadline = time.monotonic() + timeout
    done: list = []
    while not predicate(done):
        assert time.monotonic() < deadline, f"reaped so far: {done}"
        done += pool.reap()
        time.sleep(0.02)
    return done


@pytest.mark.parametrize("with_reaper", [True, False], ids=["reaper", "polling"])
def test_a_job_killed_by_the_allocations_stop_signal_is_a_timeout_not_an_error(tmp_path: Path, with_reaper: bool) -> None:
    """A batch system ending an allocation signals every process in it: a job that dies of that
    SIGTERM just before the launcher's own stop is one of the stop's victims (RUN_TIMEOUT, run
    again), not a failed job. Found by a CI run where mpiexec exited 15 a moment before the launcher
    stopped and the job went to FAILED instead of RESTART_READY."""
    import threading

    from balsam.launcher.runner import ProcessPool

    pool = ProcessPool(10, wake=threading.Event() if with_reaper else None)
    pool.start(1, "kill -TERM $$", tmp_path, dict(os.environ))   # dies of a SIGTERM (not ours)
    pool.start(2, "exit 15", tmp_path, dict(os.environ))         # what hydra's mpiexec exits with
    pool.start(3, "exit 3", tmp_path, dict(os.environ))          # a job's own error: reported at once
    pool.start(4, "sleep 60", tmp_path, dict(os.environ))
    done = _reap_until(pool, lambda d: len(d) == 1)
    assert [(job_id, rc) for job_id, rc, _tail, _when in done] == [(3, 3)]
    deadline = time.monotonic() + 5
    while not all(pool.running[j].poll() is not None for j in (1, 2)):
        assert time.monotonic() < deadline
        pool.reap()
        time.sleep(0.01)
    victims, finished = pool.terminate_all(5)
    assert sorted(victims) == [1, 2, 4] and finished == []
    assert not pool.running and not pool.held


def test_an_exit_by_a_signal_with_no_stop_after_it_is_the_jobs_error(tmp_path: Path) -> None:
    """Held back for STOP_SIGNAL_HOLD_SEC only: with no stop in that time it is reported as the exit."""
    import threading

    from balsam.launcher.runner import ProcessPool

    pool = ProcessPool(10, wake=threading.Event())
    proc = pool.start(1, "echo dying >&2; kill -TERM $$", tmp_path, dict(os.environ))
    deadline = time.monotonic() + 5
    while proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert pool.reap() == [] and 1 in pool.held   # exited, held back: a stop may still claim it
    (job_id, rc, tail, _when), = _reap_until(pool, bool)
    assert (job_id, rc) == (1, -signal.SIGTERM) and "dying" in tail
    assert not pool.running and not pool.held

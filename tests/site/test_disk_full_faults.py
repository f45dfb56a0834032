"""The site's own writes on a full or over-quota file system (ENOSPC, EDQUOT), each fault injected at
the function that writes (a real full tmpfs showed each; docs/reliability.md, "When the disk is full").

- The local queue's state file: ``submit`` started the job, then failed to record it (a traceback):
  the agent submitted again (two launchers) and the first ran unknown to ``status``/``delete``. Now
  the script runs only once its record is stored, one line names the file, exit status 1; the agent
  keeps the BatchJob waiting for room (a full disk is not one of the 3 tries before ``submit_failed``).
  ``status``/``history`` answer from memory, ``delete`` succeeds, and an empty exit file is LOST.
- A launcher credential minted and then not stored: every scheduler cycle minted another on the
  server (31 live credentials of one BatchJob in 31 s). Now it is revoked, and the error names the file.
  The batch script or its ``.submitting`` marker with no room: the BatchJob waits (it went
  ``submit_failed``), no partial file is left and the credential is revoked. A renewal not stored is
  tried again every 10 minutes, not every cycle.
- A hook's ``balsam.log`` that cannot be written: the worker's whole chunk failed, "the hook worker
  process died: [Errno 28] ...", and a hook's own ``print`` raised (its job FAILED after a
  successful run: 7 of 8 jobs in a real run). Now the output is dropped and the result stands; the
  hook's ``sys.stderr`` stays line-buffered.
- The agent's pid file: an empty ``.tmp`` was left at every start on a full disk, and the error named
  no file. Now it is removed and the error names the pid file.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest

from balsam.builtin import local_queue
from balsam.site import hooks_runner
from site_test_utils import create_batch_job


def _full_for(monkeypatch: pytest.MonkeyPatch, module: Any, suffix: str, after: int = 0) -> list[str]:
    """``open`` in ``module`` refuses, ENOSPC, to write a file whose name ends with ``suffix``, after
    ``after`` such opens went through. Returns the refused paths."""
    real_open = open
    seen: list[int] = [0]
    refused: list[str] = []

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith(suffix) and ("w" in mode or "a" in mode):
            seen[0] += 1
            if seen[0] > after:
                refused.append(str(file))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(module, "open", full_open, raising=False)
    return refused


@pytest.fixture
def batch_script(tmp_path: Path) -> Path:
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/sh\necho ran >> {tmp_path / 'ran.txt'}\nexec sleep 30\n")
    script.chmod(0o755)
    return script


def _submit(queue: local_queue.LocalQueue, script: Path) -> int:
    return queue.submit(script, queue="local", project="p", num_nodes=1, wall_time_min=1, job_name="full")


def test_local_queue_submit_on_a_full_state_dir_starts_nothing(tmp_path: Path, batch_script: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    queue = local_queue.LocalQueue(tmp_path / "lq")
    started: list[Any] = []
    real_popen = subprocess.Popen

    def spy(*args: Any, **kwargs: Any) -> Any:
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(subprocess, "Popen", spy)
    refused = _full_for(monkeypatch, local_queue, ".json.tmp")
    try:
        with pytest.raises(local_queue.QueueError, match=r"cannot write .*jobs\.json: No space left on device"):
            _submit(queue, batch_script)
        assert refused and not started, "a job was started that the queue could not record"
        assert not (tmp_path / "lq" / "jobs.json.tmp").exists()
        # The CLI the local scheduler runs: one line, the exit status that says "no room" (wait for
        # room), not 2 (refused for good).
        err = io.StringIO()
        with redirect_stderr(err):
            code = local_queue.main(["--state-dir", str(tmp_path / "lq"), "submit", str(batch_script), "--queue",
                                     "local", "--project", "p", "--nodes", "1", "--walltime", "1", "--name", "x"])
        assert code == local_queue.EXIT_NO_ROOM
        assert err.getvalue().count("\n") == 1 and "jobs.json: No space left on device" in err.getvalue()
    finally:
        for proc in started:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_local_queue_runs_no_job_it_cannot_record(tmp_path: Path, batch_script: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills between the id's record and the job's: the script never runs (its wrapper waits
    for "go", written only once the record is stored), not started and then ended (its first line ran)."""
    import psutil

    queue = local_queue.LocalQueue(tmp_path / "lq")
    started: list[Any] = []
    real_popen = subprocess.Popen

    def spy(*args: Any, **kwargs: Any) -> Any:
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(subprocess, "Popen", spy)
    _full_for(monkeypatch, local_queue, ".json.tmp", after=1)
    try:
        with pytest.raises(local_queue.QueueError, match=r"jobs\.json: No space left on device; job \d+ not started"):
            _submit(queue, batch_script)
        assert len(started) == 1
        assert started[0].wait(timeout=10) == 125  # the wrapper, given no "go", exits by itself
        assert not (tmp_path / "ran.txt").exists(), "the script ran (its first line) before it was ended"
        assert not any(p.info["cmdline"] and str(batch_script) in " ".join(p.info["cmdline"])
                       for p in psutil.process_iter(["cmdline"]))
        monkeypatch.undo()
        assert queue.status() == {}
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()


def test_local_queue_status_lists_on_a_full_disk(tmp_path: Path, batch_script: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``status`` settles ended jobs and stores that: on a full disk it still answers (the agent's poll)."""
    queue = local_queue.LocalQueue(tmp_path / "lq")
    short = tmp_path / "short.sh"
    short.write_text("#!/bin/sh\nexit 0\n")
    short.chmod(0o755)
    job_id = _submit(queue, short)
    for _ in range(100):
        if queue._process(queue._read()["jobs"][str(job_id)]) is None:
            break
        time.sleep(0.05)
    _full_for(monkeypatch, local_queue, ".json.tmp")
    assert queue.status() == {}
    monkeypatch.undo()
    assert queue.history(job_id)["state"] == "finished"  # settled and stored once it can be


def _ended(queue: local_queue.LocalQueue, job_id: int) -> None:
    for _ in range(200):
        if queue._process(queue._read()["jobs"][str(job_id)]) is None:
            return
        time.sleep(0.05)
    raise AssertionError(f"local job {job_id} still runs")


def test_local_queue_empty_exit_file_is_lost_not_completed(tmp_path: Path) -> None:
    """A job that ends while the state directory is full leaves its exit file empty (created, then no
    room for "<status> <time>"): it was read as finished with no native_state, which the local
    scheduler takes for COMPLETED (a job that exited 3 reported as finished)."""
    from balsam.builtin.local_scheduler import LocalScheduler

    queue = local_queue.LocalQueue(tmp_path / "lq")
    fails = tmp_path / "fails.sh"
    fails.write_text("#!/bin/sh\nexit 3\n")
    fails.chmod(0o755)
    ids = [_submit(queue, fails) for _ in range(2)]
    for job_id in ids:
        _ended(queue, job_id)
    queue._exit_file(ids[0]).write_text("")  # as the full disk left it
    queue._exit_file(ids[1]).write_text("garbage\n")
    for job_id, what in zip(ids, ("empty", "unreadable")):
        record = queue.history(job_id)
        assert record["native_state"] == "LOST" and "exit_code" not in record, record
        assert record["message"] == f"exit status not recorded (its exit file is {what}: disk full?)"
        assert LocalScheduler._history(job_id, record).native_state == "LOST"


def test_local_queue_history_and_delete_on_a_full_disk(tmp_path: Path, batch_script: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``history`` answers from memory, as ``status`` does, and ``delete`` succeeds once the job is
    ended: each failed (exit status 1) at every cycle while the disk was full, ended BatchJobs stayed
    running in the API, and a deleted job later settled LOST, not CANCELLED."""
    state = tmp_path / "lq"
    queue = local_queue.LocalQueue(state)
    short = tmp_path / "short.sh"
    short.write_text("#!/bin/sh\nexit 0\n")
    short.chmod(0o755)
    done = _submit(queue, short)
    running = _submit(queue, batch_script)
    _ended(queue, done)
    pid = queue._read()["jobs"][str(running)]["pid"]
    monkeypatch.setattr(local_queue, "TERM_GRACE_SEC", 0.5, raising=False)
    refused = _full_for(monkeypatch, local_queue, ".json.tmp")
    err = io.StringIO()
    with redirect_stderr(err):
        assert local_queue.main(["--state-dir", str(state), "delete", str(running)]) == 0
        assert local_queue.main(["--state-dir", str(state), "history", str(done)]) == 0
    assert err.getvalue() == "" and len(refused) == 2
    assert queue.history(done)["native_state"] == "COMPLETED"  # from memory
    assert queue.history(running)["native_state"] == "CANCELLED"
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    monkeypatch.undo()
    assert queue.history(running)["native_state"] == "CANCELLED"  # stored once there is room
    assert queue._read()["jobs"][str(running)]["native_state"] == "CANCELLED"


def _submit_killed_at_second_write(state: Path, batch_script: Path, *, stored: bool) -> None:
    """``local_queue submit`` SIGKILLed at its second records write (the one that stores the job's
    record), just before it (``stored=False``) or just after it."""
    kill = "        os.kill(os.getpid(), signal.SIGKILL)\n"
    code = (
        "import os, signal, sys\n"
        "from balsam.builtin import local_queue\n"
        "real, calls = local_queue.LocalQueue._write, []\n"
        "def write(self, db):\n"
        "    calls.append(1)\n"
        + ("    real(self, db)\n" if stored else "")
        + "    if len(calls) == 2:\n" + kill
        + ("" if stored else "    return real(self, db)\n")
        + "local_queue.LocalQueue._write = write\n"
        "local_queue.main(sys.argv[1:])\n"
    )
    result = subprocess.run([sys.executable, "-c", code, "--state-dir", str(state), "submit", str(batch_script),
                             "--name", "bj"], capture_output=True, timeout=60)
    assert result.returncode == -9, result.stderr


def test_local_queue_submit_killed_before_its_record_runs_nothing(tmp_path: Path, batch_script: Path) -> None:
    """The submit process dies (SIGKILL: a runner's timeout, the OOM killer) after starting the job's
    wrapper and before storing its record: the script never runs. It ran, unknown to find/status, and
    the agent submitted again (two launchers)."""
    import psutil

    state = tmp_path / "lq"
    _submit_killed_at_second_write(state, batch_script, stored=False)
    for _ in range(200):  # the wrapper reads the closed pipe and exits
        if not any(str(batch_script) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the job's wrapper still runs")
    assert not (tmp_path / "ran.txt").exists(), "the script ran with no record of its job"
    assert local_queue.LocalQueue(state).find(batch_script, "bj") == []


def test_mint_revokes_the_credential_it_cannot_store(make_site: Any, client: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.client.settings import ClientSettings
    from balsam.site.service_client import list_all
    from balsam.site.launcher_credentials import LauncherCredentials

    site = make_site()
    bj = create_batch_job(client, site.site_id, "serial")
    credentials = LauncherCredentials(client, Path(site.site_path), site.site_id)
    real_save = ClientSettings.save

    def full_save(self: Any, path: Any = None) -> Any:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(ClientSettings, "save", full_save)
    for _ in range(3):  # three scheduler cycles
        with pytest.raises(OSError, match=r"cannot write .*: Disk quota exceeded") as info:
            credentials.mint({"id": bj["id"], "wall_time_min": 10})
        assert str(Path(site.site_path)) in str(info.value)

    def live() -> list[dict]:
        return [row for row in list_all(client, "/auth/credentials",
                                        {"kind": "launcher", "site_id": site.site_id, "active": "true"})
                if row.get("batch_job_id") == bj["id"]]

    assert live() == [], "credentials minted and never stored are still live"
    monkeypatch.setattr(ClientSettings, "save", real_save)
    assert credentials.mint({"id": bj["id"], "wall_time_min": 10}) is not None
    assert len(live()) == 1


def _live_credentials(client: Any, site_id: int, bj_id: int) -> list[dict]:
    from balsam.site.service_client import list_all

    return [row for row in list_all(client, "/auth/credentials", {"kind": "launcher", "site_id": site_id,
                                                                  "active": "true"})
            if row.get("batch_job_id") == bj_id]


@pytest.mark.parametrize("which", [".sh", ".sh.submitting"])
def test_batch_script_or_marker_with_no_room_waits(make_site: Any, client: Any, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture, which: str) -> None:
    """The credential fits, the batch script or its .submitting marker does not: the BatchJob went
    submit_failed at once (not "waiting ... until there is room"), an empty marker was left, and the
    minted credential stayed live (the marker said a job may be queued). Now it waits, the file is
    named (once in the log), nothing partial is left and the credential is revoked; tried again after
    a wait that doubles (each try minted and revoked a credential, every cycle)."""
    from balsam.site.modules import scheduler as scheduler_module
    from site_test_utils import batch_job
    from test_site_scheduler_module import ScriptedScheduler

    clock = _Clock()
    monkeypatch.setattr(scheduler_module, "time", clock)
    site = make_site()
    fake = ScriptedScheduler()
    fake.names = {}
    module = scheduler_module.SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    bj = create_batch_job(client, site.site_id)
    real_write_text = Path.write_text

    def full(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name.endswith(which):
            real_write_text(self, "")  # created, then no room, as on a full tmpfs
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    tries: list[Path] = []
    real_write_replacing = scheduler_module._write_replacing

    def counted(path: Path, text: str) -> None:
        tries.append(path)
        real_write_replacing(path, text)

    with monkeypatch.context() as disk_full:
        disk_full.setattr(Path, "write_text", full)
        disk_full.setattr(scheduler_module, "_write_replacing", counted)
        for _ in range(6):
            module.run_cycle()
            clock.offset += 1.0
    assert 2 <= sum(p.name == "qlaunch%05d.sh" % bj["id"] for p in tries) <= 3  # 1 s, 2 s, 4 s apart: not 6
    record = batch_job(client, bj["id"])
    assert record["state"] == "pending_submission", record
    waiting = record["status_info"]["waiting"]
    assert waiting.startswith("waiting: cannot write ") and waiting.endswith(
        f"{which}: No space left on device; submitted once there is room"), waiting
    assert sum(waiting in r.getMessage() for r in caplog.records) == 1  # logged once, not every cycle
    assert _live_credentials(client, site.site_id, bj["id"]) == []
    script = module.script_path(bj["id"])
    assert not script.exists() and not script.with_name(script.name + ".submitting").exists()
    assert not [p.name for p in script.parent.iterdir() if p.name.startswith(".tmp-")]
    assert fake.submitted == []
    clock.offset += scheduler_module.NO_ROOM_RETRY_MAX_SEC
    module.run_cycle()  # room again
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and "waiting" not in record["status_info"], record
    assert len(fake.submitted) == 1 and len(_live_credentials(client, site.site_id, bj["id"])) == 1


class _Clock:
    """The scheduler module's ``time`` with a ``monotonic`` that a test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def test_submit_with_no_room_waits_not_counted_as_a_try(make_site: Any, client: Any, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A submit command that fails for a full or over-quota disk (the local queue's state directory,
    SchedulerError.no_room) was one of the 3 tries, a few seconds apart: a disk full for a minute ended
    the BatchJob. It waits; its tries back off (a wait doubling up to NO_ROOM_RETRY_MAX_SEC: a submit
    command, a credential renewal and two INFO lines every cycle for hours), said once."""
    import logging

    from balsam.scheduler import SchedulerError
    from balsam.site.modules import scheduler as scheduler_module
    from site_test_utils import batch_job
    from test_site_scheduler_module import ScriptedScheduler

    clock = _Clock()
    monkeypatch.setattr(scheduler_module, "time", clock)
    caplog.set_level(logging.INFO)
    site = make_site()
    fake = ScriptedScheduler()
    fake.names = {}
    module = scheduler_module.SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    bj = create_batch_job(client, site.site_id)
    full = "local scheduler could not submit: local queue: cannot write /q/jobs.json: Disk quota exceeded"
    fake.submit_errors = [SchedulerError(full, no_room=True) for _ in range(100)]
    caplog.clear()
    for _ in range(40):  # 40 cycles over 20 minutes
        module.run_cycle()
        clock.offset += 30.0
    tries = 100 - len(fake.submit_errors)
    assert 4 <= tries <= 12, tries  # waits of 1, 2, 4, ... 256, then 300 s (cycles 30 s apart): 11 of 40
    record = batch_job(client, bj["id"])
    assert record["state"] == "pending_submission", record
    assert record["status_info"]["waiting"] == f"waiting: no room on disk to submit ({full}); submitted once there is room"
    assert "error" not in record["status_info"]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
            and ("did not reach" in r.getMessage() or "no room on disk" in r.getMessage())]
    assert len(said) == 1, said
    fake.submit_errors = []
    clock.offset += scheduler_module.NO_ROOM_RETRY_MAX_SEC  # room again, at the next try
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and "waiting" not in record["status_info"], record
    assert len(fake.submitted) == 1


def test_no_room_in_a_submit_errors_text_is_not_a_wait(make_site: Any, client: Any) -> None:
    """Only the scheduler's own signal (SchedulerError.no_room) makes a wait for room: a submit refused
    with "No space left on device" in its text (a Slurm submit plugin's quota check on a remote
    controller) waited for ever, its submit command run every cycle. It is a try of the 3."""
    from balsam.scheduler import SchedulerError
    from balsam.site.modules.scheduler import SchedulerModule
    from site_test_utils import batch_job
    from test_site_scheduler_module import ScriptedScheduler

    site = make_site()
    fake = ScriptedScheduler()
    fake.names = {}
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    bj = create_batch_job(client, site.site_id)
    text = ("slurm scheduler could not submit: sbatch: error: Batch job submission failed: Job submit plugin "
            "rejected: /lus/proj quota check: No space left on device")
    fake.submit_errors = [SchedulerError(text) for _ in range(10)]
    for _ in range(module.threshold + 1):
        module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed", record
    assert 10 - len(fake.submit_errors) == module.threshold


def test_local_scheduler_says_no_room_by_its_exit_status(tmp_path: Path, batch_script: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The local queue's "no room" is its exit status EXIT_NO_ROOM, which the local scheduler reads as
    SchedulerError.no_room; another failure that names the same words is not one."""
    from balsam.builtin.local_scheduler import LocalScheduler
    from balsam.scheduler import CommandResult, SchedulerError

    refused = _full_for(monkeypatch, local_queue, ".json.tmp")
    err = io.StringIO()
    with redirect_stderr(err):
        code = local_queue.main(["--state-dir", str(tmp_path / "lq"), "submit", str(batch_script), "--name", "x"])
    assert refused and code == local_queue.EXIT_NO_ROOM
    driver = LocalScheduler(state_dir=tmp_path / "lq")
    with pytest.raises(SchedulerError) as info:
        driver.parse_submit(CommandResult(("q",), code, "", err.getvalue()))
    assert getattr(info.value, "no_room", False) is True and info.value.permanent is False
    with pytest.raises(SchedulerError) as info:
        driver.parse_submit(CommandResult(("q",), 1, "", "local queue: No space left on device"))
    assert getattr(info.value, "no_room", False) is False


def test_a_renewal_that_cannot_be_stored_is_not_repeated_every_cycle(make_site: Any, client: Any,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """It was renewed on the server, and a WARNING logged, at every scheduler cycle (86,400 a day at a
    1 s sync_period) while the disk stayed full."""
    import datetime as dt

    from balsam.client.settings import ClientSettings
    from balsam.site import launcher_credentials
    from balsam.site.launcher_credentials import LauncherCredentials

    site = make_site()
    bj = create_batch_job(client, site.site_id, "serial")
    credentials = LauncherCredentials(client, Path(site.site_path), site.site_id)
    credentials.mint({"id": bj["id"], "wall_time_min": 10})
    posts: list[str] = []
    real_post, real_save = client.post, ClientSettings.save

    def counting_post(url: str, *args: Any, **kwargs: Any) -> Any:
        posts.append(url)
        return real_post(url, *args, **kwargs)

    def full_save(self: Any, path: Any = None) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(client, "post", counting_post)
    monkeypatch.setattr(ClientSettings, "save", full_save)
    due = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2, hours=12)  # less than wall time + a day left
    batch_jobs = [{"id": bj["id"], "wall_time_min": 10}]
    for _ in range(5):
        assert credentials.renew_due(batch_jobs, now=due) == []
    assert len(posts) == 1
    assert sum("renewed, not stored" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(ClientSettings, "save", real_save)
    monkeypatch.setattr(launcher_credentials, "RENEW_STORE_RETRY_SEC", 0.0)
    credentials._renew_retry[bj["id"]] = 0.0  # the retry is due
    assert credentials.renew_due(batch_jobs, now=due) == [bj["id"]]
    assert len(posts) == 2


#: Every write to it fails with ENOSPC (the kernel's), whatever the file system under the test.
DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full")


def _worker_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a hook worker: sys.stdout and sys.stderr write to descriptors 1 and 2 (pytest replaces
    them at each phase of a test: set in the test itself)."""
    monkeypatch.setattr(sys, "stdout", open(1, "w", closefd=False))
    monkeypatch.setattr(sys, "stderr", open(2, "w", closefd=False))


class _Job:
    def __init__(self, record: dict) -> None:
        self.state = record["state"]

    def _store_parameters_changed_in_place(self) -> None:
        pass


class _Finishes:
    def __init__(self, job: Any) -> None:
        self.job = job

    def postprocess(self) -> None:
        print("postprocessing " + "x" * 20000)  # more than a buffer: written at once
        self.job.state = "JOB_FINISHED"


@needs_dev_full
def test_hook_result_stands_when_its_balsam_log_cannot_be_written(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's balsam.log on a full disk (a link to /dev/full). Before: the hook's print raised, and
    the job FAILED after a successful run (7 of 8 jobs in a real run); the log lines written around
    the hook failed the worker's whole chunk, "the hook worker process died: [Errno 28] ..."."""
    workdir = tmp_path / "w" / "7"
    workdir.mkdir(parents=True)
    (workdir / "balsam.log").symlink_to(DEV_FULL)
    monkeypatch.setattr(hooks_runner, "make_job_object", _Job)  # no API record needed: the state is all it reads
    monkeypatch.setattr(hooks_runner, "_snapshot", lambda job: {"state": job.state})
    _worker_streams(monkeypatch)
    update = hooks_runner.run_hook_on_job(_Finishes, {"id": 7, "state": "RUN_DONE", "workdir": "w/7"}, False, tmp_path)
    assert update["id"] == 7 and update["state"] == "POSTPROCESSED", update


class _FillingOs:
    """``os`` as hooks_runner sees it, with descriptors 1 and 2 (the redirected balsam.log) refusing
    writes, ENOSPC, while ``full`` is set: a disk that fills and then has room again."""

    def __init__(self) -> None:
        self.full = False
        self.refused: list[bytes] = []

    def write(self, fd: int, data: Any) -> int:
        if self.full and fd in (1, 2):
            self.refused.append(bytes(data))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_a_print_to_a_full_balsam_log_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the hook prints while the disk is full is dropped (it raised, and failed a job that ran);
    what it prints before and after reaches the log, whole and in order."""
    filling = _FillingOs()
    monkeypatch.setattr(hooks_runner, "os", filling)
    _worker_streams(monkeypatch)
    log = tmp_path / "balsam.log"
    with hooks_runner.redirected_output(log):
        print("before the disk filled", flush=True)  # stdout is block-buffered, as in a worker
        filling.full = True
        print("postprocessing " + "x" * 20000)
        print("a stderr line while full", file=sys.stderr)
        hooks_runner._note("#BALSAM a line of balsam's own while full")
        filling.full = False
        print("after there is room", file=sys.stderr)
        print("and a last line, for the closing flush")
    assert log.read_text().splitlines() == ["before the disk filled", "after there is room",
                                            "and a last line, for the closing flush"]
    dropped = b"".join(filling.refused)
    assert b"x" * 20000 in dropped and b"a stderr line while full" in dropped
    assert b"#BALSAM a line of balsam's own while full" in dropped


def test_a_hooks_stderr_stays_line_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sys.stderr in the hook is line-buffered, as Python's own: buffered, its lines came after those
    of the hook's children (which write descriptor 2 directly), and a hung hook SIGKILLed by the agent
    lost them."""
    _worker_streams(monkeypatch)
    log = tmp_path / "balsam.log"
    with hooks_runner.redirected_output(log):
        print("A: the hook's line", file=sys.stderr)
        assert log.read_text() == "A: the hook's line\n"  # written at the newline, not at the end
        subprocess.run(["sh", "-c", "echo 'B: its child' >&2"], check=True)
        print("C: the hook's line", file=sys.stderr)
    assert log.read_text().splitlines() == ["A: the hook's line", "B: its child", "C: the hook's line"]


def test_pid_file_on_a_full_disk_names_it_and_leaves_no_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.site import agent

    real_write_text = Path.write_text

    def full_write_text(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name.endswith(".tmp"):
            real_write_text(self, "")  # created, as on a full disk, then no room for the text
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_write_text)
    with pytest.raises(OSError, match=r"cannot write .*balsam-service\.pid: No space left on device"):
        agent.write_pid_file(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.undo()
    agent.write_pid_file(tmp_path)  # room again: the lock was given back, the agent starts
    agent.remove_pid_file(tmp_path)


def test_site_start_on_a_full_disk_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent that exits at start-up having said nothing (its console is on the full disk): the
    error said only "exit code 1"; it names the full file system (the site's, read with statvfs)."""
    from balsam.launcher import runner
    from balsam.site import site_ops

    real_popen = subprocess.Popen

    def silent_agent(args: Any, **kwargs: Any) -> Any:  # exits 1 with nothing written, as on a full disk
        return real_popen(["/bin/sh", "-c", "exit 1"], **kwargs)

    monkeypatch.setattr(subprocess, "Popen", silent_agent)
    monkeypatch.setattr(runner, "DISK_FULL_BYTES", 1 << 62)  # every file system reads as full
    with pytest.raises(site_ops.SiteError, match=r"the site agent exited at start-up: exit code 1; No space left on "
                                                 rf"device: the file system of {tmp_path} has \d+ bytes free"):
        site_ops.start_agent(tmp_path, wait_sec=10)
    monkeypatch.setattr(runner, "DISK_FULL_BYTES", 0)
    with pytest.raises(site_ops.SiteError, match=r"exited at start-up: exit code 1 \(see "):
        site_ops.start_agent(tmp_path, wait_sec=10)


def test_a_kept_marker_is_not_truncated_by_a_write_with_no_room(make_site: Any, client: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A .submitting marker kept for an earlier try whose outcome is unknown (a scheduler that cannot
    look jobs up by name) was rewritten in place: a write with no room truncated it, its note was
    lost, and a later refusal then removed it and revoked the credential that the earlier try's queued
    launcher needs. The marker is now written whole or not at all."""
    from balsam.scheduler import SchedulerError
    from balsam.site.modules import scheduler as scheduler_module
    from site_test_utils import batch_job
    from test_site_scheduler_module import ScriptedScheduler

    clock = _Clock()
    monkeypatch.setattr(scheduler_module, "time", clock)
    site = make_site()
    fake = ScriptedScheduler()  # names None: it cannot look jobs up by name
    module = scheduler_module.SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    bj = create_batch_job(client, site.site_id)
    script = module.script_path(bj["id"])
    pending = script.with_name(script.name + ".submitting")
    fake.errors_after_accept = [SchedulerError("qsub timed out after 60 s")]  # queued, outcome unknown
    module.run_cycle()
    assert list(fake.queue) and pending.is_file()
    real_write_text = Path.write_text

    def full(self: Path, *args: Any, **kwargs: Any) -> int:
        if ".submitting" in self.name:
            real_write_text(self, "")  # created or truncated, then no room
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    with monkeypatch.context() as disk_full:
        disk_full.setattr(Path, "write_text", full)
        module.run_cycle()
    note = pending.read_text()
    assert note.strip() and scheduler_module._pending_earlier_unknown(pending), repr(note)
    refused = SchedulerError("qsub: Unknown queue", permanent=True)
    fake.submit_errors = [refused]
    clock.offset += scheduler_module.NO_ROOM_RETRY_MAX_SEC
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed" and "may be in its queue" in record["status_info"]["error"], record
    assert pending.is_file(), "the marker of the try whose job may be queued was removed"
    assert len(_live_credentials(client, site.site_id, bj["id"])) == 1, "its queued launcher's credential was revoked"


def test_local_queue_submit_killed_after_its_record_says_never_started(tmp_path: Path, batch_script: Path) -> None:
    """The submit dies (SIGKILL) after storing the job's record, before writing "go": the script does
    not run, and the record read as if it had run and died ("ended without recording an exit
    status"). Its wrapper leaves <id>.unstarted: "never started (submit ended before it)"."""
    from balsam.builtin.local_scheduler import LocalScheduler

    state = tmp_path / "lq"
    _submit_killed_at_second_write(state, batch_script, stored=True)
    queue = local_queue.LocalQueue(state)
    [job_id] = queue.find(batch_script, "bj")
    _ended(queue, job_id)
    record = queue.history(job_id)
    assert record["message"] == "never started (submit ended before it)", record
    assert not (tmp_path / "ran.txt").exists()
    history = LocalScheduler._history(job_id, record)
    assert history is not None and history.message == "never started (submit ended before it)"


def test_local_queue_removes_the_files_of_a_pruned_record(tmp_path: Path, batch_script: Path) -> None:
    """A record kept KEEP_FINISHED_SEC after its job ended is pruned; its exit and marker files in
    jobs/ were kept for ever (a file per job ever run). They go with it."""
    state = tmp_path / "lq"
    queue = local_queue.LocalQueue(state)
    short = tmp_path / "short.sh"
    short.write_text("#!/bin/sh\nexit 0\n")
    short.chmod(0o755)
    old = _submit(queue, short)
    _ended(queue, old)
    queue.status()  # settles it
    jobs = state / "jobs"
    for ending in ("cancelled", "timeout", "unstarted"):
        (jobs / f"{old}.{ending}").touch()
    (jobs / "12345.unstarted").touch()  # a submit killed before it stored the record
    assert (jobs / f"{old}.exit").is_file()
    db = queue._read()
    db["jobs"][str(old)]["end_time"] -= local_queue.KEEP_FINISHED_SEC + 1
    queue._write(db)
    new = _submit(queue, short)
    assert str(old) not in queue._read()["jobs"]
    # .started: the queue's own marker that a wrapper was ever started here (not a job's file).
    assert sorted(p.name for p in jobs.iterdir() if not p.name.startswith(f"{new}.") and p.name != ".started") == []
    _ended(queue, new)

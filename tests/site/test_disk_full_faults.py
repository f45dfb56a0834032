"""The site's own writes on a full or over-quota file system (ENOSPC, EDQUOT), each fault injected at
the function that writes (a real full tmpfs showed each; docs/reliability.md, "When the disk is full").

- The local queue's state file: ``submit`` started the job, then failed to record it (a traceback):
  the agent submitted again (two launchers) and the first ran unknown to ``status``/``delete``. Now
  nothing starts, one line names the file, exit status 1 (tried again, not ``submit_failed``).
- A launcher credential minted and then not stored: every scheduler cycle minted another on the
  server (31 live credentials of one BatchJob in 31 s). Now it is revoked, and the error names the file.
- A hook's ``balsam.log`` that cannot be written: the worker's whole chunk failed, "the hook worker
  process died: [Errno 28] ...", and a hook's own ``print`` raised (its job FAILED after a
  successful run: 7 of 8 jobs in a real run). Now the output is dropped and the result stands.
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
        # The CLI the local scheduler runs: one line, exit status 1 (try again), not 2 (refused for good).
        err = io.StringIO()
        with redirect_stderr(err):
            code = local_queue.main(["--state-dir", str(tmp_path / "lq"), "submit", str(batch_script), "--queue",
                                     "local", "--project", "p", "--nodes", "1", "--walltime", "1", "--name", "x"])
        assert code == 1
        assert err.getvalue().count("\n") == 1 and "jobs.json: No space left on device" in err.getvalue()
    finally:
        for proc in started:
            os.killpg(proc.pid, 9)
            proc.wait()


def test_local_queue_ends_a_job_it_cannot_record(tmp_path: Path, batch_script: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills between the id's record and the job's: the job is ended, not left running unknown."""
    import psutil

    queue = local_queue.LocalQueue(tmp_path / "lq")
    started: list[Any] = []
    real_popen = subprocess.Popen

    def spy(*args: Any, **kwargs: Any) -> Any:
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(subprocess, "Popen", spy)
    monkeypatch.setattr(local_queue, "TERM_GRACE_SEC", 0.5, raising=False)
    _full_for(monkeypatch, local_queue, ".json.tmp", after=1)
    try:
        with pytest.raises(local_queue.QueueError, match=r"jobs\.json: No space left on device; job \d+ ended"):
            _submit(queue, batch_script)
        assert len(started) == 1
        assert started[0].wait(timeout=10) is not None  # ended by the submit, not left running
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


@needs_dev_full
def test_a_print_to_a_full_balsam_log_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    _worker_streams(monkeypatch)
    with hooks_runner.redirected_output(DEV_FULL):
        print("postprocessing " + "x" * 20000)
        print("and a last line, for the closing flush")
        print("and one to stderr", file=sys.stderr)
        hooks_runner._note("#BALSAM a line of balsam's own")


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

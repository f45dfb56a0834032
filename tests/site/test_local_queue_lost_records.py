"""The local queue never answers "no jobs" while it cannot prove there are none.

The site agent's scheduler module polls ``python -m balsam.builtin.local_queue status`` every
sync_period; a BatchJob whose job the poll no longer lists, and whose history answers null, ends
after 3 polls ("left the queue and has no history record"): the server revokes its launcher's
credential, and the launcher, still running, stops with its jobs cut off. Before:

- ``jobs.json`` deleted alone (its lock file kept) while a job ran: ``status`` printed ``{}`` and
  ``history`` null, exit status 0 (only ``submit`` refused), and the agent ended the BatchJob;
- in a state directory used before ``jobs/.started`` existed (the marker submit leaves before it
  starts a wrapper), ``jobs.json`` and its lock deleted: no wrapper was looked for, so the same.

Now both are one line on stderr and exit status 1 (a try: the agent's poll fails, the BatchJob is
left as it is), and ``status`` leaves the marker in an older directory whose records list a job.
Real components: the queue's entry point (``main``) on real directories with real wrapper processes
(``sleep``), the real local scheduler and the agent's real scheduler module against the real API.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from balsam.builtin import local_queue
from balsam.builtin.local_scheduler import LocalScheduler
from balsam.scheduler import Command, CommandResult, SchedulerError
from local_queue_testlib import count_scans, running_sleep_job  # tests/local_queue_testlib.py

READS = (("status",), ("history", "{id}"), ("find", "{script}", "--name", "bj"), ("delete", "{id}"))


def run(capsys: Any, state_dir: Path, *args: str) -> tuple[int, str, list[str]]:
    """The queue command's entry point: (exit status, stdout, stderr lines)."""
    code = local_queue.main(["--state-dir", str(state_dir), *args])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def _says(state: Path, what: str, *, lock_kept: bool = True) -> str:
    missing = "is missing" if lock_kept else "and its lock are missing"
    return (f"local queue: {state / 'jobs.json'} {missing} but {what}: the records were deleted; "
            f"restore them, or end those jobs and move {state} aside")


def assert_every_read_tries_again(capsys: Any, state: Path, job_id: int, script: Path, says: str) -> None:
    for args in READS:
        args = tuple(a.format(id=job_id, script=script) for a in args)
        assert run(capsys, state, *args) == (1, "", [says]), args


@pytest.fixture
def running(tmp_path: Path, capsys: Any) -> Iterator[tuple[Path, Path, int, int]]:
    """A job running (``sleep``) from state directory ``lq``: (state dir, script, job id, the
    wrapper's pid); its process group killed at the end."""
    with running_sleep_job(tmp_path, capsys) as job:
        yield job


def test_records_deleted_alone_while_a_job_runs_are_a_try(running: tuple[Path, Path, int, int], capsys: Any) -> None:
    state, script, job_id, pid = running
    (state / "jobs.json").unlink()  # its lock file kept
    assert_every_read_tries_again(capsys, state, job_id, script,
                                  _says(state, f"the wrapper of job {job_id} (pid {pid}) still runs"))
    assert not (state / "jobs.json").exists()  # nothing made

    # The local scheduler's poll fails (a try), rather than reporting an empty queue.
    with pytest.raises(SchedulerError) as info:
        LocalScheduler(state_dir=state, runner=_in_process).get_statuses()
    assert info.value.permanent is False and info.value.no_room is False and "still runs" in str(info.value)

    # The job ended since (its wrapper gone): the exit file its wrapper left tells of it.
    os.killpg(pid, signal.SIGTERM)
    os.waitpid(pid, 0)
    (state / "jobs" / f"{job_id}.exit").write_text("0 1\n")
    assert run(capsys, state, "status") == (1, "", [_says(state, f"1 job files in {state / 'jobs'} ({job_id}.exit)")])


def test_a_lock_without_records_or_marker_answers_no_jobs_without_a_scan(tmp_path: Path, capsys: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock without records and no wrapper ever started here (a first submit whose record a full
    disk refused, or status polls of older versions, leave that): "no jobs", and no look at every
    process of the user on each poll (that doubled a poll's CPU); a submit then goes through."""
    scans = count_scans(monkeypatch)
    state = tmp_path / "lq"
    (state / "jobs").mkdir(parents=True)
    (state / "jobs.json.lock").touch()
    assert run(capsys, state, "status") == (0, "{}\n", [])
    assert run(capsys, state, "history", "5") == (0, '{"5": null}\n', [])
    assert scans == []
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    code, out, err = run(capsys, state, "submit", str(script))
    assert code == 0, err
    pid = json.loads((state / "jobs.json").read_text())["jobs"][out.strip()]["pid"]
    os.waitpid(pid, 0)  # our child: submit ran in this process


def test_records_gone_between_the_look_and_the_lock_are_looked_for(running: tuple[Path, Path, int, int],
                                                                   capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """jobs.json and its lock deleted after a read command saw them (unlocked) and before it took
    the lock, which it then made: its records were there a moment ago, so it looks for the wrappers
    even without the marker (a directory from before it), rather than answer "no jobs"."""
    state, script, job_id, pid = running
    (state / "jobs" / ".started").unlink()
    real = local_queue.LocalQueue._is_missing

    def then_deleted(self: local_queue.LocalQueue) -> bool:
        answer = real(self)
        (state / "jobs.json").unlink(missing_ok=True)
        (state / "jobs.json.lock").unlink(missing_ok=True)
        return answer

    monkeypatch.setattr(local_queue.LocalQueue, "_is_missing", then_deleted)
    assert run(capsys, state, "status") == (
        1, "", [_says(state, f"the wrapper of job {job_id} (pid {pid}) still runs", lock_kept=False)])


def test_status_marks_a_directory_from_before_the_marker(running: tuple[Path, Path, int, int], capsys: Any) -> None:
    """A directory used before submit left ``jobs/.started``: status, reading records that list a job,
    leaves it; jobs.json and its lock deleted afterwards are then looked for (before: "no jobs")."""
    state, script, job_id, pid = running
    (state / "jobs" / ".started").unlink()
    code, out, err = run(capsys, state, "status")
    assert (code, list(json.loads(out)), err) == (0, [str(job_id)], [])
    assert (state / "jobs" / ".started").exists()
    (state / "jobs.json").unlink()
    (state / "jobs.json.lock").unlink()
    assert_every_read_tries_again(capsys, state, job_id, script,
                                  _says(state, f"the wrapper of job {job_id} (pid {pid}) still runs", lock_kept=False))


def _alive(pid: int) -> bool:
    """The process runs (a zombie, our child not reaped yet, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _in_process(command: Command) -> CommandResult:
    """The local scheduler's queue command (``python -m balsam.builtin.local_queue ARGS``) run by its
    real entry point in this process: the wrappers it starts are children of this test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = local_queue.main(list(command.args[3:]))
    return CommandResult(tuple(command.args), code, out.getvalue(), err.getvalue())


def test_the_agent_keeps_the_batch_job_of_a_launcher_still_running(make_site: Any, client: Any,
                                                                   tmp_path: Path) -> None:
    """The agent's scheduler module with the real local scheduler: jobs.json deleted (its lock kept)
    while the BatchJob's job runs. Before: 3 polls later the BatchJob was finished ("left the queue
    and has no history record") and its launcher credential revoked, the job still running. Now the
    polls fail: the BatchJob stays running, with its credential, and the outage is noted on it."""
    from balsam.site.modules.scheduler import SchedulerModule
    from balsam.site.service_client import list_all
    from site_test_utils import batch_job, create_batch_job

    site = make_site()
    Path(site.job_template_path).write_text("#!/bin/sh\nexec sleep 60\n")
    state = tmp_path / "queue"
    scheduler = LocalScheduler(_in_process, state_dir=state)
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=scheduler)

    def live_credentials(bj_id: int) -> list[dict]:
        return [row for row in list_all(client, "/auth/credentials", {"kind": "launcher", "site_id": site.site_id,
                                                                      "active": "true"})
                if row.get("batch_job_id") == bj_id]

    bj = create_batch_job(client, site.site_id)["id"]
    pid = None
    try:
        for _ in range(2):  # submitted, then seen running
            module.run_cycle()
        record = batch_job(client, bj)
        assert record["state"] == "running", record
        pid = json.loads((state / "jobs.json").read_text())["jobs"][str(record["scheduler_id"])]["pid"]
        assert len(live_credentials(bj)) == 1
        (state / "jobs.json").unlink()  # its lock file kept
        for _ in range(scheduler.status_error_threshold + 1):
            module.run_cycle()
        record = batch_job(client, bj)
        # (state, live credentials, the job's wrapper running); before: ("finished", 0, True).
        assert (record["state"], len(live_credentials(bj)), _alive(pid)) == ("running", 1, True), record["status_info"]
        assert "still runs" in record["status_info"].get("scheduler_status_error", ""), record["status_info"]
    finally:
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

"""Real server (SQLite and PostgreSQL), real transfers module, real local backend: an agent
restarted with the in-flight tasks file of an agent from before a task's location was kept (no
"where"), while a task of a deleted job still copies into its workdir (its cancel failing for now).
A job re-created with the deleted job's workdir stages in to the same file: it waits
(SAME_FILE_WAIT) as with a file of the current agent; it went at once beside the task still
writing that file (review repro /tmp/r5/rt/transfers/test_r5_restart_old_file.py). The same for an
orphaned stage-out writing a file inside the site's data path: such a task was taken for a
stage-in, and a new stage-out to that file ran beside it (review repro
/tmp/r7/rt/transfers/test_r7_f1_stageout_in_data_path.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import balsam.builtin.local_transfer as lt
from balsam.api import Job
from balsam.site.modules.transfers import TASKS_NAME
from balsam.transfer import TransferError
from transfer_test_utils import finish_as_a_launcher, hold_copies, make_site, stage_in_item, transfers_module

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager", "short_close_wait")


@pytest.fixture
def short_close_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first agent stops while its task's copy is held (the orphan these tests need): its close
    waited the full CLOSE_WAIT_SEC (10 s) for a copy that cannot end before the gate opens, in every
    test. A short wait leaves the same task running behind the stopped agent."""
    monkeypatch.setattr(lt, "CLOSE_WAIT_SEC", 0.2)

#: balsam.site.modules.transfers.SAME_FILE_WAIT
SAME_FILE = "waiting for an earlier transfer that writes the same file"


@pytest.mark.parametrize("old_file", [False, True], ids=["current-file", "file-without-where"])
def test_a_restarted_agent_holds_back_a_file_an_orphaned_task_still_writes(
        env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_file: bool) -> None:
    client, site, _, step, _, module = make_site(tmp_path, f"xfer-old-tasks-{old_file}")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "a.txt").write_text("a input\n")
    (shared / "a2.txt").write_text("a2 input\n")
    gate = hold_copies(monkeypatch, "jobs/a/input.txt")  # the first task keeps copying
    a = Job("jobs/a", step, transfers={"input": f"shared:{shared / 'a.txt'}"})
    a.save()
    try:
        module.run_cycle()
        task = stage_in_item(client, a.id)["task_id"]
        assert task and task in module.tracked_tasks
        tasks_file = Path(site.site_path) / TASKS_NAME
        saved = json.loads(tasks_file.read_text())
        assert saved[task]["where"] == ["in", "shared"]
        if old_file:  # as the agent before "where" wrote it
            tasks_file.write_text(json.dumps({t: {k: v for k, v in e.items() if k != "where"}
                                              for t, e in saved.items()}))
    finally:
        module.close()  # the agent stops (the task runs on: its copy is held)

    client.delete(f"/jobs/{a.id}")
    a2 = Job("jobs/a", step, transfers={"input": f"shared:{shared / 'a2.txt'}"})  # the same workdir
    a2.save()

    def cancel_fails(self: Any, task_id: str) -> None:
        raise TransferError("cancel: service unavailable (HTTP 503)", retryable=True)

    monkeypatch.setattr(lt.LocalTransfer, "cancel_task", cancel_fails)
    module2 = transfers_module(site, client)  # the restarted agent
    try:
        module2.run_cycle()
        item = stage_in_item(client, a2.id)
        assert task in module2.tracked_tasks  # the old task: still tracked, its cancel being retried
        assert item["state"] == "pending" and item["transfer_info"]["reason"].startswith(SAME_FILE), item
    finally:
        gate.set()
        module2.close()


def stage_out_item(client: Any, job_id: int) -> dict:
    (row,) = client.get("/transfers/", params={"job_id": job_id, "direction": "out"})["results"]
    return row


def test_a_restarted_agent_holds_back_a_file_inside_the_data_path_an_orphaned_stage_out_still_writes(
        env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Job a stages its result out to data/collected/latest.txt (inside the site's data path, through
    a local location); the agent stops (file without "where"), a is deleted, its task's cancel fails.
    Job b stages out to the same file: it waits, and no location is written back for the task."""
    client, site, site_id, step, _, module = make_site(tmp_path, "xfer-old-stage-out")
    data = Path(site.data_path)
    target = data / "collected" / "latest.txt"
    target.parent.mkdir(parents=True)
    gate = hold_copies(monkeypatch, "collected/latest.txt")
    a = Job("runs/a", step, transfers={"result": f"shared:{target}"})
    a.save()
    (data / "runs/a").mkdir(parents=True)
    (data / "runs/a/result.txt").write_text("a's result\n")
    finish_as_a_launcher(client, site_id, a.id)
    tasks_file = Path(site.site_path) / TASKS_NAME
    try:
        module.run_cycle()
        task = stage_out_item(client, a.id)["task_id"]
        assert task and task in module.tracked_tasks
        saved = json.loads(tasks_file.read_text())
        assert saved[task]["where"] == ["out", "shared"]
        tasks_file.write_text(json.dumps({t: {k: v for k, v in e.items() if k != "where"} for t, e in saved.items()}))
    finally:
        module.close()

    client.delete(f"/jobs/{a.id}")
    b = Job("runs/b", step, transfers={"result": f"shared:{target}"})
    b.save()
    (data / "runs/b").mkdir(parents=True)
    (data / "runs/b/result.txt").write_text("b's result\n")
    finish_as_a_launcher(client, site_id, b.id)

    def cancel_fails(self: Any, task_id: str) -> None:
        raise TransferError("cancel: service unavailable (HTTP 503)", retryable=True)

    monkeypatch.setattr(lt.LocalTransfer, "cancel_task", cancel_fails)
    module2 = transfers_module(site, client)
    try:
        module2.run_cycle()
        item = stage_out_item(client, b.id)
        assert task in module2.tracked_tasks
        assert item["state"] == "pending" and item["transfer_info"]["reason"].startswith(SAME_FILE), item
        assert "where" not in json.loads(tasks_file.read_text())[task]
    finally:
        gate.set()
        module2.close()

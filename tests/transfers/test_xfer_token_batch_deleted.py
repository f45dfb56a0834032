"""A batch journaled with a submission token (its submission's answer lost: the service may have
started its task) one of whose jobs the user deletes before the next cycle: the real server
(SQLite and PostgreSQL), the ``transfers`` module run cycle by cycle, the built-in ``local``
backend answering tokens as Globus answers submission ids (``answer_tokens_with_their_tasks``).

The batch was dropped from the journal as "finished or deleted": the task the service started under
its token ran on untracked (writing into the deleted job's workdir and the other jobs' inputs), and
the other jobs' items went into a new batch under a new token, a second copy beside it. Now the batch
is sent again with its token: the task that answers is recorded for the items still there (each
ends done, once), the deleted job's file is tracked as an item that left it; a batch none of whose
items is left is sent again only to cancel the task that answers.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pytest

from balsam.api import Job
from balsam.site.modules.transfers import JOURNAL_NAME, TASKS_NAME
from balsam.transfer import TaskState, TaskStatus
from test_transfer_module_refusals import T0, journal_tokens
from test_transfer_review_s3 import far_batch_journaled_with_a_deleted_item
from transfer_test_utils import answer_tokens_with_their_tasks, make_site, run_cycles, stage_in_item

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def two_jobs_staging_in(tmp_path: Path, name: str) -> tuple[Any, Any, Any, Any, Any]:
    """A site with two READY jobs ``a`` and ``b`` each staging in a file of ``shared``: (client, site,
    module, a, b)."""
    client, site, _, step, _, module = make_site(tmp_path, name)
    shared = tmp_path / "shared"
    shared.mkdir()
    jobs = []
    for letter in ("a", "b"):
        (shared / f"{letter}.txt").write_text(f"{letter} input\n")
        job = Job(f"jobs/{letter}", step, transfers={"input": f"shared:{shared / letter}.txt"})
        job.save()
        jobs.append(job)
    return client, site, module, jobs[0], jobs[1]


def test_a_token_batch_with_a_deleted_job_is_sent_again_and_its_task_tracked(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client, site, module, a, b = two_jobs_staging_in(tmp_path, "xfer-deleted-one")
    by_token = answer_tokens_with_their_tasks(module)
    try:
        module.run_cycle()  # one batch of both items under token-0; its task started, its answer lost
        assert list(by_token) == ["token-0"]
        assert '"token": "token-0"' in module.journal_path.read_text()
        a_item = stage_in_item(client, a.id)
        client.delete(f"/jobs/{a.id}")
        with caplog.at_level(logging.INFO, logger="balsam"):
            module.run_cycle()
        # Sent again with its token (the service answers with the task it has), not b's file under a new one.
        assert list(by_token) == ["token-0"]
        task = f"local:{by_token['token-0']}"
        assert stage_in_item(client, b.id)["task_id"] == task
        assert module.tracked_tasks.get(task) == {stage_in_item(client, b.id)["id"]}
        # The deleted job's file is the task's too: tracked as an item that left it.
        assert a_item["id"] in module._task_dests[task]
        assert any("deleted" in r.getMessage() and task in r.getMessage() for r in caplog.records)
        run_cycles(module, lambda: client.get(f"/jobs/{b.id}")["state"] == "STAGED_IN", "b's stage-in")
        assert stage_in_item(client, b.id)["state"] == "done"
        assert (Path(site.data_path) / "jobs/b/input.txt").read_text() == "b input\n"
        assert list(by_token) == ["token-0"]  # b's file was never sent a second time
        # Nothing left in flight: the journal and the in-flight file are gone.
        module.run_cycle()
        assert not (Path(site.site_path) / JOURNAL_NAME).exists()
        assert not (Path(site.site_path) / TASKS_NAME).exists()
    finally:
        module.close()


def test_a_token_batch_all_of_whose_jobs_were_deleted_has_its_task_cancelled(
        env: Any, tmp_path: Path, cancels: list[str]) -> None:
    client, site, module, a, b = two_jobs_staging_in(tmp_path, "xfer-deleted-all")
    by_token = answer_tokens_with_their_tasks(module)
    try:
        module.run_cycle()
        assert list(by_token) == ["token-0"]
        client.delete(f"/jobs/{a.id}")
        client.delete(f"/jobs/{b.id}")
        module.run_cycle()
        # The service's task of that token is found and cancelled; the record leaves the journal.
        assert cancels == [by_token["token-0"]]
        assert list(by_token) == ["token-0"]
        assert not (Path(site.site_path) / JOURNAL_NAME).exists()
    finally:
        module.close()


def test_a_journaled_batch_with_a_deleted_item_waits_for_a_slot_and_goes_with_its_token(tmp_path: Path) -> None:
    """The scripted backend of test_transfer_module_refusals (a token names its task), every slot
    taken when the item is deleted: the record stays (it used to leave the journal at once, and the
    batch's other files went later under a new token), and once a slot is free the batch is sent
    with its token, its task recorded for the 4 items left."""
    api, module, backend, clock, journaled = far_batch_journaled_with_a_deleted_item(tmp_path)
    del backend.refusals["far"]
    for tid in list(backend.tasks):
        backend.tasks[tid] = TaskStatus(TaskState.done)
    clock[0] = T0 + dt.timedelta(seconds=15)
    module.run_cycle()
    assert journal_tokens(module) == []
    assert [api.items[i]["task_id"] for i in journaled[1:]] == ["scripted:tok-1"] * 4
    # None of the batch's files went under another token.
    first = set(backend.files["tok-1"][i].dest for i in range(5))
    assert all(token == "tok-1" or not (set(dests) & first) for alias, token, dests in backend.calls if alias == "far")

"""The site agent's journal of submissions (``.transfer-tasks.jsonl``) after a DAG child's stage-in
is held again (``awaiting_job``: the child re-run, waiting for its parents): the real server
(SQLite and PostgreSQL), the ``transfers`` module run cycle by cycle with the built-in ``local``
backend. In each case the task submitted before the hold copies the parent's first output slowly
(it opened the file before the re-run): left running, its copy lands over the fresh one after the
release, with the child already STAGED_IN.

- A batch journaled with a submission token (its submission's answer lost) whose item is still held
  at the next cycle was dropped from the journal, neither sent again nor its task cancelled. It is
  now sent again with its token and the task that answers is cancelled.
- A task line left by a cycle whose PATCH failed (the API down), its item held meanwhile: the next
  cycle dropped the line without tracking the task (only the start-up tracked journal lines). It is
  now tracked, and cancelled as a task whose items left it.
- A task line of an agent from before the holds were journaled (no count): the item's own count
  stood in for the line's, so a hold since never showed and the item was re-attached to that task.
  A line without a count now reads as 0.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from balsam.site.modules.transfers import TransfersModule
from transfer_test_utils import (answer_tokens_with_their_tasks, fail_the_first_transfers_patch, make_released_dag,
                                 move_job, rerun, rerun_and_release, run_cycles)

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def wait_for_local_tasks(module: TransfersModule) -> None:
    """Let every copy thread of the local backend end (a cancelled one writes nothing more)."""
    for future in list(module.backend("local")._tasks._running.values()):
        future.result(30)


def the_child_reads_the_second_output(module: TransfersModule, client: Any, site: Any, child: Any,
                                      stale_first_copy: threading.Event) -> None:
    """The child's stage-in ends; once the stale copy has landed too (or not, cancelled), its input
    is still the parent's second output."""
    run_cycles(module, lambda: client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN", "the child's stage-in")
    stale_first_copy.set()
    wait_for_local_tasks(module)
    assert (Path(site.data_path) / "dag/child/input.txt").read_text() == "second\n"


def the_parents_second_run_reaches_the_child(module: TransfersModule, client: Any, site: Any, parent: Any, child: Any,
                                             handoff: Path, stale_first_copy: threading.Event) -> None:
    """The parent's second run writes "second" and finishes (the child released); the child reads it."""
    handoff.write_text("second\n")
    move_job(client, parent.id, "RUNNING", "RUN_DONE", "POSTPROCESSED")
    the_child_reads_the_second_output(module, client, site, child, stale_first_copy)


def test_a_token_batch_whose_item_is_still_held_is_sent_again_and_its_task_cancelled(
        env: Any, tmp_path: Path, stale_first_copy: threading.Event, cancels: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    client, site, _, parent, child, handoff, module = make_released_dag(tmp_path, "f5-journal")
    by_token = answer_tokens_with_their_tasks(module)
    try:
        module.run_cycle()  # token-0's task started, its answer lost: the token stays journaled
        assert '"token": "token-0"' in module.journal_path.read_text()
        rerun(client, parent.id, child.id)
        with caplog.at_level(logging.INFO, logger="balsam"):
            module.run_cycle()  # the item is held: the batch is sent again, its task cancelled
        assert cancels == [by_token["token-0"]]
        assert any("some of its items were held again since" in r.getMessage() for r in caplog.records)
        assert not module.journal_path.exists()
        the_parents_second_run_reaches_the_child(module, client, site, parent, child, handoff, stale_first_copy)
    finally:
        stale_first_copy.set()
        module.close()


def test_a_task_line_left_by_a_failed_patch_is_cancelled_when_its_item_is_held(
        env: Any, tmp_path: Path, stale_first_copy: threading.Event, cancels: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    client, site, _, parent, child, handoff, module = make_released_dag(tmp_path, "f5-journal")
    fail_the_first_transfers_patch(monkeypatch, module, "the API is unreachable")
    try:
        with pytest.raises(ConnectionError):
            module.run_cycle()  # submitted and journaled; the PATCH recording it fails
        (line,) = module.journal_path.read_text().splitlines()
        task_id = json.loads(line)["task_id"]
        rerun(client, parent.id, child.id)
        module.run_cycle()  # the item is held: not read, its journal line dropped
        assert cancels == [task_id.partition(":")[2]]
        assert not module.journal_path.exists()
        the_parents_second_run_reaches_the_child(module, client, site, parent, child, handoff, stale_first_copy)
    finally:
        stale_first_copy.set()
        module.close()


def test_a_journal_line_without_counts_is_not_re_attached_after_a_hold(
        env: Any, tmp_path: Path, stale_first_copy: threading.Event, cancels: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent from before the counts submitted the child's item (its task copies the parent's
    first output, slowly) and died before its PATCH; the child was re-run, held (counted) and
    released. The upgraded agent, started while the service still runs that task, submits the item
    again and cancels the old task."""
    client, site, _, parent, child, handoff, module = make_released_dag(tmp_path, "f5-journal")
    fail_the_first_transfers_patch(monkeypatch, module, "the agent died before its PATCH")
    agent: TransfersModule | None = None
    try:
        with pytest.raises(ConnectionError):
            module.run_cycle()
        (line,) = module.journal_path.read_text().splitlines()
        old = json.loads(line)
        # As an agent from before the counts wrote it.
        module.journal_path.write_text(json.dumps({"task_id": old["task_id"], "item_ids": old["item_ids"]}) + "\n")
        rerun_and_release(client, parent, child, handoff)
        (item,) = client.get("/transfers/", params={"job_id": child.id, "direction": "in"})["results"]
        assert item["state"] == "pending" and item["transfer_info"]["holds"] == 1
        agent = TransfersModule(site, module.options, client)  # the upgraded agent
        agent.backends = module.backends  # the service still runs the old task
        agent.run_cycle()
        assert cancels == [old["task_id"].partition(":")[2]]
        assert client.get(f"/transfers/{item['id']}")["task_id"] not in ("", old["task_id"])
        the_child_reads_the_second_output(agent, client, site, child, stale_first_copy)
    finally:
        stale_first_copy.set()
        if agent is not None:
            agent.close()
        module.close()

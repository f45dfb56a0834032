"""A transfer task that "runs on" for other jobs' items after one of its items was held again (its
job re-run and sent back to wait for its parents: ``awaiting_job``): the real server (SQLite and
PostgreSQL), the ``transfers`` module run cycle by cycle with the built-in ``local`` backend.

- The held item's file fails inside the task (its source removed with the re-run). The agent used
  to know only the items still on the task: the error matched none of them and the OTHER job's
  item, whose own file was copied, was charged a failed try (its job FAILED at max_attempts=1).
  The module now keeps what each task writes, by item, also for the items that left it: the
  error is the held item's and is dropped (DEBUG). Two ways to leave: the submission's PATCH
  refused (409, held just before it), or the item held by the server while its task runs.
- The held item's job is released while the old task still writes its destination (a slow copy of
  the first output). Submitted at once, the new copy could land first and the old one over it,
  with the job already STAGED_IN. The item now waits for that task ("waiting for task T, which
  still writes its destination"), then is copied again: the job reads the parent's new output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pytest

from balsam.api import Job
from transfer_test_utils import (HandoffDag, hold_copies, make_handoff_dag, make_shared_task_dag, make_site, move_job,
                                 rerun, run_cycles, site_errors, slow_first_copy, stage_in_item)

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


def make_handoff_dag_and_a_lone_job(tmp_path: Path, first_output: str, **opts: Any) -> tuple[HandoffDag, Any]:
    """A ``HandoffDag`` whose parent has finished its first run (``first_output`` staged out, the
    child READY), and a job of its own staging in ``shared/lone.txt``: (dag, lone job)."""
    dag = make_handoff_dag(tmp_path, "f5-site", **opts)
    shared = dag.handoff.parent
    (shared / "lone.txt").write_text("lone input\n")
    dag.finish_parent(first_output, "the parent's finish", check_acquired=False)
    lone = Job("lone", dag.app, transfers={"input": f"shared:{shared / 'lone.txt'}"})
    lone.save()
    return dag, lone


def rerun_before_the_first_submission(module: Any, client: Any, parent: Any, child: Any,
                                      then: Callable[[], Any] = lambda: None) -> None:
    """The parent and the child are re-run (``then``: what the user does next) between the module's
    read of the due items and its first submission."""
    original = module._submit
    done: list[bool] = []

    def rerun_then_submit(due: Any, *a: Any, **k: Any) -> Any:
        if not done:
            done.append(True)
            rerun(client, parent.id, child.id)
            then()
        return original(due, *a, **k)

    module._submit = rerun_then_submit  # type: ignore[method-assign]


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_a_held_items_failed_file_in_a_task_that_runs_on_is_not_charged_to_the_others(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, max_attempts: int) -> None:
    """Held between the module's read and its PATCH: the PATCH is refused (409), the task runs on
    for the other job's item, and the held item's source is gone (removed with the re-run)."""
    dag, lone = make_handoff_dag_and_a_lone_job(tmp_path, "first\n", max_attempts=max_attempts)
    client, site_id, module, data = dag.client, dag.site_id, dag.module, dag.data
    parent, child, handoff = dag.parent, dag.child, dag.handoff
    lone_in = stage_in_item(client, lone.id)

    rerun_before_the_first_submission(module, client, parent, child, handoff.unlink)  # the wrong output removed
    with caplog.at_level(logging.DEBUG, logger="balsam"):
        run_cycles(module, lambda: client.get(f"/jobs/{lone.id}")["state"] in ("STAGED_IN", "FAILED"),
                   "the lone job's stage-in")
    try:
        assert client.get(f"/jobs/{lone.id}")["state"] == "STAGED_IN"
        item = client.get(f"/transfers/{lone_in['id']}")
        assert item["state"] == "done" and "attempts" not in item["transfer_info"], item
        assert (data / "lone/input.txt").read_text() == "lone input\n"
        assert not site_errors(caplog)
        assert any("runs on for its other items" in r.getMessage() for r in caplog.records)
        assert any("which left the task" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
        child_in = stage_in_item(client, child.id)
        assert child_in["state"] == "awaiting_job" and client.get(f"/jobs/{child.id}")["state"] == "AWAITING_PARENTS"
    finally:
        module.close()


def test_an_item_held_in_flight_in_a_shared_task_does_not_fail_the_other_job(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held by the server while its task runs (``active``, task id cleared): the task runs on for
    the other job's item, and the held item's file, not read yet (its copy waits, as in a queued
    task), is gone by then."""
    client, site, site_id, Step, NoOut, module = make_site(tmp_path, "f5-site", max_attempts=1)
    parent, child, lone, handoff = make_shared_task_dag(tmp_path, Step, NoOut, client)
    gate = hold_copies(monkeypatch, "dag/child/input.txt")
    try:
        with caplog.at_level(logging.DEBUG, logger="balsam"):
            module.run_cycle()  # one task for the child's and the lone job's items
            tasks = {r["task_id"] for r in client.get("/transfers/", params={"site_id": site_id, "direction": "in"})["results"]}
            assert len(tasks) == 1 and "" not in tasks
            rerun(client, parent.id, child.id)
            handoff.unlink()  # the wrong output removed with the re-run
            gate.set()
            run_cycles(module, lambda: client.get(f"/jobs/{lone.id}")["state"] in ("STAGED_IN", "FAILED"),
                       "the lone job's stage-in")
        assert client.get(f"/jobs/{lone.id}")["state"] == "STAGED_IN"
        assert (Path(site.data_path) / "lone/input.txt").read_text() == "lone input\n"
        assert not site_errors(caplog)
        assert any("which left the task" in r.getMessage() for r in caplog.records)
    finally:
        gate.set()
        module.close()


def test_a_released_item_waits_for_the_old_task_that_still_writes_its_destination(
        env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old task (running on for another job's item) copies the parent's first output slowly: it
    opened the source before the re-run and ends after the release. The child's item waits for it,
    then is copied again: the child reads the parent's second output, and nothing overwrites it."""
    dag, lone = make_handoff_dag_and_a_lone_job(tmp_path, "the parent's first output\n")
    client, site_id, module, data = dag.client, dag.site_id, dag.module, dag.data
    parent, child, handoff = dag.parent, dag.child, dag.handoff
    child_in = stage_in_item(client, child.id)

    gate = slow_first_copy(monkeypatch, tmp_path / "old-inode", "dag/child/input.txt")
    rerun_before_the_first_submission(module, client, parent, child)
    try:
        with caplog.at_level(logging.INFO, logger="balsam"):
            module.run_cycle()  # the old task: [child (refused: held), lone]; it runs on for lone
            (old_task,) = [t for t in module.tracked_tasks]
            # The parent's new run and stage-out release the child: its item is pending again.
            (data / "dag/parent/result.txt").write_text("the parent's second output\n")
            move_job(client, parent.id, "RUNNING", "RUN_DONE", "POSTPROCESSED")
            run_cycles(module, lambda: client.get(f"/transfers/{child_in['id']}")["state"] == "pending"
                       and "waiting for task" in str(client.get(f"/transfers/{child_in['id']}")["transfer_info"]),
                       "the child's item waiting for the old task")
            item = client.get(f"/transfers/{child_in['id']}")
            assert item["transfer_info"]["reason"] == (
                f"waiting for task {old_task}, which still writes its destination"), item
            assert client.get(f"/jobs/{child.id}")["state"] == "READY"
            module.run_cycle()
            assert client.get(f"/transfers/{child_in['id']}")["state"] == "pending"  # still waits
            gate.set()  # the old task ends (its stale copy lands now)
            run_cycles(module, lambda: client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN", "the child's stage-in")
            run_cycles(module, dag.settled, "no transfer left")
        assert (data / "dag/child/input.txt").read_text() == "the parent's second output\n"
        assert client.get(f"/jobs/{lone.id}")["state"] == "STAGED_IN"
        assert not site_errors(caplog)
    finally:
        gate.set()
        module.close()

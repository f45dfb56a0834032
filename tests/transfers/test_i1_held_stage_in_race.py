"""A DAG child re-run with its parent (sent back to AWAITING_PARENTS, its stage-in held again:
``awaiting_job``) while the site agent's ``transfers`` module is busy with the child's stage-in item:
the real server (SQLite and PostgreSQL), the module run cycle by cycle with the built-in ``local``
backend, the re-run sent through the API at the moment named by each case.

- ``before_submit``: the module has read the item ``pending`` and submits it after the re-run. Its
  PATCH to ``active`` (with the new task id) was accepted: the item left ``awaiting_job``, the
  stale copy (the parent's first output) was followed to ``done``, and at the release the child went
  straight to STAGED_IN and ran on the first run's file. The server now refuses the PATCH (409, the
  item held); the module cancels the task it just submitted, logs one INFO line, and fails nothing.
- ``in_flight``: the item was ``active`` (a task running) when the job was sent back to wait. It was
  left in flight, its stale copy recorded ``done``, with the same end. It is now held as the others
  (``awaiting_job``, its task id cleared); the module cancels the task, no item being left on it.
- ``before_report``: the module has polled the task ``done`` when the re-run comes, then reports it.
  Its PATCH to ``done`` is refused as in ``before_submit``; nothing to cancel.

Each way, the item is copied again once the parent has finished its new run, and the child reads
the parent's second output."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from transfer_test_utils import make_handoff_dag, move_job, run_cycles, stage_in_item

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


@pytest.mark.parametrize("when", ["before_submit", "in_flight", "before_report"])
def test_a_child_sent_back_to_wait_mid_stage_in_reads_the_parents_new_output(
        env: Any, tmp_path: Path, when: str, caplog: pytest.LogCaptureFixture) -> None:
    dag = make_handoff_dag(tmp_path, "i1-site")
    client, parent, child, handoff, module, data = dag.client, dag.parent, dag.child, dag.handoff, dag.module, dag.data
    job_state, settled = dag.state, dag.settled
    item = stage_in_item(client, child.id)

    def item_now() -> dict:
        return client.get(f"/transfers/{item['id']}")

    # The parent's first run: its output goes out to the location, the child is released (READY, its
    # stage-in pending) by the PATCH that records the stage-out done, at the end of that cycle.
    dag.finish_parent("the parent's first output\n", "the parent's first finish")
    assert (handoff.read_text(), job_state(child.id), item_now()["state"]) == (
        "the parent's first output\n", "READY", "pending")

    def rerun() -> None:  # `balsam job modify --id P --id C -s RESTART_READY`: the parent's output was wrong
        dag.rerun()
        assert (job_state(parent.id), job_state(child.id)) == ("RESTART_READY", "AWAITING_PARENTS")

    def once_after(name: str, before: bool) -> None:
        """Wrap the module's method ``name``: the re-run comes once, right before or after it."""
        original = getattr(module, name)
        done: list[bool] = []

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if before and not done:
                done.append(True)
                rerun()
            result = original(*args, **kwargs)
            if not before and not done:
                done.append(True)
                rerun()
            return result

        setattr(module, name, wrapped)

    if when == "before_submit":
        once_after("_submit", before=True)  # the item was read pending; the re-run; then its submission
    else:
        module.run_cycle()  # the child's stage-in is submitted
        assert item_now()["state"] == "active"
        if when == "in_flight":
            rerun()
        else:
            # Let the local copy end, so that this poll finds the task done; the re-run comes
            # between that poll and the PATCH that reports it.
            deadline = 100
            while not (data / "dag/child/input.txt").exists() and deadline:
                time.sleep(0.05)
                deadline -= 1
            once_after("_poll", before=False)

    with caplog.at_level(logging.INFO, logger="balsam"):
        run_cycles(module, settled, "a settled state while the parent runs again")
    assert job_state(child.id) == "AWAITING_PARENTS"
    held = item_now()
    assert (held["state"], held["task_id"]) == ("awaiting_job", "")
    records = [r for r in caplog.records if r.name.startswith("balsam.site")]
    assert not [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    said = [r.getMessage() for r in records if "held again" in r.getMessage()]
    if when == "in_flight":  # the next cycle finds no item left on the task
        assert said and said[0].endswith("its items are held again (their jobs wait for their parents again); "
                                         "cancelling it"), said
    else:  # the refused PATCH: one line
        assert len(said) == 1 and said[0].startswith(f"1 transfer item held again ({item['id']}): "), said
        if when == "before_submit":
            assert said[0].endswith("cancelled"), said

    # The parent's new run: its new output goes out, the child is released and stages it in.
    (data / "dag/parent/result.txt").write_text("the parent's second output\n")
    move_job(client, parent.id, "RUNNING", "RUN_DONE", "POSTPROCESSED")
    run_cycles(module, lambda: job_state(child.id) != "AWAITING_PARENTS" and settled(),
               "the child's release and the end of its stage-in")
    assert handoff.read_text() == "the parent's second output\n"
    assert (job_state(parent.id), job_state(child.id)) == ("JOB_FINISHED", "STAGED_IN")
    assert (data / "dag/child/input.txt").read_text() == "the parent's second output\n"
    moves = dag.child_moves()
    assert moves[-3:] == [("RESTART_READY", "AWAITING_PARENTS"), ("AWAITING_PARENTS", "READY"), ("READY", "STAGED_IN")]
    assert "FAILED" not in {s for m in moves for s in m}
    module.close()


def test_a_task_shared_with_another_jobs_item_runs_on(env: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The held child's stage-in and another job's were submitted as one task (one batch: same
    location, same direction). The child's item is refused as held; the other's is recorded, so the
    task is not cancelled (a task is one unit for its service): it ends ``done`` for the other job,
    the child's item stays held, and is copied after the parent's new run."""
    from balsam.api import Job

    dag = make_handoff_dag(tmp_path, "i1-shared-site")
    client, parent, child, handoff, module, data = dag.client, dag.parent, dag.child, dag.handoff, dag.module, dag.data
    job_state, settled, Step = dag.state, dag.settled, dag.app
    dag.finish_parent("the parent's first output\n", "the parent's first finish")
    lone = Job("lone", Step, transfers={"input": f"shared:{handoff}"})  # reads the same file, no parent
    lone.save()
    child_in, lone_in = stage_in_item(client, child.id), stage_in_item(client, lone.id)
    assert {child_in["state"], lone_in["state"]} == {"pending"}

    original = module._submit
    submitted: list[list[int]] = []

    def rerun_then_submit(due: list[dict], *args: Any, **kwargs: Any) -> Any:
        if not submitted:
            submitted.append(sorted(it["id"] for it in due))
            dag.rerun()
        return original(due, *args, **kwargs)

    module._submit = rerun_then_submit  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="balsam"):
        module.run_cycle()
        assert submitted == [sorted([child_in["id"], lone_in["id"]])]
        task = client.get(f"/transfers/{lone_in['id']}")["task_id"]
        said = [r.getMessage() for r in caplog.records if "held again" in r.getMessage()]
        assert said == [f"1 transfer item held again ({child_in['id']}): their jobs wait for their parents again; "
                        f"not recorded, copied again when their jobs are released; task {task} runs on for its "
                        "other items"]
        run_cycles(module, settled, "the end of the shared task")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert (job_state(lone.id), (data / "lone/input.txt").read_text()) == ("STAGED_IN", "the parent's first output\n")
    held = client.get(f"/transfers/{child_in['id']}")
    assert (held["state"], held["task_id"], job_state(child.id)) == ("awaiting_job", "", "AWAITING_PARENTS")
    assert not module.tracked_tasks

    (data / "dag/parent/result.txt").write_text("the parent's second output\n")
    move_job(client, parent.id, "RUNNING", "RUN_DONE", "POSTPROCESSED")
    run_cycles(module, lambda: job_state(child.id) != "AWAITING_PARENTS" and settled(),
               "the child's release and the end of its stage-in")
    assert job_state(child.id) == "STAGED_IN"
    assert (data / "dag/child/input.txt").read_text() == "the parent's second output\n"
    module.close()

"""``balsam.dependencies.parent_wait``: the one rule ``balsam job show`` and the dashboard's job page
use to say what a job in AWAITING_PARENTS waits for (the server's release check, Balsam 0.7's:
only the parents that still exist must be JOB_FINISHED; a deleted parent is not waited for; a
FAILED one keeps its children waiting)."""

from __future__ import annotations

import ast
from pathlib import Path

import balsam.dependencies as dependencies
from balsam.dependencies import DELETED, parent_wait
from balsam.states import JobState


def test_a_deleted_parent_is_listed_but_not_waited_for_a_failed_one_is() -> None:
    wait = parent_wait(30, "AWAITING_PARENTS", [27, 25, 26, 24],
                       {24: "JOB_FINISHED", 26: JobState.failed, 27: JobState.running})
    assert wait.waiting
    assert wait.parents == [(24, "JOB_FINISHED"), (25, None), (26, "FAILED"), (27, "RUNNING")]  # by id, the deleted as None
    assert wait.waits_for == [(26, "FAILED"), (27, "RUNNING")]  # not the finished one, not the deleted one
    assert wait.waits_for_text == "26 (FAILED), 27 (RUNNING)"
    failed, deleted = wait.advice
    assert "a FAILED parent keeps its children waiting" in failed
    assert "`balsam job modify -i 26 -s RESTART_READY`" in failed  # re-run the parent
    assert "`balsam job modify -i 30 -s READY`" in failed  # or move the child on without it
    assert "a deleted parent is not waited for (25)" in deleted
    assert not any("never finishes" in line for line in wait.advice)
    assert DELETED == "deleted"


def test_every_failed_parent_is_in_the_re_run_command() -> None:
    wait = parent_wait(9, JobState.awaiting_parents, [3, 1, 2], {1: "FAILED", 2: "STAGED_IN", 3: "FAILED"})
    assert wait.waits_for == [(1, "FAILED"), (2, "STAGED_IN"), (3, "FAILED")]
    assert [line for line in wait.advice if "`balsam job modify -i 1 -i 3 -s RESTART_READY`" in line]


def test_nothing_left_to_wait_for() -> None:
    # every parent that still exists finished, one deleted: not waiting for anything (the server
    # releases such a child; one still shown waiting can be moved on)
    wait = parent_wait(5, "AWAITING_PARENTS", [1, 2], {1: "JOB_FINISHED"})
    assert wait.waits_for == [] and wait.waits_for_text.startswith("none")
    assert any("`balsam job modify -i 5 -s READY`" in line for line in wait.advice)
    assert any("a deleted parent is not waited for (2)" in line for line in wait.advice)
    only_deleted = parent_wait(6, "AWAITING_PARENTS", [4], {})
    assert only_deleted.parents == [(4, None)] and only_deleted.waits_for == []


def test_a_job_not_waiting_lists_its_parents_only() -> None:
    for state in ("READY", JobState.finished, JobState.failed):
        wait = parent_wait(5, state, [2, 1], {1: "FAILED"})
        assert wait.parents == [(1, "FAILED"), (2, None)]
        assert not wait.waiting and wait.waits_for == [] and wait.advice == [] and wait.waits_for_text == ""
    assert parent_wait(5, "READY", None, {}).parents == []


def test_the_module_is_neutral() -> None:
    """Imported by the CLI (client) and the dashboard (server): it imports neither."""
    tree = ast.parse(Path(dependencies.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "dataclasses", "typing", "balsam.states"}, imported

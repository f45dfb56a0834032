"""A DAG whose parent stages its output out to a location and whose child stages it in from there,
end to end: the real server (SQLite and PostgreSQL), the site agent's ``transfers`` module run
cycle by cycle with the built-in ``local`` backend.

The child's stage-in items were ``pending`` from its creation, so the agent's first cycles copied
the child's input while the parent had not run: the file an earlier run had left there (the child
then ran on it, released straight to STAGED_IN), or no file (its tries used up, the child FAILED
while it waited). The child's stage-in now waits until its parent has finished."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from transfer_test_utils import make_handoff_dag, run_cycles

pytestmark = pytest.mark.usefixtures("fresh_plugin_manager")


@pytest.mark.parametrize("left_there", ["stale", "missing"])
def test_the_child_stages_in_what_its_parent_staged_out(env: Any, tmp_path: Path, left_there: str) -> None:
    dag = make_handoff_dag(tmp_path, "dag-site")
    client, child, handoff, module = dag.client, dag.child, dag.handoff, dag.module
    if left_there == "stale":
        handoff.write_text("an earlier run's output\n")
    assert (dag.parent.state, child.state) == ("STAGED_IN", "AWAITING_PARENTS")

    run_cycles(module, dag.settled, "a settled state while the parent runs")  # the agent, while the parent runs
    assert client.get(f"/jobs/{child.id}")["state"] == "AWAITING_PARENTS"

    dag.finish_parent("the parent's output\n")
    run_cycles(module, lambda: client.get(f"/jobs/{child.id}")["state"] != "AWAITING_PARENTS" and dag.settled(),
               "the child's release and the end of its stage-in")
    assert client.get(f"/jobs/{dag.parent.id}")["state"] == "JOB_FINISHED"
    assert handoff.read_text() == "the parent's output\n"
    assert client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN"
    assert (dag.data / "dag/child/input.txt").read_text() == "the parent's output\n"
    assert dag.child_moves() == [("CREATED", "AWAITING_PARENTS"), ("AWAITING_PARENTS", "READY"), ("READY", "STAGED_IN")]

"""NodeFaults holds a quick failure only while it may lead to taking its node out, and never for long."""

from __future__ import annotations

from balsam.launcher import node_manager
from balsam.launcher.node_manager import Exit, NodeFaults

PROXY = "ssh: Could not resolve hostname nid-down-001\n[mpiexec@x] Launch proxy failed."


def _exit(job_id: int, node: int, rc: int = 255, seconds: float = 0.1, tail: str = PROXY) -> Exit:
    return Exit(job_id, node, rc, seconds, tail, 1000.0 + job_id)


def test_a_quick_failure_without_the_launchers_message_is_reported_at_once() -> None:
    faults = NodeFaults(4, threshold=3)
    verdict = faults.note(_exit(1, 2, rc=3, tail="bad input"), now=0.0)
    assert [e.job_id for e in verdict.report] == [1] and faults.held_ids() == []


def test_an_unsigned_quick_failure_ends_the_streak_and_reports_what_was_held_with_it() -> None:
    faults = NodeFaults(4, threshold=3)
    assert faults.note(_exit(1, 2), now=0.0).report == ()  # held: it may be the node
    verdict = faults.note(_exit(2, 2, rc=1, tail="Traceback: KeyError"), now=0.1)
    assert [e.job_id for e in verdict.report] == [1, 2] and verdict.disabled is None and faults.held_ids() == []


def test_a_launch_failure_on_a_one_node_partition_is_reported_at_once() -> None:
    faults = NodeFaults(1)
    assert [e.job_id for e in faults.note(_exit(1, 0), now=0.0).report] == [1] and faults.held_ids() == []


def test_a_held_failure_is_reported_when_no_further_exit_comes_on_its_node_in_time() -> None:
    HELD_EXIT_MAX_SEC = node_manager.HELD_EXIT_MAX_SEC
    faults = NodeFaults(3, threshold=3)
    faults.note(_exit(1, 0), now=100.0)
    faults.note(_exit(2, 1), now=100.0)
    faults.note(_exit(3, 1), now=100.0 + HELD_EXIT_MAX_SEC - 1)  # node 1's streak goes on
    assert faults.expire(now=100.0 + HELD_EXIT_MAX_SEC - 0.5) == ()
    assert [e.job_id for e in faults.expire(now=100.0 + HELD_EXIT_MAX_SEC)] == [1]
    assert faults.held_ids() == [2, 3]
    assert [e.job_id for e in faults.expire(now=100.0 + 2 * HELD_EXIT_MAX_SEC)] == [2, 3]
    assert faults.held_ids() == [] and faults.expire(now=1e9) == ()
    # A streak that expired starts over: a node is still taken out after threshold failures in a row.
    for job_id in (4, 5):
        faults.note(_exit(job_id, 1), now=200.0)
    assert faults.note(_exit(6, 1), now=200.5).disabled == 1


def test_the_hold_bound_is_a_few_seconds() -> None:
    HELD_EXIT_MAX_SEC = node_manager.HELD_EXIT_MAX_SEC
    assert 1.0 <= HELD_EXIT_MAX_SEC <= 10.0 and NodeFaults(2).max_held_sec == HELD_EXIT_MAX_SEC

"""NodeFaults (which node is down, mpi mode) and NodeManager.disable_node: pure accounting."""

from __future__ import annotations

import pytest

from balsam.launcher.node_manager import Demand, Exit, InsufficientResources, NodeFaults, NodeManager
from balsam.platform import NodeInfo

PROXY = "ssh: Could not resolve hostname nid-down-001\n[mpiexec@x] Launch proxy failed."


def _exit(job_id: int, node: int, rc: int = 255, seconds: float = 0.1, tail: str = PROXY) -> Exit:
    return Exit(job_id, node, rc, seconds, tail, 1000.0 + job_id)


def _demand(**kw: object) -> Demand:
    values = dict(num_nodes=1, ranks_per_node=1, threads_per_rank=1, threads_per_core=1, gpus_per_rank=0.0,
                  node_packing_count=1)
    values.update(kw)
    return Demand(**values)  # type: ignore[arg-type]


def test_a_node_whose_launches_fail_with_the_launchers_message_is_taken_out_and_its_jobs_requeued() -> None:
    faults = NodeFaults(2, threshold=3)
    for job_id in (1, 2):  # held: nothing to report yet
        verdict = faults.note(_exit(job_id, 1), now=0.0)
        assert not (verdict.report or verdict.requeue) and verdict.disabled is None
    assert faults.held_ids() == [1, 2]
    verdict = faults.note(_exit(3, 1), now=0.0)
    assert verdict.disabled == 1 and [e.job_id for e in verdict.requeue] == [1, 2, 3] and not verdict.report
    # A late exit on that node (a hand-over that started there) is re-queued too.
    assert [e.job_id for e in faults.note(_exit(4, 1), now=0.0).requeue] == [4]


def test_a_buggy_app_failing_fast_everywhere_takes_no_node_out() -> None:
    faults = NodeFaults(2, threshold=3)
    reported = []
    for job_id in range(1, 7):
        verdict = faults.note(_exit(job_id, job_id % 2, rc=1, tail="Traceback: ValueError"), now=0.0)
        assert verdict.disabled is None and not verdict.requeue
        reported += [e.job_id for e in verdict.report]
    assert sorted(reported) == [1, 2, 3, 4, 5, 6]  # every one RUN_ERROR, as it is


def test_the_apps_own_quick_failures_never_take_a_node_out_even_while_others_succeed() -> None:
    """A campaign where some parameter sets fail at once: three of them in a row on one node while
    the other node succeeds is the app, not the node (the allocation would shrink node by node).
    Without the MPI launcher's message they are not even held: each is reported as it comes."""
    faults = NodeFaults(3, threshold=3)
    assert [e.job_id for e in faults.note(_exit(1, 1, rc=1, tail="segfault"), now=0.0).report] == [1]
    assert faults.note(_exit(2, 0, rc=0), now=0.0).report  # success elsewhere
    db_error = _exit(3, 1, rc=1, tail="error: connection refused by the database")
    assert [e.job_id for e in faults.note(db_error, now=0.0).report] == [3]
    verdict = faults.note(_exit(4, 1, rc=1, tail="segfault"), now=0.0)
    assert verdict.disabled is None and [e.job_id for e in verdict.report] == [4] and not faults.held


def test_a_success_or_a_slow_failure_on_the_node_ends_its_streak_and_reports_what_was_held() -> None:
    faults = NodeFaults(2, threshold=3)
    faults.note(_exit(1, 1), now=0.0)
    faults.note(_exit(2, 1), now=0.0)
    assert [e.job_id for e in faults.note(_exit(3, 1, rc=0), now=0.0).report] == [1, 2, 3]
    faults.note(_exit(4, 1), now=0.0)
    assert [e.job_id for e in faults.note(_exit(5, 1, rc=1, seconds=60.0), now=0.0).report] == [4, 5]
    faults.note(_exit(6, 1), now=0.0)
    assert [e.job_id for e in faults.flush()] == [6] and faults.held_ids() == []


def test_the_last_node_is_never_taken_out() -> None:
    """Nor are its quick failures held for a verdict that cannot come: each is reported at once
    (held, one stayed unreported, its job RUNNING, until the next exit on the node)."""
    faults = NodeFaults(1, threshold=2)
    for job_id in (1, 2):
        verdict = faults.note(_exit(job_id, 0), now=0.0)
        assert verdict.disabled is None and [e.job_id for e in verdict.report] == [job_id] and not verdict.requeue
    assert faults.held_ids() == []
    # Two nodes, one out: the other is the last one in.
    faults = NodeFaults(2, threshold=2)
    faults.note(_exit(1, 1), now=0.0)
    assert faults.note(_exit(2, 1), now=0.0).disabled == 1
    assert [e.job_id for e in faults.note(_exit(3, 0), now=0.0).report] == [3] and faults.held_ids() == []


def test_a_disabled_node_gets_no_job_and_is_not_counted_free() -> None:
    nodes = [NodeInfo(str(i), f"nid{i}", [0, 1]) for i in range(3)]
    manager = NodeManager(nodes)
    running = manager.assign(1, _demand())
    assert running.node_indexes == (0,)
    assert manager.disable_node(0) and not manager.disable_node(0)
    assert manager.count_empty_nodes() == 2 and manager.aggregate_free_nodes() == pytest.approx(2.0)
    assert manager.assign(2, _demand()).node_indexes == (1,)
    manager.free(1)  # the job that ran there still frees it
    assert manager.assign(3, _demand()).node_indexes == (2,)
    with pytest.raises(InsufficientResources):
        manager.assign(4, _demand(num_nodes=2))
    assert manager.disable_node(1) is True and manager.disable_node(2) is False  # the last one stays

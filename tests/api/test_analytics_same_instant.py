"""utilization_report: events of one instant make one point. A launcher's hand-over (a queued job
started on the CPUs of the one that just ended) stamps the exit and the start with the same time
and sends the RUNNING first; one point per event counted both jobs at that instant, and `balsam
analytics utilization` reported "Peak: 2.03125 nodes busy" on the 2 nodes the demo held."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

T0 = dt.datetime(2026, 3, 1, 12)


def _event(i: int, job: int, from_state: str, to_state: str, seconds: float, nodes: float = 0) -> SimpleNamespace:
    return SimpleNamespace(id=i, job_id=job, from_state=from_state, to_state=to_state,
                           timestamp=T0 + dt.timedelta(seconds=seconds), data={"num_nodes": nodes} if nodes else {})


def test_a_hand_over_does_not_count_both_jobs_of_a_slot():
    from balsam.analytics import utilization_report

    events = [
        _event(1, 1, "PREPROCESSED", "RUNNING", 0, 1.0),       # mpi node: job 1
        _event(2, 10, "PREPROCESSED", "RUNNING", 0, 1 / 64),   # serial node: two packed jobs (2 CPUs)
        _event(3, 11, "PREPROCESSED", "RUNNING", 0, 1 / 64),
        _event(4, 2, "PREPROCESSED", "RUNNING", 5, 1.0),       # job 2 handed over job 1's node: RUNNING sent first
        _event(5, 1, "RUNNING", "RUN_DONE", 5),
        _event(6, 12, "PREPROCESSED", "RUNNING", 7, 1 / 64),   # the same on the serial node
        _event(7, 10, "RUNNING", "RUN_DONE", 7),
        _event(8, 2, "RUNNING", "RUN_DONE", 9),
        _event(9, 11, "RUNNING", "RUN_DONE", 9),
        _event(10, 12, "RUNNING", "RUN_DONE", 9),
    ]
    times, busy = utilization_report(events)
    assert max(busy) == 1.03125  # one mpi job and two serial ones at most: never 2.03125
    assert busy == [1.03125, 1.03125, 1.03125, 0]
    assert [(t - T0).total_seconds() for t in times] == [0, 5, 7, 9]
    assert max(utilization_report(events, node_weighting=False)[1]) == 3


def test_a_job_that_starts_and_ends_in_one_instant_takes_nothing_for_good():
    from balsam.analytics import utilization_report

    events = [_event(1, 1, "PREPROCESSED", "RUNNING", 0, 2), _event(2, 1, "RUNNING", "RUN_ERROR", 0),
              _event(3, 2, "PREPROCESSED", "RUNNING", 1, 1), _event(4, 2, "RUNNING", "RUN_DONE", 3)]
    assert utilization_report(events)[1] == [0, 1, 0]

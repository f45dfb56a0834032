"""The PBS driver on what the real Polaris server prints (ALCF's own recordings, see
tests/schedulers/data/polaris_pbs/README.md), where the hand-written recordings differ from it.

- Polaris' ``debug`` queue limits a user's waiting jobs with ``queued_jobs_threshold =
  [u:PBS_GENERIC=1]`` beside ``max_run = [u:PBS_GENERIC=1]`` and states no ``max_queued``:
  discovery read only ``max_queued``, so site init kept the platform's 100 and qsub refused every
  second waiting debug job ("would exceed queue debug's per-user limit of jobs in 'Q' state").
  Balsam's ``max_queued_jobs`` counts running jobs too: one running plus one waiting is 2 (1 kept a
  second BatchJob from being submitted while the first ran).
- ALCF's maintenance reservation (``M1150389``) is listed in the ``resv`` of every Polaris node,
  free ones included, for days before it starts: skipping each node that lists a reservation left
  no backfill window at all. Polaris' nodes are ``force_exclhost``, so a reservation running on one
  makes it ``resv-exclusive``: a ``free`` one is free, its reservation pending.
"""

from __future__ import annotations

from balsam_scheduler_pbs import PBSScheduler

from sched_helpers import recorded, result


def test_queued_jobs_threshold_is_the_debug_queues_limit_of_waiting_jobs():
    queues = PBSScheduler(user="alice").parse_discover_queues(
        result(stdout=recorded("polaris_pbs", "qstat_Qf_json_polaris.txt")))
    # run_next is disabled, small route-only
    assert sorted(queues) == ["debug", "prod"]
    debug, prod = queues["debug"], queues["prod"]
    assert (debug.max_nodes, debug.max_walltime, debug.min_nodes, debug.max_queued_jobs) == (2, 60, 1, 2)
    # prod's "[p:PBS_GENERIC=100]" is per project: not the user's own limit (site init keeps the platform's)
    assert (prod.max_nodes, prod.max_walltime, prod.min_nodes, prod.max_queued_jobs) == (496, 1440, 10, None)


def test_the_threshold_bounds_the_total_only_beside_max_run_and_the_smaller_limit_applies():
    doc = ('{"Queue":{"q":{"queue_type":"Execution","resources_max":{"nodect":4},"enabled":"True",'
           '"max_queued":"[u:PBS_GENERIC=5]","queued_jobs_threshold":"[u:PBS_GENERIC=3]"},'
           '"run":{"queue_type":"Execution","resources_max":{"nodect":4},"enabled":"True",'
           '"max_queued":"[u:PBS_GENERIC=9]","queued_jobs_threshold":"[u:PBS_GENERIC=3]","max_run":"[u:alice=2]"},'
           '"r":{"queue_type":"Execution","resources_max":{"nodect":4},"enabled":"True",'
           '"max_queued":"[u:PBS_GENERIC=2]","queued_jobs_threshold":"[u:alice=4]","max_run":"[u:alice=4]"},'
           '"none":{"queue_type":"Execution","resources_max":{"nodect":4},"enabled":"True",'
           '"queued_jobs_threshold":"[u:alice=0]"}}}')
    queues = PBSScheduler(user="alice").parse_discover_queues(result(stdout=doc))
    # q: no max_run, so running jobs are unbounded and the threshold bounds no total: max_queued's 5;
    # run: 3 waiting + 2 running; r: max_queued's 2 is smaller; none: no job may wait, left out
    assert {name: q.max_queued_jobs for name, q in queues.items()} == {"q": 5, "run": 5, "r": 2}


def test_free_polaris_nodes_with_a_pending_maintenance_reservation_are_backfill():
    windows = PBSScheduler(user="alice").parse_backfill(
        result(stdout=recorded("polaris_pbs", "pbsnodes_a_json_maintenance_pending.txt")))
    # the free node counts; the busy and the down one do not
    assert {q: [(w.num_nodes, w.wall_time_min) for w in ws] for q, ws in windows.items()} == {"*": [(1, 60)]}


def test_a_shared_node_listing_a_reservation_is_still_left_out():
    # Not exclusive: a reservation may be running on the node while its state stays free.
    node = ('{"nodes":{"n1":{"state":"free","resv":"R12.server","sharing":"default_shared"},'
            '"n2":{"state":"free","resv":"R12.server"},"n3":{"state":"free","sharing":"default_shared"}}}')
    windows = PBSScheduler(user="alice").parse_backfill(result(stdout=node))
    assert {q: [w.num_nodes for w in ws] for q, ws in windows.items()} == {"*": [1]}

"""Elastic queue audit (allocation side), against a real API server:

- a site on the ``default`` platform (a generic cluster) sent no node shape: its platform finds its
  GPUs and CPUs only inside an allocation, so GPU jobs were charged no GPUs and got too few nodes
  (8 jobs packed 4 to a node, each taking 2 of a node's 4 GPUs: 2 nodes requested, 4 needed).
  ``elastic_queue.node_gpus`` / ``node_cpus`` now say the compute node's shape;
- ``strategy_options.parallelism: .inf`` (or one so large the demand overflows) passed the checks,
  then every ``simple`` cycle with demand raised ``OverflowError`` (ceil of infinity): the module
  never submitted anything.
"""

from __future__ import annotations

import math

import pytest

from balsam_elastic import ElasticQueueOptions, SimpleStrategy
from balsam_elastic.module import ElasticQueueModule
from balsam_elastic.strategy import Backlog, Snapshot
from elastic_test_utils import runnable_jobs

QUEUES = {"scheduler": {"allowed_queues": {"local": {"max_nodes": 16, "max_walltime": 600, "max_queued_jobs": 10}}}}
#: 2 ranks of 1 GPU each, 4 to a node: half of a 4-GPU node each.
GPU_JOB = dict(node_packing_count=4, ranks_per_node=2, gpus_per_rank=1.0)


def _module(site, client, **changes) -> ElasticQueueModule:
    return ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, max_num_nodes=16, min_wall_time_min=10,
                                                        wall_time_pad_min=1, max_wall_time_min=60, **changes), client)


def test_the_default_platform_sizes_gpu_jobs_by_the_node_shape_settings_yml_gives(make_site, client) -> None:
    site = make_site(overrides=QUEUES)  # platform: default
    runnable_jobs(client, site, 8, **GPU_JOB)
    module = _module(site, client, node_gpus=4, node_cpus=64)
    assert module.node_shape_params == {"node_gpus": 4, "node_cpus": 64, "cpu_ids_are_cores": "false",
                                        "hardware_threads_per_core": 0}
    module.run_cycle()
    assert dict(module.last_decision.numbers)["runnable_footprint"] == 4, module.last_decision
    assert [s.num_nodes for s in module.last_decision.submit] == [4], module.last_decision  # was [2]


def test_node_gpus_alone_and_its_bounds(make_site, client) -> None:
    site = make_site(overrides=QUEUES)
    assert _module(site, client, node_gpus=4).node_shape_params == {"node_gpus": 4}
    assert _module(site, client).node_shape_params == {}  # unset: the platform's (none here), as before
    for bad in (0, -1, 10**9):
        if bad:  # node_gpus 0: nodes without GPUs (test_elastic_gpuless_nodes.py)
            problems = ElasticQueueOptions(node_gpus=bad).validate()
            assert "must be between 0 and" in problems.get("node_gpus", ""), problems
        problems = ElasticQueueOptions(node_cpus=bad).validate()
        assert "must be between 1 and" in problems.get("node_cpus", ""), problems


def test_an_infinite_parallelism_is_refused_at_load() -> None:
    options = ElasticQueueOptions(strategy="simple", strategy_options={"parallelism": math.inf})
    assert "finite" in options.validate().get("strategy_options.parallelism", ""), options.validate()


def test_a_huge_parallelism_asks_for_max_blocks_instead_of_failing_the_cycle() -> None:
    settings = ElasticQueueOptions(strategy="simple", strategy_options={"parallelism": 1e308, "max_blocks": 3})
    strategy = SimpleStrategy(settings, settings.strategy_options)
    snapshot = Snapshot(batch_jobs=(), backlog=Backlog(runnable_count=4, runnable_footprint=4.0, min_runnable_nodes=1,
                                                      max_runnable_nodes=1), windows=())
    decision = strategy.decide(snapshot)  # raised OverflowError: cannot convert float infinity to integer
    assert len(decision.submit) == 3, decision


@pytest.mark.parametrize("text", [".inf", "1.0e+400"])
def test_settings_yml_refuses_an_infinite_parallelism(tmp_path, text) -> None:
    from balsam.config.settings import SettingsError, load_settings

    path = tmp_path / "settings.yml"
    path.write_text("scheduler:\n  allowed_queues: {debug: {max_nodes: 4, max_walltime: 60, max_queued_jobs: 3}}\n"
                    "  allowed_projects: [p]\nelastic_queue: {submit_queue: debug, submit_project: p, strategy: simple,\n"
                    f"  strategy_options: {{parallelism: {text}}}}}\n")
    with pytest.raises(SettingsError, match="parallelism: must be a finite number"):
        load_settings(path, log_warnings=False)


class _Polled:
    """The elastic module's view of a scheduler: the given scheduler ids queued for 2 min."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def get_statuses(self) -> dict:
        from types import SimpleNamespace

        from balsam.states import BatchJobState

        return {sid: SimpleNamespace(state=BatchJobState.queued, queued_time_min=2, message="") for sid in self.ids}

    def never_starts(self, status) -> bool:
        return False

    def get_backfill_windows(self) -> dict:
        return {}


def test_a_batch_job_of_its_own_that_the_user_removes_is_replaced_while_the_backlog_needs_it(make_site, client) -> None:
    """``balsam queue term`` of one of its BatchJobs (pending_deletion): documented behaviour, not a
    fault. It no longer counts as capacity, so the next cycle requests one for the same backlog (a
    user who wants no more BatchJobs sets elastic_queue: null); one request, not one per cycle."""
    from elastic_test_utils import batch_jobs_of

    site = make_site(overrides=QUEUES)
    scheduler = _Polled()
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, max_num_nodes=2, min_wall_time_min=10,
                                                          wall_time_pad_min=1, max_wall_time_min=60), client,
                                scheduler=scheduler)
    runnable_jobs(client, site, 2)
    module.run_cycle()
    [first] = batch_jobs_of(client, site)
    client.patch("/batch-jobs/", json=[{"id": first["id"], "state": "queued", "scheduler_id": 501}])
    scheduler.ids = [501]
    module.run_cycle()
    assert module.last_decision.submit == () and len(batch_jobs_of(client, site)) == 1, module.last_decision
    client.patch("/batch-jobs/", json=[{"id": first["id"], "state": "pending_deletion"}])  # balsam queue term
    module.run_cycle()
    module.run_cycle()
    states = sorted((b["id"] == first["id"], b["state"]) for b in batch_jobs_of(client, site))
    assert states == [(False, "pending_submission"), (True, "pending_deletion")], states

"""Jobs that need a GPU, on a site whose nodes have none. Its launchers acquire with
``max_gpus_per_node: 0`` (``job_mode.gpuless_acquire_filter``) and never lease them; the elastic
queue counted them as runnable and submitted BatchJob after BatchJob for them (on the CI's Slurm,
2 such jobs got 9 BatchJobs of 2 nodes x 30 min in 50 s, the jobs stayed PREPROCESSED, no word why),
and could not be told the nodes have no GPU (``node_gpus`` had to be 1 or more). Now
``elastic_queue.node_gpus: 0``, or a platform whose GPU list is empty, reads the backlog with the
launchers' bound, and the jobs left out are named once, at ERROR when nothing else runs. Against a
real API server."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from balsam.client.rest import APIError
from balsam_elastic import ElasticQueueOptions
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import batch_jobs_of, runnable_jobs

LOGGER = "balsam.site.modules.elastic_queue"
QUEUES = {"scheduler": {"allowed_queues": {"local": {"max_nodes": 16, "max_walltime": 600, "max_queued_jobs": 10}}}}
OPTIONS = dict(use_backfill=False, max_num_nodes=16, min_wall_time_min=10, wall_time_pad_min=1, max_wall_time_min=60)


def _module(site, client, **options) -> ElasticQueueModule:
    return ElasticQueueModule(site, ElasticQueueOptions(**{**OPTIONS, **options}), client)


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]


def _acquire(client, site, **spec) -> list:
    session = client.post("/sessions/", json={"site_id": site.site_id})["id"]
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": 100, **spec})
    client.delete(f"/sessions/{session}")
    return got if isinstance(got, list) else got["results"]


def test_gpu_jobs_on_gpuless_nodes_get_no_batch_job_and_a_reason(make_site, client, caplog) -> None:
    site = make_site(overrides=QUEUES)
    caplog.set_level(logging.INFO, logger=LOGGER)
    runnable_jobs(client, site, 2, gpus_per_rank=1)
    module = _module(site, client, node_gpus=0, job_mode="serial")
    module.run_cycle()
    module.run_cycle()
    # Before: a BatchJob for 2 jobs its launcher (max_gpus_per_node 0) never leases.
    assert batch_jobs_of(client, site) == [], module.last_decision
    assert _acquire(client, site, max_gpus_per_node=0) == []
    [error] = _errors(caplog)  # once, not once a cycle
    assert "GPUs (ranks_per_node x gpus_per_rank > 0), and its BatchJobs' nodes have none (elastic_queue.node_gpus 0)" \
        in error, error
    assert "no runnable job fits its BatchJobs (2 runnable: " in module.last_decision.reason, module.last_decision

    # Jobs without GPUs beside them are counted and get their BatchJob; the GPU ones are still named.
    runnable_jobs(client, site, 3, num_nodes=1)
    module.run_cycle()
    assert dict(module.last_decision.numbers)["runnable"] == 3, module.last_decision
    assert len(batch_jobs_of(client, site)) == 1
    assert len(_acquire(client, site, max_gpus_per_node=0)) == 3


def test_a_platform_without_gpus_is_gpuless(make_site, client) -> None:
    """An empty GPU list of the platform driver (a CPU partition: what its launcher's nodes get)."""
    site = make_site(overrides=QUEUES)
    runnable_jobs(client, site, 2, ranks_per_node=2, gpus_per_rank=0.5)

    class CpuPlatform(ElasticQueueModule):
        def platform(self):
            return SimpleNamespace(name="cpu-nodes", gpu_ids=(), cpu_ids=(), mpirun_allows_node_packing=True)

    module = CpuPlatform(site, ElasticQueueOptions(**OPTIONS), client)
    assert module.gpuless_source == "platform 'cpu-nodes' lists none" and "node_gpus" not in module.node_shape_params
    module.run_cycle()
    assert module.last_decision.submit == () and batch_jobs_of(client, site) == [], module.last_decision
    # The default platform names no GPU list (it finds GPUs inside an allocation): not gpuless.
    assert _module(site, client).gpuless_source == ""


class OlderServer:
    """The real client before a server that predates the backlog's max_gpus_per_node (422, unknown)."""

    def __init__(self, client) -> None:
        self.client, self.refused = client, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def get(self, path, params=None, **kwargs):
        if path.endswith("/backlog") and "max_gpus_per_node" in (params or {}):
            self.refused += 1
            raise APIError("GET", path, 422, [{"loc": ["query", "max_gpus_per_node"],
                                               "msg": "unknown filter parameter (valid: ...)"}])
        return self.client.get(path, params=params, **kwargs)


def test_an_older_server_gets_the_old_request(make_site, client, caplog) -> None:
    site = make_site(overrides=QUEUES)
    runnable_jobs(client, site, 2, gpus_per_rank=1)
    older = OlderServer(client)
    module = _module(site, older, node_gpus=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        module.run_cycle()
        module.run_cycle()
    assert older.refused == 1 and module.gpuless_source == ""
    assert dict(module.last_decision.numbers)["runnable"] == 2, module.last_decision  # counted, as before
    assert len([r for r in caplog.records if "max_gpus_per_node" in r.getMessage()]) == 1

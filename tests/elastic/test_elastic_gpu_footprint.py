"""The elastic queue sizes BatchJobs by what the launcher really places: on a Polaris site (4 GPUs
and 32 cores per node) jobs packed 4 to a node that need 2 GPUs each take half a node, so 8 of
them need 4 nodes, not the 2 that num_nodes / node_packing_count gave. Against a real API server."""

from __future__ import annotations

import logging

import pytest

from balsam.client.rest import APIError
from balsam_elastic import ElasticQueueOptions
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import batch_jobs_of, runnable_jobs

LOGGER = "balsam.site.modules.elastic_queue"
QUEUES = {"scheduler": {"allowed_queues": {"local": {"max_nodes": 16, "max_walltime": 600, "max_queued_jobs": 10}}}}
#: 2 ranks of 1 GPU each, 4 to a node: half a Polaris node each (its 4 GPUs), a quarter by packing.
GPU_JOB = dict(node_packing_count=4, ranks_per_node=2, gpus_per_rank=1.0)


def _polaris_site(make_site):
    return make_site(overrides={**QUEUES, "launcher": {"platform": "polaris"}})


def _module(site, client, job_mode: str = "mpi") -> ElasticQueueModule:
    return ElasticQueueModule(site, ElasticQueueOptions(job_mode=job_mode, use_backfill=False, max_num_nodes=16,
                                                        min_wall_time_min=10, wall_time_pad_min=1,
                                                        max_wall_time_min=60), client)


def _acquire(client, site, **spec) -> list:
    session = client.post("/sessions/", json={"site_id": site.site_id})["id"]
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": 100, **spec})
    return got if isinstance(got, list) else got["results"]


@pytest.mark.parametrize("job_mode", ["mpi", "serial"])
def test_polaris_gpu_jobs_get_the_nodes_they_need(make_site, client, job_mode) -> None:
    site = _polaris_site(make_site)
    fields = GPU_JOB if job_mode == "mpi" else dict(node_packing_count=4, ranks_per_node=1, gpus_per_rank=2.0)
    runnable_jobs(client, site, 8, **fields)
    module = _module(site, client, job_mode)
    module.run_cycle()
    numbers = dict(module.last_decision.numbers)
    assert [s.num_nodes for s in module.last_decision.submit] == [4], module.last_decision  # was [2]
    assert numbers["runnable_footprint"] == 4, module.last_decision
    assert module.node_shape_params == {"node_gpus": 4, "node_cpus": 32, "cpu_ids_are_cores": "true",
                                        "hardware_threads_per_core": 2}
    # Two of them run in its BatchJob: a whole node of it, as the launcher placed them.
    (mine,) = batch_jobs_of(client, site)
    client.patch("/batch-jobs/", json=[{"id": mine["id"], "state": "running", "scheduler_id": 7}])
    taken = [j["id"] for j in _acquire(client, site, max_num_jobs=2)]
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING", "batch_job_id": mine["id"]} for i in taken])
    module.run_cycle()
    numbers = dict(module.last_decision.numbers)
    assert (numbers["runnable_footprint"], numbers["running_footprint"]) == (3, 1), module.last_decision
    assert module.last_decision.submit == (), module.last_decision  # its 4 nodes hold all 8


def test_a_site_without_a_node_description_keeps_the_packing_footprint(make_site, client) -> None:
    """The default platform names its CPUs and GPUs only inside an allocation: no shape is sent."""
    site = make_site(overrides=QUEUES)
    runnable_jobs(client, site, 8, **GPU_JOB)
    module = _module(site, client)
    assert module.node_shape_params == {}
    module.run_cycle()
    assert [s.num_nodes for s in module.last_decision.submit] == [2], module.last_decision


class OlderServer:
    """The real client, before a server that predates the node shape parameters: it refuses them
    as that server's query parsing does (422, ``unknown filter parameter``, located at each)."""

    def __init__(self, client) -> None:
        self.client, self.refused = client, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def get(self, path, params=None, **kwargs):
        unknown = sorted(k for k in (params or {}) if k in ("node_gpus", "node_cpus", "cpu_ids_are_cores",
                                                             "hardware_threads_per_core"))
        if path.endswith("/backlog") and unknown:
            self.refused += 1
            raise APIError("GET", path, 422, [{"loc": ["query", k], "msg": "unknown filter parameter (valid: ...)"}
                                              for k in unknown])
        return self.client.get(path, params=params, **kwargs)


def test_an_older_server_gets_the_old_request(make_site, client, caplog) -> None:
    site = _polaris_site(make_site)
    runnable_jobs(client, site, 8, **GPU_JOB)
    older = OlderServer(client)
    module = _module(site, older)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        module.run_cycle()
        module.run_cycle()
    # The old figure (GPUs not counted), one refusal and one warning, not one per request or cycle.
    assert dict(module.last_decision.numbers)["runnable_footprint"] == 2, module.last_decision
    assert older.refused == 1 and module.node_shape_params == {}
    warned = [r.getMessage() for r in caplog.records if "node shape" in r.getMessage()]
    assert len(warned) == 1, warned


def test_a_bad_value_is_not_taken_for_an_older_server(make_site, client) -> None:
    site = _polaris_site(make_site)
    runnable_jobs(client, site, 1, **GPU_JOB)
    module = _module(site, client)
    module.node_shape_params = {**module.node_shape_params, "node_gpus": 0}
    with pytest.raises(APIError, match="node_gpus"):
        module.read_backlog()
    assert module.node_shape_params["node_gpus"] == 0

"""Theta KNL's nodes have no GPU, and its platform driver says so (``gpu_ids`` empty, the platform
contract the elastic queue reads). Before, the driver had no ``gpu_ids`` at all: its launchers
acquired with ``max_gpus_per_node: 0`` (their nodes list no GPU) while the module, not told the nodes
have none, counted GPU jobs no KNL launcher ever leases and submitted BatchJobs for them. Against a
real API server, on a site whose ``launcher.platform`` is ``theta-knl``."""

from __future__ import annotations

from balsam.launcher.job_mode import gpuless_acquire_filter
from balsam_elastic import ElasticQueueOptions
from balsam_elastic.module import ElasticQueueModule
from elastic_test_utils import batch_jobs_of, runnable_jobs

QUEUES = {"scheduler": {"allowed_queues": {"local": {"max_nodes": 16, "max_walltime": 600, "max_queued_jobs": 10}}}}


def test_knl_nodes_count_no_gpu_job(make_site, client) -> None:
    site = make_site(overrides={**QUEUES, "launcher": {"platform": "theta-knl"}})
    runnable_jobs(client, site, 2, gpus_per_rank=1)
    module = ElasticQueueModule(site, ElasticQueueOptions(use_backfill=False, max_wall_time_min=60), client)
    assert module.gpuless_source == "platform 'theta-knl' lists none", module.node_shape_params
    # What the module reads is what its launchers do: KNL nodes list no GPU, so they lease no GPU job.
    nodes = module.platform().discover_nodes({"COBALT_PARTNAME": "10-11", "COBALT_JOBID": "5"})
    assert [node.gpu_ids for node in nodes] == [(), ()]
    assert gpuless_acquire_filter(nodes, env={}) == {"max_gpus_per_node": 0}
    module.run_cycle()
    assert module.last_decision.submit == () and batch_jobs_of(client, site) == [], module.last_decision

"""The UNMODIFIED Balsam 0.7 client as libEnsemble's Balsam executor runs it: importing libEnsemble
sets pydantic v1's global ``BaseConfig.extra = "allow"`` (done here directly, without libEnsemble
itself), after which 0.7's generated models put ``"kwargs": {}`` in every create and update body.
Creates a Site, an App, a BatchJob and a Job, updates the Job, and reads the Site back with a
queued job in ``queued_jobs`` (libEnsemble looks the site up this way). Prints one JSON object.
Run with the python of the 0.7 venv (see balsam07_driver.py)."""

import json
import sys

import pydantic

pydantic.BaseConfig.extra = "allow"  # what `import libensemble.executors.balsam_executor` does

from balsam.api import ApplicationDefinition, BatchJob, Job, Site  # noqa: E402
from balsam.config import ClientSettings  # noqa: E402

site_name, site_path = sys.argv[1], sys.argv[2]
client = ClientSettings.load_from_file().build_client()
client.retry_count = 0  # a refusal must show at once, not after 0.7's 34 minutes of retries
site = Site.objects.create(name=site_name, path=site_path)


class Sim(ApplicationDefinition):
    site = site_name
    command_template = "echo {{ x }}"


Sim.sync()
bj = BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=10, job_mode="mpi", queue="local", project="local")
job = Job(workdir="sim/0", app_id=Sim.__app_id__, parameters={"x": "1"}, num_nodes=1, ranks_per_node=1)
job.save()
job.data = {"seen": True}
job.save()
print(json.dumps({"site_id": site.id, "batch_job_id": bj.id, "job_id": job.id,
                  "data": Job.objects.get(id=job.id).data}))

"""One round of the Python-API comparison, written once for both clients.

Run with the python of either venv (ours, or one where ``pip install balsam==0.7.0a24`` was done):
only names both packages have are used (``balsam.api.Site/ApplicationDefinition/Job``,
``Job.objects.bulk_create``, ``list(Job.objects.filter(tags=...))``, the same listing reading
every job's id, state, workdir, tags, data and get_parameters(), ``Job.objects.filter(tags=...).delete()``). ``BALSAM_CLIENT_PATH`` points at the client.yml of the
server to talk to. Prints one JSON line: seconds per operation.

    python balsam07_compare_driver.py N SITE_NAME SITE_PATH
"""

import json
import sys
import time

from balsam.api import ApplicationDefinition, Job, Site

n_jobs, site_name, site_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
site = Site.objects.create(name=site_name, path=site_path)


class Bench(ApplicationDefinition):
    site = site_name
    command_template = "echo {{ i }}"


Bench.sync()
app_id = Bench.__app_id__
tags = {"round": site_name}
jobs = [Job(workdir=f"b/{i}", app_id=app_id, parameters={"i": i}, tags=tags) for i in range(n_jobs)]

times = {}
start = time.perf_counter()
created = Job.objects.bulk_create(jobs)
times["bulk_create"] = time.perf_counter() - start
assert len(created) == n_jobs, len(created)

start = time.perf_counter()
listed = list(Job.objects.filter(tags=tags))
times["list"] = time.perf_counter() - start
assert len(listed) == n_jobs, len(listed)

# The same listing, reading every job's common fields: a client that defers parsing a field until
# it is read (ours) pays for it here, so this row compares the whole work of both clients.
start = time.perf_counter()
read = [(job.id, job.state, job.workdir, job.tags, job.data, job.get_parameters()) for job in Job.objects.filter(tags=tags)]
times["list_read"] = time.perf_counter() - start
assert len(read) == n_jobs and read[-1][4] == {} and read[0][5] == {"i": 0}, read[:1]

start = time.perf_counter()
Job.objects.filter(tags=tags).delete()
times["delete"] = time.perf_counter() - start
assert Job.objects.filter(tags=tags).count() == 0

print(json.dumps(times))

"""Drives a Balsam server with the UNMODIFIED Balsam 0.7 client package (its Python API).

Run with the python of a venv where ``pip install balsam==0.7.0a24`` was done (never imported by
our test process: the import name ``balsam`` is ours there). ``BALSAM_CLIENT_PATH`` points at the
client.yml its ``balsam login`` wrote. Prints one JSON object with what it saw; any failure raises.
"""

import datetime
import json
import sys

from balsam.api import ApplicationDefinition, BatchJob, EventLog, Job, Site
from balsam.config import ClientSettings
from balsam.site.status_updater import BulkStatusUpdater

site_name, site_path = sys.argv[1], sys.argv[2]
client = ClientSettings.load_from_file().build_client()
seen = {}

# Site create (and read back, which parses last_refresh / creation_date)
site = Site.objects.create(name=site_name, path=site_path)
seen["site_id"] = site.id
assert Site.objects.get(id=site.id).last_refresh <= datetime.datetime.utcnow() + datetime.timedelta(seconds=5)


# App sync
class Hello(ApplicationDefinition):
    site = site_name
    command_template = "echo hello {{ name }}"
    parameters = {"name": {"required": True}}


Hello.sync()
app_id = Hello.__app_id__
seen["app_id"] = app_id

# Bulk create, and a DAG child waiting for its parent
tags = {"batch": "one", 'say "hi"': "yes"}
jobs = Job.objects.bulk_create(
    [Job(workdir=f"hello/{i}", app_id=app_id, parameters={"name": str(i)}, tags=tags) for i in range(5)]
)
assert [j.state for j in jobs] == ["STAGED_IN"] * 5, [j.state for j in jobs]
child = Job(workdir="hello/child", app_id=app_id, parameters={"name": "child"}, parent_ids={jobs[0].id})
child.save()
assert child.state == "AWAITING_PARENTS", child.state
assert Job.objects.filter(tags={'say "hi"': "yes"}).count() == 5

# A launcher: a BatchJob, a session, acquire, bulk state updates (0.7's own BulkStatusUpdater)
bj = BatchJob.objects.create(site_id=site.id, project="local", queue="local", num_nodes=1, wall_time_min=10,
                             job_mode="mpi", filter_tags={"batch": "one"})
session = client.Session.objects.create(site_id=site.id, batch_job_id=bj.id)
acquired = session.acquire_jobs(max_num_jobs=10, states={"STAGED_IN"}, filter_tags={"batch": "one"})
assert sorted(j.id for j in acquired) == sorted(j.id for j in jobs), acquired
session.tick()
updater = BulkStatusUpdater(client)
now = datetime.datetime.utcnow()
updater._perform_updates([{"id": j.id, "state": "RUNNING", "state_timestamp": now, "state_data": {}} for j in acquired])
later = datetime.datetime.utcnow()
updater._perform_updates(
    [{"id": j.id, "state": "RUN_DONE", "state_timestamp": later, "state_data": {}, "return_code": 0} for j in acquired]
)
session.delete()
for job in Job.objects.filter(id=[j.id for j in acquired]):
    assert job.state == "RUN_DONE", job.state
first = Job.objects.get(id=jobs[0].id)
first.state = "POSTPROCESSED"
first.save()
assert Job.objects.get(id=jobs[0].id).state == "JOB_FINISHED"
assert Job.objects.get(id=child.id).state == "STAGED_IN"

# Events
events = list(EventLog.objects.filter(job_id=jobs[0].id))
seen["events"] = sorted(f"{e.from_state}->{e.to_state}" for e in events)
assert all(e.timestamp <= datetime.datetime.utcnow() + datetime.timedelta(seconds=5) for e in events)

# BatchJob delete, query delete
bj.delete()
assert BatchJob.objects.filter(id=bj.id).count() == 0
seen["deleted"] = Job.objects.filter(tags={"batch": "one"}).delete()
seen["left"] = Job.objects.filter(site_id=site.id).count()
print(json.dumps(seen))

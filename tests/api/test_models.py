"""balsam.api models, managers and queries against a real uvicorn server."""

from __future__ import annotations

import datetime as dt
import pickle
from pathlib import Path

import pytest

from balsam.client import APIError


def _template_app(site, name="Hello", template="echo hello {{ name }}", **attrs):
    from balsam.api import ApplicationDefinition

    ns = {"site": site.name, "command_template": template, **attrs}
    cls = type(name, (ApplicationDefinition,), ns)
    cls.sync()
    return cls


# ----------------------------------------------------------------------------------------- Site
def test_site_crud_and_lookups(site, tmp_path):
    from balsam.api import Site

    assert site.id is not None and site.creation_date is not None
    assert isinstance(site.path, Path)
    assert Site.objects.get(site.name).id == site.id  # positional lookup by name (seed 001)
    assert Site.objects.get(id=site.id).name == site.name
    other = Site.objects.create(name="second", path=str(tmp_path / "second"))
    assert Site.objects.count() == 2
    assert {s.name for s in Site.objects.all()} == {site.name, "second"}
    assert [s.id for s in Site.objects.filter(path="second")] == [other.id]
    assert Site.objects.filter(name="nope").first() is None
    with pytest.raises(Site.DoesNotExist):
        Site.objects.get(name="nope")
    with pytest.raises(Site.MultipleObjectsReturned, match="2 Site records"):
        Site.objects.get(path=str(tmp_path))
    other.name = "renamed"
    other.save()
    assert Site.objects.get(id=other.id).name == "renamed"
    other.refresh_from_db()
    assert other.last_refresh is not None
    other.delete()
    assert Site.objects.count() == 1


def test_unknown_filter_and_bad_field_values_are_clear(site):
    from balsam.api import Job, Site

    with pytest.raises(TypeError, match="unknown filter 'nmae'"):
        Site.objects.filter(nmae="x")
    with pytest.raises(ValueError, match="Job.num_nodes"):
        Job(workdir="a", app_id=1, num_nodes="many")
    with pytest.raises(TypeError, match="unexpected field 'colour'"):
        Site(name="x", path="/x", colour="red")
    with pytest.raises(AttributeError, match="cannot be changed after creation"):
        site.id = 5


def test_api_error_carries_status_and_detail(site, tmp_path):
    from balsam.api import Site

    with pytest.raises(APIError) as info:
        Site.objects.create(name=site.name, path=str(tmp_path / "dup"))
    assert 400 <= info.value.status_code < 500
    assert info.value.detail


# ----------------------------------------------------------------------------------------- App / Job
def test_job_create_fields_and_parameters(site):
    from balsam.api import Job, JobState

    Hello = _template_app(site)
    job = Job(workdir="demo/1", app_id="Hello", site_name=site.name, parameters={"name": "world"},
              tags={"experiment": "x"}, data={"energy": -1.5}, num_nodes=2, ranks_per_node=4,
              node_packing_count=None)  # None means "default", as libEnsemble passes it
    assert job.id is None
    job.save()
    assert job.id is not None
    assert job.state == JobState.staged_in
    assert job.app_id == Hello.__app_id__
    fetched = Job.objects.get(id=job.id)
    assert fetched.parameters == {"name": "world"}
    assert fetched.get_parameters() == {"name": "world"}
    assert fetched.tags == {"experiment": "x"} and fetched.data == {"energy": -1.5}
    assert fetched.num_nodes == 2 and fetched.node_packing_count == 1
    assert fetched.workdir == Path("demo/1") and fetched.working_directory == Path("demo/1")
    assert fetched.site_id == site.id
    assert fetched.app is Hello or fetched.app.__name__ == "Hello"
    assert isinstance(fetched.last_update, dt.datetime) and fetched.last_update.tzinfo is None
    assert "workdir: demo/1" in str(fetched)
    assert fetched == Job.objects.get(id=job.id)
    # as Balsam 0.7 (pydantic) did: Paths and numbers in string dicts are accepted
    other = Job(workdir=Path("demo/2"), app_id=Hello, parameters={"name": "x"}, tags={"n": 1},
                launch_params={"depth": 4})
    assert other.workdir == Path("demo/2") and other.tags == {"n": "1"} and other.launch_params == {"depth": "4"}


def test_app_model_fields(site):
    from balsam.api import App

    _template_app(site, "Greeter", "echo {{ greeting }} {{ who }}",
                  parameters={"greeting": {"required": False, "default": "hi", "help": "what to say"}})
    app = App.objects.get("Greeter")
    assert app.site_id == site.id
    assert app.parameters["greeting"].default == "hi" and app.parameters["greeting"].help == "what to say"
    assert app.parameters["who"].required is True
    assert App.objects.filter(site_name=site.name).count() == 1
    assert App.objects.filter(site_path=str(Path(site.path).name)).count() == 1


def test_save_sends_only_changed_fields_including_in_place_dict_changes(site):
    from balsam.api import Job

    _template_app(site)
    job = Job.objects.create(workdir="a", app_id="Hello", parameters={"name": "x"}, tags={"a": "1"})
    client = Job._get_client()
    assert job.dirty_fields == set()
    job.data["counter"] = 1  # in place: Balsam 0.7 missed this
    job.tags["b"] = "2"
    assert job.dirty_fields == {"data", "tags"}
    before = client.request_counts[f"PUT /jobs/{job.id}"]
    job.save()
    assert client.request_counts[f"PUT /jobs/{job.id}"] == before + 1
    assert job.dirty_fields == set()
    job.save()  # nothing changed: no request
    assert client.request_counts[f"PUT /jobs/{job.id}"] == before + 1
    fresh = Job.objects.get(id=job.id)
    assert fresh.data == {"counter": 1} and fresh.tags == {"a": "1", "b": "2"}
    fresh.data["nested"] = {"deep": [1, 2]}
    fresh.save()
    fresh.data["nested"]["deep"].append(3)
    assert fresh.dirty_fields == {"data"}
    fresh.save()
    assert Job.objects.get(id=job.id).data["nested"] == {"deep": [1, 2, 3]}
    kept = fresh.data  # a reference kept across save() still counts
    fresh.save()
    kept["later"] = True
    assert fresh.dirty_fields == {"data"}
    fresh.save()
    assert Job.objects.get(id=job.id).data["later"] is True
    fresh.tags["c"] = "3"
    copy = pickle.loads(pickle.dumps(client.Job.objects.get(id=job.id)))  # bound models pickle too
    assert copy == Job.objects.get(id=job.id) and type(copy) is Job
    clone = pickle.loads(pickle.dumps(fresh))
    assert clone.dirty_fields == {"tags"} and clone.tags["c"] == "3"


def test_bulk_create_chunks_and_returns_new_objects(site, monkeypatch):
    from balsam._api.models import JobManager
    from balsam.api import Job

    Hello = _template_app(site)
    monkeypatch.setattr(JobManager, "bulk_chunk_size", 7)
    jobs = [Hello.submit(workdir=f"bulk/{i}", name=str(i), tags={"n": str(i % 2)}, save=False) for i in range(20)]
    client = Job._get_client()
    before = client.request_counts["POST /jobs/"]
    created = Job.objects.bulk_create(jobs)
    assert client.request_counts["POST /jobs/"] - before == 3  # 7 + 7 + 6
    assert [j.workdir for j in created] == [Path(f"bulk/{i}") for i in range(20)]
    assert all(j.id is not None for j in created) and all(j.id is None for j in jobs)
    assert Job.objects.filter(tags={"n": "1"}).count() == 10


def test_bulk_create_in_chunks_keeps_ids_in_order_and_objects_as_listed(site, monkeypatch):
    """Chunks (each built while the one before is on the server) get their ids in order; the
    objects built from the minimal answers equal the server's records; listing (pages as columns)
    gives the same records; the garbage collector is running again afterwards."""
    import gc

    from balsam._api.models import JobManager
    from balsam._api.query import Query
    from balsam.api import Job

    Hello = _template_app(site)
    monkeypatch.setattr(JobManager, "bulk_chunk_size", 40)
    jobs = [Job(workdir=f"pipe/{i}", app_id=Hello, parameters={"name": str(i)}, tags={"p": "1", "i": i},
                num_nodes=1 + i % 2, gpus_per_rank=i % 2, data={"i": [i]} if i % 3 else {}) for i in range(600)]
    client = Job._get_client()
    before = client.request_counts["POST /jobs/"]
    created = Job.objects.bulk_create(jobs)
    assert client.request_counts["POST /jobs/"] - before == 15
    ids = [job.id for job in created]
    assert ids == sorted(ids) and len(set(ids)) == 600
    assert [str(job.workdir) for job in created] == [f"pipe/{i}" for i in range(600)]
    assert gc.isenabled()
    monkeypatch.setattr(Query, "page_size", 250)
    listed = list(Job.objects.filter(tags={"p": "1"}))
    assert [job.id for job in listed] == ids
    for made, read in zip(created, listed):
        assert made._record == read._record
    assert listed[7].num_nodes == 2 and listed[7].gpus_per_rank == 1.0 and listed[7].data == {"i": [7]}
    listed[7].data["i"].append(8)
    listed[7].save()
    assert Job.objects.get(id=ids[7]).data == {"i": [7, 8]} and created[8].data == {"i": [8]}
    assert gc.isenabled()


def test_bulk_create_refused_chunk_reports_what_was_stored_and_resumes(site, monkeypatch):
    """A chunk refused part way: the error lists exactly the stored jobs, no chunk is sent after it,
    and resume() stores the rest once."""
    from balsam._api.models import JobManager
    from balsam.api import BulkCreateError, Job
    from balsam.client import RESTClient

    Hello = _template_app(site)
    monkeypatch.setattr(JobManager, "bulk_chunk_size", 10)
    real = RESTClient.request_with_headers
    calls = []

    def refuse_second_chunk(self, method, path, **kwargs):
        calls.append(kwargs["json"][0]["workdir"])
        if len(calls) == 2:
            raise APIError(method, path, 400, "refused for the test")
        return real(self, method, path, **kwargs)

    monkeypatch.setattr(RESTClient, "request_with_headers", refuse_second_chunk)
    jobs = [Job(workdir=f"fail/{i}", app_id=Hello, parameters={"name": "x"}, tags={"f": "1"}) for i in range(60)]
    with pytest.raises(BulkCreateError) as caught:
        Job.objects.bulk_create(jobs)
    error = caught.value
    assert [str(job.workdir) for job in error.created] == [f"fail/{i}" for i in range(10)]
    assert [str(job.workdir) for job in error.not_created] == [f"fail/{i}" for i in range(10, 60)]
    assert calls == ["fail/0", "fail/10"] and "was refused" in str(error)
    assert Job.objects.filter(tags={"f": "1"}).count() == 10
    created = error.resume()
    assert [str(job.workdir) for job in created] == [f"fail/{i}" for i in range(60)]
    ids = [job.id for job in created]
    assert ids == sorted(ids) and Job.objects.filter(tags={"f": "1"}).count() == 60


def test_bulk_update_patches_only_changed_jobs_in_chunks(site, monkeypatch):
    from balsam._api.models import JobManager
    from balsam.api import Job

    Hello = _template_app(site)
    created = Job.objects.bulk_create([Hello.submit(workdir=f"u/{i}", name="x", save=False) for i in range(12)])
    monkeypatch.setattr(JobManager, "bulk_chunk_size", 5)
    for job in created[:9]:
        job.data["touched"] = True
    client = Job._get_client()
    before = client.request_counts["PATCH /jobs/"]
    assert Job.objects.bulk_update(created) == 9
    assert client.request_counts["PATCH /jobs/"] - before == 2
    assert Job.objects.bulk_update(created) == 0  # all clean now
    touched = [j for j in Job.objects.all() if j.data.get("touched")]
    assert len(touched) == 9


def test_query_laziness_pagination_slicing_ordering(site, monkeypatch):
    from balsam._api.query import Query
    from balsam.api import Job

    Hello = _template_app(site)
    Job.objects.bulk_create([Hello.submit(workdir=f"q/{i:02d}", name="x", save=False) for i in range(25)])
    monkeypatch.setattr(Query, "page_size", 4)
    client = Job._get_client()
    query = Job.objects.filter(workdir__contains="q/").order_by("-workdir")
    before = client.request_counts["GET /jobs/"]
    assert client.request_counts["GET /jobs/"] == before  # lazy: nothing fetched yet
    items = list(query)
    assert client.request_counts["GET /jobs/"] - before == 7  # 25 rows in pages of 4
    assert [str(j.workdir) for j in items][:3] == ["q/24", "q/23", "q/22"]
    list(query)  # cached
    assert client.request_counts["GET /jobs/"] - before == 7
    assert query.count() == 25 and len(query) == 25 and bool(query)
    sliced = Job.objects.filter(workdir__contains="q/").order_by("workdir")[5:8]
    assert [str(j.workdir) for j in sliced] == ["q/05", "q/06", "q/07"]
    # A step gives a list, as in Balsam 0.7 (and a list's slice).
    assert [str(j.workdir) for j in Job.objects.order_by("workdir")[2:9:3]] == ["q/02", "q/05", "q/08"]
    assert [str(j.workdir) for j in Job.objects.order_by("workdir")[22::-10]] == ["q/22", "q/12", "q/02"]
    assert str(Job.objects.order_by("workdir")[10].workdir) == "q/10"
    assert Job.objects.order_by("workdir").first().workdir == Path("q/00")
    with pytest.raises(IndexError):
        Job.objects.all()[100]
    with pytest.raises(AttributeError):
        Job.objects.all()[2:4].filter(state="STAGED_IN")
    with pytest.raises(ValueError, match="cannot be ordered by"):
        Job.objects.order_by("num_nodes")
    assert Job.objects.filter(id=[]).count() == 0 and list(Job.objects.filter(id=[])) == []
    assert Job.objects.filter(batch_job_id=None, tags={}).count() == 25  # None / {} filter nothing
    assert "Query" in repr(Job.objects.all()[:2])


def test_long_id_lists_are_split_and_stitched(site, monkeypatch):
    from balsam._api.query import Query
    from balsam.api import Job

    Hello = _template_app(site)
    created = Job.objects.bulk_create([Hello.submit(workdir=f"c/{i}", name="x", save=False) for i in range(15)])
    monkeypatch.setattr(Query, "filter_chunk_size", 4)
    ids = [j.id for j in created]
    client = Job._get_client()
    before = client.request_counts["GET /jobs/"]
    got = list(Job.objects.filter(id=ids).order_by("-id"))
    assert client.request_counts["GET /jobs/"] - before == 4
    assert [j.id for j in got] == sorted(ids, reverse=True)
    assert Job.objects.filter(id=ids).count() == 15
    assert [j.id for j in Job.objects.filter(id=ids).order_by("id")[3:6]] == sorted(ids)[3:6]


def test_query_update_and_delete(site):
    from balsam.api import Job

    Hello = _template_app(site)
    Job.objects.bulk_create([Hello.submit(workdir=f"d/{i}", name="x", tags={"grp": "a" if i < 6 else "b"}, save=False)
                             for i in range(10)])
    assert Job.objects.filter(tags={"grp": "a"}).update(data={"marked": 1}) == 6
    assert all(j.data == {"marked": 1} for j in Job.objects.filter(tags={"grp": "a"}))
    assert all(j.data == {} for j in Job.objects.filter(tags={"grp": "b"}))
    assert Job.objects.filter(tags={"grp": "a"}).update(state="FAILED") == 6
    assert Job.objects.filter(state="FAILED").count() == 6
    with pytest.raises(AttributeError, match="cannot be updated"):
        Job.objects.filter(tags={"grp": "a"}).update(id=3)
    assert Job.objects.filter(tags={"grp": "b"}).delete() == 4
    assert Job.objects.count() == 6
    one = Job.objects.first()
    one.delete()
    assert Job.objects.count() == 5


def test_parents_and_transfers(site):
    from balsam.api import ApplicationDefinition, Job, JobState, TransferItem

    site_name = site.name

    class Stager(ApplicationDefinition):
        site = site_name
        command_template = "cat input.txt"
        transfers = {
            "inp": {"required": True, "direction": "in", "local_path": "input.txt", "description": "input"},
            "out": {"required": False, "direction": "out", "local_path": "out.txt"},
        }

    Stager.sync()
    parent = Stager.submit(workdir="p", transfers={"inp": "laptop:/data/in.txt"})
    assert parent.state == JobState.ready  # waits for its stage-in
    child = Stager.submit(workdir="c", parent_ids={parent.id},
                          transfers={"inp": {"location_alias": "laptop", "path": "/data/x.txt"}})
    assert child.state == JobState.awaiting_parents
    assert child.parent_ids == {parent.id}
    assert [j.id for j in child.parent_query()] == [parent.id]
    assert [j.id for j in Job.objects.filter(parent_id=[parent.id])] == [child.id]
    items = list(TransferItem.objects.filter(job_id=parent.id))
    assert len(items) == 1 and items[0].direction.value == "in" and str(items[0].remote_path) == "/data/in.txt"
    item = items[0]
    item.state = "done"
    item.task_id = "local:1"
    item.save()
    parent.refresh_from_db()
    assert parent.state == JobState.staged_in
    with pytest.raises(ValueError, match="alias:/absolute/path"):
        Stager.submit(workdir="bad", transfers={"inp": "no-colon"}, save=False)


# ----------------------------------------------------------------------------------------- BatchJob
def test_batch_jobs(site):
    from balsam.api import BatchJob, BatchJobPartition, JobMode

    bj = BatchJob.objects.create(site_id=site.id, num_nodes=2, wall_time_min=10, job_mode="mpi", queue="debug",
                                 project="datascience", filter_tags={"system": "h2o"},
                                 partitions=[{"job_mode": "mpi", "num_nodes": 1}, {"job_mode": "serial", "num_nodes": 1}])
    assert bj.state.value == "pending_submission" and bj.job_mode == JobMode.mpi
    assert isinstance(bj.partitions[0], BatchJobPartition)
    assert bj.partitions_to_cli_args() == " --part mpi:1 --part serial:1"
    bj.validate(site.allowed_queues, site.allowed_projects, site.optional_batch_job_params)
    bad = BatchJob(site_id=site.id, num_nodes=20, wall_time_min=10, job_mode="mpi", queue="debug", project="datascience")
    with pytest.raises(ValueError, match="outside 1..8"):
        bad.validate(site.allowed_queues, site.allowed_projects, site.optional_batch_job_params)
    other = BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="serial", queue="debug",
                                    project="datascience")
    assert BatchJob.objects.filter(filter_tags={"system": "h2o"}).count() == 1
    bj.scheduler_id = 1234
    other.scheduler_id = 1235
    bj.state = "queued"
    assert BatchJob.objects.bulk_update([bj, other]) == 2
    assert BatchJob.objects.get(scheduler_id=1234).state.value == "queued"
    # the documented query update that Balsam 0.7 could not do (no PUT route)
    assert BatchJob.objects.filter(site_id=site.id, state="queued").update(state="pending_deletion") == 1
    assert BatchJob.objects.get(id=bj.id).state.value == "pending_deletion"
    other.delete()
    assert BatchJob.objects.count() == 1


# ----------------------------------------------------------------------------------------- Session
def test_session_acquire_tick_delete(site):
    from balsam.api import BatchJob, Job, JobState, Session

    Hello = _template_app(site)
    jobs = Job.objects.bulk_create([Hello.submit(workdir=f"s/{i}", name="x", num_nodes=1 + (i % 2), save=False)
                                   for i in range(6)])
    for job in jobs:
        job.state = "PREPROCESSED"
    Job.objects.bulk_update(jobs)
    bj = BatchJob.objects.create(site_id=site.id, num_nodes=2, wall_time_min=10, job_mode="mpi", queue="debug",
                                 project="datascience")
    session = Session.objects.create(site_id=site.id, batch_job_id=bj.id)
    assert session.heartbeat is not None
    assert [s.id for s in Session.objects.all()] == [session.id]
    small = session.acquire_jobs(max_num_jobs=10, max_nodes_per_job=1)
    assert len(small) == 3 and all(j.num_nodes == 1 for j in small)
    assert all(j.batch_job_id == bj.id for j in small)
    again = session.acquire_jobs(max_num_jobs=10, max_nodes_per_job=1)
    assert again == []  # leased already
    for job in small:
        job.state = "RUNNING"
        job.state_data = {"num_nodes": 1}
    Job.objects.bulk_update(small)
    assert small[0].state_data == {}  # event payload cleared after save
    session.tick()
    with pytest.raises(AttributeError, match="read-only"):
        session.site_id = 3
    with pytest.raises(ValueError, match="max_num_jobs"):
        session.acquire_jobs(max_num_jobs=0)
    session.delete()
    assert Job.objects.filter(state="RUN_TIMEOUT").count() == 3  # lease gone: RUNNING jobs time out
    assert Session.objects.count() == 0
    assert Job.objects.filter(state=JobState.preprocessed).count() == 3


# ----------------------------------------------------------------------------------------- EventLog
def test_event_log_queries(site, run_jobs):
    from balsam.api import EventLog, Job

    Hello = _template_app(site)
    jobs = Job.objects.bulk_create([Hello.submit(workdir=f"e/{i}", name="x", tags={"k": "v"}, save=False)
                                   for i in range(4)])
    run_jobs(site, jobs, fail=[jobs[0].id])
    assert {j.state.value for j in jobs[1:]} == {"JOB_FINISHED"}
    assert jobs[0].state.value == "FAILED"
    running = EventLog.objects.filter(to_state="RUNNING")
    assert running.count() == 4
    assert running[0].data == {"num_nodes": 1.0}
    assert EventLog.objects.filter(job_id=jobs[1].id).order_by("timestamp")[0].from_state == "CREATED"
    assert EventLog.objects.filter(tags={"k": "v"}, from_state="RUNNING").count() == 4
    since = dt.datetime.now() - dt.timedelta(minutes=5)
    assert EventLog.objects.filter(timestamp_after=since, to_state="JOB_FINISHED").count() == 3
    assert EventLog.objects.filter(timestamp_before=since).count() == 0
    assert jobs[1].history().count() >= 5
    event = EventLog.objects.first()
    with pytest.raises(AttributeError, match="read-only"):
        event.to_state = "FAILED"
    with pytest.raises(TypeError):
        EventLog(job_id=1)


# ----------------------------------------------------------------------------------------- the rest
def test_remaining_manager_and_model_methods(site, tmp_path):
    from balsam.api import ApplicationDefinition, BatchJob, Job, Site, TransferItem

    created = Site.objects.bulk_create([Site(name=f"extra-{i}", path=str(tmp_path / f"x{i}")) for i in range(3)])
    assert all(s.id for s in created) and Site.objects.count() == 4
    for s in created:
        s.allowed_projects.append("p1")  # in place, on a list field
    assert Site.objects.bulk_update(created) == 3
    assert Site.objects.get(created[0].id).allowed_projects == ["p1"]  # positional int -> id
    assert Site.objects.filter(name="extra-1").update(allowed_projects=["p2"]) == 1
    assert Site.objects.get(name="extra-1").allowed_projects == ["p2"]
    assert Site.objects.filter(path="x").delete() == 3

    site_name = site.name

    class Mover(ApplicationDefinition):
        site = site_name
        command_template = "true"
        transfers = {"out": {"required": True, "direction": "out", "local_path": "result.dat"}}

    jobs = Job.objects.bulk_create([Mover.submit(workdir=f"m/{i}", transfers={"out": f"laptop:/results/{i}.dat"},
                                                 save=False) for i in range(3)])
    items = list(TransferItem.objects.filter(job_id=[j.id for j in jobs]))
    assert len(items) == 3 and {i.state.value for i in items} == {"awaiting_job"}
    for item in items:
        item.transfer_info["note"] = "checked"
    assert TransferItem.objects.bulk_update(items) == 3
    assert all(i.transfer_info == {"note": "checked"} for i in TransferItem.objects.filter(site_id=site.id))
    assert TransferItem.objects.filter(direction="out", job_state="STAGED_IN").update(task_id="t-1") == 3
    with pytest.raises(TypeError, match="created by the server"):
        TransferItem(job_id=1)

    assert jobs[0].resolve_workdir(Path(site.path) / "data") == Path(site.path) / "data" / "m" / "0"
    bj = BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="serial", queue="debug",
                                 project="datascience")
    jobs[0].batch_job_id = bj.id
    jobs[0].save()
    assert [j.id for j in bj.job_query()] == [jobs[0].id]
    Job.objects.bulk_refresh(jobs)
    assert jobs[0].batch_job_id == bj.id


def test_explicit_default_client(site, balsam_env):
    from balsam.api import Site, get_default_client, reset_default_client, set_default_client
    from balsam.client import RESTClient

    mine = RESTClient(balsam_env.url, balsam_env.token)
    set_default_client(mine)
    try:
        assert get_default_client() is mine
        assert Site.objects.get(id=site.id).name == site.name
        assert mine.request_counts["GET /sites/"] == 1
    finally:
        reset_default_client()
    assert get_default_client() is not mine


@pytest.mark.postgres
def test_bulk_paths_on_postgresql(balsam_env_pg, tmp_path, monkeypatch):
    """The same bulk and query paths against the server on PostgreSQL."""
    from balsam._api.models import JobManager
    from balsam._api.query import Query
    from balsam.api import ApplicationDefinition, Job, Session, Site

    site = Site.objects.create(name="pg-site", path=str(tmp_path / "pg"))

    class PgApp(ApplicationDefinition):
        site = "pg-site"
        command_template = "echo {{ x }}"

    monkeypatch.setattr(JobManager, "bulk_chunk_size", 40)
    monkeypatch.setattr(Query, "page_size", 30)
    jobs = Job.objects.bulk_create([PgApp.submit(workdir=f"pg/{i}", x=i, tags={"even": str(i % 2 == 0)}, save=False)
                                   for i in range(100)])
    assert Job.objects.filter(tags={"even": "True"}).count() == 50
    assert [j.workdir.name for j in Job.objects.order_by("-id")[:3]] == ["99", "98", "97"]
    for job in jobs:
        job.state = "PREPROCESSED"
    assert Job.objects.bulk_update(jobs) == 100
    session = Session.objects.create(site_id=site.id)
    acquired = session.acquire_jobs(max_num_jobs=100, max_aggregate_nodes=60.0)
    assert len(acquired) == 60
    session.delete()
    assert Job.objects.filter(tags={"even": "False"}).delete() == 50


def test_column_pages_parse_a_column_when_a_field_of_it_is_first_read():
    """A page sent as columns (JSON texts, see COLUMNS_MEDIA_TYPE) makes its records without
    parsing their values; reading a field parses its column once; a column that is not a list of
    the page's length is reported when read; lists (already parsed) are taken as they are."""
    from balsam._api.query import _unpack_columns
    from balsam.api import Job

    fields = ["id", "workdir", "state", "data"]
    data = {"count": 7, "fields": fields,
            "columns": ["[4, 5, 6]", '["a/4", "a/5", "a/6"]', ["RUN_DONE", "FAILED", "RUNNING"], '[{"x": 1}, {}, "oops"'],
            }
    count, records = _unpack_columns(data)
    assert count == 7 and len(records) == 3
    page = records[0].columns
    assert page._parsed[1:] == [None, None, None]  # only the ids were parsed
    assert records[1]["workdir"] == "a/5" and records[2].get("workdir") == "a/6" and "state" in records[0]
    assert page._parsed[1] == ["a/4", "a/5", "a/6"] and page._parsed[3] is None
    with pytest.raises(ValueError, match="column 3"):
        records[0]["data"]
    jobs = Job._from_api_many(records)
    assert [job.id for job in jobs] == [4, 5, 6] and str(jobs[1].workdir) == "a/5"
    short = dict(data, columns=["[1, 2]", '["a"]', "[]", "[]"])
    with pytest.raises(ValueError, match="column 1 is not a list of 2 values"):
        _unpack_columns(short)[1][0]["workdir"]
    for bad in ({"fields": fields, "columns": ["[1]"]}, {"fields": fields, "columns": [1, 2, 3, 4]}, [], {"columns": []}):
        with pytest.raises(ValueError, match="unexpected list response"):
            _unpack_columns(bad)
    assert _unpack_columns({"count": 0, "fields": fields, "columns": ["[]"] * 4}) == (0, [])


def test_listed_jobs_see_in_place_changes_of_flat_and_nested_values(site):
    """Flat string maps are snapshotted as copies, anything else as canonical JSON: both catch an
    in-place change, a change of a value's type, and no change."""
    from balsam.api import Job

    _template_app(site)
    Job.objects.create(workdir="flat", app_id="Hello", parameters={"name": "x"}, tags={"k": "v"}, data={"s": "1"})
    Job.objects.create(workdir="nested", app_id="Hello", parameters={"name": "y"}, tags={"k": "v"}, data={"n": {"l": [1]}})
    by_workdir = {str(job.workdir): job for job in Job.objects.filter(tags={"k": "v"})}
    flat, nested = by_workdir["flat"], by_workdir["nested"]
    assert flat.tags == {"k": "v"} and flat.data == {"s": "1"} and nested.data == {"n": {"l": [1]}}
    assert flat.dirty_fields == set() and nested.dirty_fields == set()
    flat.data["s"] = 1  # same key, a string became a number: the JSON differs
    flat.tags["k"] = "v"  # written, same value
    nested.data["n"]["l"].append(2)
    assert flat.dirty_fields == {"data"} and nested.dirty_fields == {"data"}
    flat.save()
    nested.save()
    assert Job.objects.get(id=flat.id).data == {"s": 1}
    assert Job.objects.get(id=nested.id).data == {"n": {"l": [1, 2]}}


def test_lazy_fields_structure_like_the_converter(site):
    """The fast structurers of listed records give what the converter gives, and leave anything
    unusual (and every error) to it."""
    from balsam._api.model import _SLOW, Field
    from balsam.api import Job
    from balsam.models import Job as JobRecord
    from balsam.serialization import converter
    import attrs

    fields = attrs.fields_dict(JobRecord)
    for name, value in [("state", "RUNNING"), ("workdir", "a/b"), ("tags", {"a": "b"}), ("data", {"x": [1, {"y": None}]}),
                        ("wall_time_min", 5), ("num_nodes", 2)]:
        fld = Field(name, fields[name].type, None)
        assert fld.structure("Job", value) == converter.structure(value, fields[name].type)
        assert type(fld.structure("Job", value)) is type(converter.structure(value, fields[name].type))
    state = Field("state", fields["state"].type, None)
    assert state.fast_structure("NOT_A_STATE") is _SLOW
    with pytest.raises(ValueError, match="state"):
        state.structure("Job", "NOT_A_STATE")
    tags = Field("tags", fields["tags"].type, None)
    data = Field("data", fields["data"].type, None)
    shared = {"a": "b"}  # a value read may be shared (a create payload's default): the record gets its own
    assert tags.structure("Job", shared) == shared and tags.structure("Job", shared) is not shared
    assert data.structure("Job", shared) == shared and data.structure("Job", shared) is not shared
    assert tags.fast_structure({"a": 1}) is _SLOW
    with pytest.raises(ValueError, match="tags"):
        tags.structure("Job", {"a": 1})
    _template_app(site)
    Job.objects.create(workdir="w", app_id="Hello", parameters={"name": "x"}, tags={"t": "1"})
    listed = list(Job.objects.filter(tags={"t": "1"}))[0]
    fetched = Job.objects.get(id=listed.id)
    fetched._record  # noqa: B018 - built whole by the converter
    assert listed.state is fetched.state and type(listed.state) is type(fetched.state)
    assert isinstance(listed.workdir, Path) and listed.workdir == Path("w")


def test_codec_loads_plain_data_without_dill_and_the_rest_with_it():
    import datetime as _dt

    import dill

    from balsam._api import codec

    values = [{"i": 1}, {"a": [1, 2.5, "x", None, True, (1, 2)], "b": {"c": b"xy"}}, {1, 2}, frozenset([3]), [],
              _dt.datetime(2020, 1, 2, 3, 4), complex(1, 2), Path("p/q")]
    for value in values:
        payload = codec.serialize(value)
        assert codec.deserialize(payload) == value == dill.loads(codec._unb64(payload))
    square = codec.deserialize(codec.serialize(lambda x: x * x))  # code: dill's unpickler
    assert square(3) == 9
    with pytest.raises(codec.DeserializeError):
        codec.deserialize(codec._b64(b"\x80\x04not a pickle"))


def test_site_id_of_many_jobs_costs_one_get_per_app(site, monkeypatch):
    """Job.site_id over a listing: the app's site is asked once per app (it was one GET per job)."""
    from balsam.api import Job
    from balsam.client import RESTClient

    Hello = _template_app(site, name="SiteOfHello")
    Other = _template_app(site, name="SiteOfOther")
    Job.objects.bulk_create([app.submit(workdir=f"sid/{app.__name__}/{i}", name="x", save=False)
                             for i in range(20) for app in (Hello, Other)])
    jobs = [job for job in Job.objects.all() if str(job.workdir).startswith("sid/")]
    real = RESTClient._send
    gets = []

    def counting(self, method, path, **kwargs):
        gets.append((method, path))
        return real(self, method, path, **kwargs)

    monkeypatch.setattr(RESTClient, "_send", counting)
    assert {job.site_id for job in jobs} == {Hello.resolve_site_id()} and len(jobs) == 40
    assert len(gets) <= 2, gets


def test_rows_inserted_ahead_while_pages_are_read_are_not_returned_twice(site, monkeypatch):
    """Events listed newest first during a live campaign: rows inserted at the head between two
    pages shifted the next page, whose first rows were the last of the page before (analytics
    counted those jobs twice)."""
    from balsam._api.query import Query
    from balsam.api import EventLog, Job

    Hello = _template_app(site)
    jobs = Job.objects.bulk_create([Hello.submit(workdir=f"ev/{i:02d}", name="x", save=False) for i in range(12)])
    monkeypatch.setattr(Query, "page_size", 5)
    client = EventLog._get_client()
    real = client.request_with_headers
    pages = []

    def insert_between_pages(method, path, **kwargs):
        answer = real(method, path, **kwargs)
        if path.startswith("/events") and len(pages) < 2:
            pages.append(kwargs["params"]["offset"])
            # Two more events, newer than every row read so far (the live campaign goes on).
            more = Job.objects.bulk_create([Hello.submit(workdir=f"ev/new{len(pages)}-{i}", name="x", save=False)
                                            for i in range(2)])
            assert len(more) == 2
        return answer

    monkeypatch.setattr(client, "request_with_headers", insert_between_pages)
    events = list(EventLog.objects.filter(job_id=[j.id for j in jobs] + list(range(jobs[-1].id + 1, jobs[-1].id + 10))))
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert {e.job_id for e in events} >= {j.id for j in jobs}  # none of the first rows missed

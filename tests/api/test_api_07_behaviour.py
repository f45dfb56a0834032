"""Balsam 0.7 behaviour that 0.7 users' code (libEnsemble, DeepHyper, scripts) relies on: numbers put
in place in string dicts, sync() of a loaded app, positional filters, App errors of Job(app_id=name),
query.update() racing a delete, ``job.objects``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

import pytest

from balsam.client import APIError


def _app(site, name="Echo", template="echo {{ x }}"):
    from balsam.api import ApplicationDefinition

    return type(name, (ApplicationDefinition,), {"site": site.name, "command_template": template})


# ------------------------------------------------------------------- numbers in string dicts
def test_a_number_put_in_place_in_tags_is_saved_as_a_string_with_the_other_changes(site):
    from balsam.api import Job

    Echo = _app(site)
    job = Job.objects.get(id=Echo.submit("a", x=1, tags={"a": "1"}).id)
    job.tags["attempt"] = 2  # a 0.7 script: its server turned 2 into "2"
    job.state = "PREPROCESSED"
    job.save()
    stored = Job.objects.get(id=job.id)
    assert stored.tags == {"a": "1", "attempt": "2"}
    assert stored.state.value == "PREPROCESSED"  # not lost with a refused tag
    job.launch_params["cpu_bind"] = 1
    job.launch_params["ratio"] = 0.5
    job.save()
    assert Job.objects.get(id=job.id).launch_params == {"cpu_bind": "1", "ratio": "0.5"}


def test_numbers_put_in_place_before_create_and_bulk_writes(site):
    from balsam.api import BatchJob, Job

    Echo = _app(site)
    new = Job("c/1", Echo, parameters={"x": 1}, tags={"a": "1"})
    new.tags["n"] = 5
    new.save()
    assert Job.objects.get(id=new.id).tags == {"a": "1", "n": "5"}

    unsaved = [Job(f"c/{i}", Echo, parameters={"x": i}) for i in range(2, 4)]
    for i, job in enumerate(unsaved):
        job.tags["i"] = i
    created = Job.objects.bulk_create(unsaved)
    assert sorted(j.tags["i"] for j in Job.objects.filter(id=[j.id for j in created])) == ["0", "1"]

    listed = list(Job.objects.filter(id=[j.id for j in created]))
    for job in listed:
        job.tags["m"] = 7
    assert Job.objects.bulk_update(listed) == 2
    assert [j.tags["m"] for j in Job.objects.filter(id=[j.id for j in created])] == ["7", "7"]

    bj = BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="mpi", queue="debug",
                                 project="datascience")
    bj.optional_params["mig_count"] = 1
    bj.save()
    assert BatchJob.objects.get(id=bj.id).optional_params == {"mig_count": "1"}


def test_a_number_read_back_after_an_in_place_change_is_a_string(site):
    """The site's hook runner reads ``self.job.tags`` after the hook to send what changed."""
    from balsam.api import Job

    Echo = _app(site)
    job = Job.objects.get(id=Echo.submit("h", x=1).id)
    tags = job.tags
    tags["attempt"] = 3
    assert job.tags == {"attempt": "3"} and tags["attempt"] == "3"


def test_a_hook_putting_a_number_in_tags_sends_a_string(site):
    from balsam.api import ApplicationDefinition, Job
    from balsam.site.hooks_runner import run_hooks

    site_name = site.name

    class Counting(ApplicationDefinition):
        site = site_name
        command_template = "echo {{ x }}"

        def preprocess(self):
            self.job.tags["attempt"] = 2
            self.job.state = "PREPROCESSED"

    job = Counting.submit("hook/1", x=1)
    client = Job._get_client()
    updates = run_hooks(client.get(f"/apps/{job.app_id}"), [client.get(f"/jobs/{job.id}")], False,
                        str(site.path / "data"))
    assert updates[0]["tags"] == {"attempt": "2"} and updates[0]["state"] == "PREPROCESSED"
    client.patch("/jobs/", json=updates)  # refused (422) before
    stored = Job.objects.get(id=job.id)
    assert stored.tags == {"attempt": "2"} and stored.state.value == "PREPROCESSED"


# ------------------------------------------------------------------- sync() of a loaded app
def test_sync_of_a_loaded_app_keeps_the_stored_source(site, tmp_path):
    from balsam.api import App

    script = tmp_path / "define_forces.py"
    script.write_text(textwrap.dedent(f'''
        from balsam.api import ApplicationDefinition

        class RemoteForces(ApplicationDefinition):
            """forces"""
            site = {site.name!r}
            command_template = "forces.x {{{{ sim_particles }}}} > out.txt"

        RemoteForces.sync()
        print(RemoteForces.__app_id__)
    '''))
    defined = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert defined.returncode == 0, defined.stderr
    app_id = int(defined.stdout.split()[-1])
    stored = App.objects.get(id=app_id)
    assert "class RemoteForces" in stored.source_code

    # libEnsemble's BalsamExecutor: load the site's apps elsewhere (no source file), sync, submit.
    loader = textwrap.dedent(f'''
        from balsam.api import ApplicationDefinition, Job
        RF = ApplicationDefinition.load_by_site({site.name!r})["RemoteForces"]
        RF.sync()
        job = Job(app_id=RF, workdir="lf/1", parameters={{"sim_particles": 3}})
        job.save()
        try:
            print("SOURCE", RF.source_code.splitlines()[0])
        except OSError as exc:
            print("NO SOURCE", exc)
    ''')
    loaded = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    after = App.objects.get(id=app_id)
    assert after.source_code == stored.source_code  # was replaced with ""
    assert after.serialized_class == stored.serialized_class and after.description == "forces"
    assert "SOURCE class RemoteForces(ApplicationDefinition):" in loaded.stdout  # the loaded class's source


def test_sync_never_replaces_a_stored_source_with_nothing(site, monkeypatch):
    from balsam._api import codec
    from balsam.api import App

    Echo = _app(site)
    Echo.sync()
    record = App.objects.get(id=Echo.__app_id__)
    record.source_code = "class Echo: ..."
    record.save()

    def unreadable(obj):
        raise OSError("could not extract source code")

    monkeypatch.setattr(codec, "get_source", unreadable)
    Echo.sync()
    assert App.objects.get(id=Echo.__app_id__).source_code == "class Echo: ..."


# ------------------------------------------------------------------- positional filters
def test_positional_filters_follow_the_07_order(site):
    from balsam.api import App, BatchJob, EventLog, Job, Site

    Echo = _app(site)
    job = Echo.submit("p/1", x=1)
    other = Echo.submit("p/2", x=2)
    assert Job.objects.get(job.id).id == job.id  # 0.7: get(self, id=None, parent_id=None, ...)
    assert Job.objects.filter([job.id, other.id]).count() == 2
    assert Job.objects.all().filter(other.id).get().id == other.id
    assert Job.objects.filter(tags={}).get(job.id).id == job.id
    assert Job.objects.get(job.id, None, Echo.__app_id__).id == job.id  # id, parent_id, app_id
    bj = BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="mpi", queue="debug",
                                 project="datascience")
    assert BatchJob.objects.get(bj.id).id == bj.id
    assert BatchJob.objects.filter(None, site.id).count() == 1  # id, site_id
    event = EventLog.objects.filter(job_id=job.id).first()
    assert EventLog.objects.get(event.id).id == event.id
    assert EventLog.objects.filter(None, job.id).count() == EventLog.objects.filter(job_id=job.id).count()

    # Site: name first (as 0.7); a number is the id (kept from this API).
    assert Site.objects.get(site.name).id == site.id
    assert Site.objects.get(site.id).id == site.id
    # App: site_id first (as 0.7); a name is looked up by name (kept from this API).
    assert App.objects.get(site.id).id == Echo.__app_id__
    assert [a.id for a in App.objects.filter(site.id)] == [Echo.__app_id__]
    assert App.objects.get("Echo").id == Echo.__app_id__
    assert App.objects.get(site.id, Echo.__app_id__).name == "Echo"

    with pytest.raises(TypeError, match=r"at most 1 positional filter \(2 given\), in this order: id"):
        job._model_for("Session").objects.get(1, 2)
    with pytest.raises(TypeError, match="in this order: id, parent_id, app_id"):
        Job.objects.filter(*range(13))
    with pytest.raises(TypeError, match="multiple values for filter 'id'"):
        Job.objects.get(job.id, id=job.id)


def test_job_instance_reaches_its_manager(site):
    from balsam.api import Job

    job = _app(site).submit("m/1", x=1)
    assert job.objects is Job.objects  # 0.7: a class attribute, reachable from an instance
    assert job.objects.get(id=job.id) == job


# ------------------------------------------------------------------- Job(app_id="Name")
def test_job_of_an_unknown_or_ambiguous_app_name_raises_the_07_errors(site, tmp_path):
    from balsam.api import App, ApplicationDefinition, Job, Site

    with pytest.raises(App.DoesNotExist, match="no app named 'Nope'") as info:
        Job("n/1", "Nope", parameters={})
    assert isinstance(info.value, ValueError)
    _app(site, name="Twice").sync()
    second = Site.objects.create(name=f"second-{uuid.uuid4().hex[:6]}", path=str(tmp_path / "second"))
    type("Twice", (ApplicationDefinition,), {"site": second.name, "command_template": "echo {{ x }}"}).sync()
    with pytest.raises(App.MultipleObjectsReturned) as info:
        Job("n/2", "Twice", parameters={"x": 1})
    assert isinstance(info.value, ValueError)
    assert Job("n/3", "Twice", site_name=second.name, parameters={"x": 1}).app_id != 0


# ------------------------------------------------------------------- query.update()
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_site(request, tmp_path):
    """A site on the SQLite server, then on the PostgreSQL one."""
    request.getfixturevalue("balsam_env" if request.param == "sqlite" else "balsam_env_pg")
    from balsam.api import Site

    name = f"site-{uuid.uuid4().hex[:8]}"
    (tmp_path / name / "data").mkdir(parents=True)
    return Site.objects.create(name=name, path=str(tmp_path / name), allowed_projects=["datascience"],
                               allowed_queues={"debug": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 5}})


def test_query_update_is_one_request_applied_to_what_matches_then(any_site, monkeypatch):
    site = any_site
    from balsam._api.query import Query
    from balsam.api import Job

    Echo = _app(site)
    jobs = [Echo.submit(f"r/{i}", x=i, tags={"g": "r"}) for i in range(4)]

    # Another process deletes a matched job between the read of the ids and the update.
    real_ids = Query._ids

    def racy(self):
        ids = real_ids(self)
        Job.objects.get(id=ids[0]).delete()
        return ids

    monkeypatch.setattr(Query, "_ids", racy)
    query = Job.objects.filter(tags={"g": "r"}).order_by("id")[:3]  # a slice: updated by ids
    assert query.update(data={"u": 2}) == 2  # was: 404 Job not found, nothing updated
    monkeypatch.setattr(Query, "_ids", real_ids)
    assert {j.id: j.data for j in Job.objects.filter(tags={"g": "r"})} == {
        jobs[1].id: {"u": 2}, jobs[2].id: {"u": 2}, jobs[3].id: {}}

    # Filters alone: one request (nothing read first, so nothing to race with).
    client = Job._get_client()
    puts, patches = client.request_counts["PUT /jobs/"], client.request_counts["PATCH /jobs/"]
    gets = client.request_counts["GET /jobs/"]
    assert Job.objects.filter(tags={"g": "r"}).update(data={"u": 1}) == 3
    assert client.request_counts["PUT /jobs/"] - puts == 1 and client.request_counts["PATCH /jobs/"] == patches
    assert client.request_counts["GET /jobs/"] == gets
    assert [j.data for j in Job.objects.filter(tags={"g": "r"})] == [{"u": 1}] * 3


def test_query_update_by_ids_skips_deleted_records_of_every_model(any_site, monkeypatch):
    site = any_site
    from balsam._api.query import Query
    from balsam.api import BatchJob

    made = [BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="mpi", queue="debug",
                                    project="datascience") for _ in range(3)]
    real_ids = Query._ids

    def racy(self):
        ids = real_ids(self)
        BatchJob.objects.get(id=ids[0]).delete()
        return ids

    monkeypatch.setattr(Query, "_ids", racy)
    assert BatchJob.objects.filter(site_id=site.id).update(filter_tags={"k": "v"}) == 2
    monkeypatch.setattr(Query, "_ids", real_ids)
    assert {b.id: b.filter_tags for b in BatchJob.objects.filter(site_id=site.id)} == {
        made[1].id: {"k": "v"}, made[2].id: {"k": "v"}}
    with pytest.raises(APIError) as info:  # bulk_update of given objects still says they are gone
        made[0].filter_tags = {"k": "w"}
        BatchJob.objects.bulk_update([made[0]])
    assert info.value.status_code == 404


def test_query_update_of_more_jobs_than_one_request_takes(any_site, monkeypatch):
    """The server's PUT /jobs/?filters updates at most 5,000 jobs (else 400): by ids, in chunks."""
    site = any_site
    from balsam.api import Job

    Echo = _app(site)
    Job.objects.bulk_create([Job(f"big/{i}", Echo, parameters={"x": i}, tags={"g": "big"}) for i in range(5001)])
    client = Job._get_client()
    puts, patches = client.request_counts["PUT /jobs/"], client.request_counts["PATCH /jobs/"]
    assert Job.objects.filter(tags={"g": "big"}).update(data={"u": 1}) == 5001
    assert client.request_counts["PUT /jobs/"] - puts == 1  # refused: too many
    assert client.request_counts["PATCH /jobs/"] - patches == 2
    assert Job.objects.filter(tags={"g": "big"}).count() == 5001
    assert all(j.data == {"u": 1} for j in Job.objects.filter(tags={"g": "big"}))

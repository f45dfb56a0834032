"""Balsam 0.7 parity of the Python API: deleted records, bulk writes to evaluated queries,
ApplicationDefinition.sync() (concurrent, unchanged, re-created apps), count() and chunked order."""

from __future__ import annotations

import threading

import pytest

from balsam.client import APIError


def _app(site, name="Echo", template="echo {{ x }}"):
    from balsam.api import ApplicationDefinition

    return type(name, (ApplicationDefinition,), {"site": site.name, "command_template": template})


# ----------------------------------------------------------------------------------- deleted records
def test_refresh_from_db_of_a_deleted_record_raises_does_not_exist(site):
    from balsam.api import Job, Site

    Echo = _app(site)
    job = Echo.submit("a", x=1)
    Job.objects.filter(id=[job.id]).delete()
    # 0.7 read the record with objects.get(id=...): DoesNotExist; an APIError (404) still catches it.
    with pytest.raises(Job.DoesNotExist) as info:
        job.refresh_from_db()
    assert isinstance(info.value, APIError) and info.value.status_code == 404
    assert f"Job(id={job.id}) does not exist" in str(info.value)
    with pytest.raises(Job.DoesNotExist):
        job.done()  # refreshes
    other = Site.objects.create(name="other", path=str(site.path.parent / "other"))
    Site.objects.get(id=other.id).delete()
    with pytest.raises(Site.DoesNotExist):
        other.refresh_from_db()
    with pytest.raises(APIError):
        other.refresh_from_db()


def test_save_after_delete_never_creates_the_record_again(site):
    from balsam.api import Job

    Echo = _app(site)
    job = Echo.submit("a", x=1)
    job.delete()
    client = Job._get_client()
    posts = client.request_counts["POST /jobs/"]
    job.save()  # 0.7: nothing sent
    assert client.request_counts["POST /jobs/"] == posts and Job.objects.count() == 0
    job.data = {"k": 1}
    with pytest.raises(Job.DoesNotExist, match="was deleted"):
        job.save()  # 0.7: a failed PUT; never a new job
    with pytest.raises(Job.DoesNotExist):
        job.refresh_from_db()
    assert Job.objects.count() == 0


# ----------------------------------------------------------------------------------- bulk writes
def test_update_of_an_evaluated_query_reaches_what_its_filters_match(site):
    from balsam.api import Job

    Echo = _app(site)
    for i in range(3):
        Echo.submit(f"d{i}", x=i, tags={"grp": "d"})
    query = Job.objects.filter(tags={"grp": "d"})
    assert len(query) == 3  # evaluated: its rows are cached
    late = Echo.submit("d3", x=3, tags={"grp": "d"})
    gone = Job.objects.get(workdir__contains="d0")
    gone.tags = {"grp": "other"}
    gone.save()
    assert query.update(data={"u": 1}) == 3  # d1, d2, d3: not the cached d0, d1, d2
    assert {j.workdir.name: j.data for j in Job.objects.all()} == {
        "d0": {}, "d1": {"u": 1}, "d2": {"u": 1}, "d3": {"u": 1}}
    assert late.id in {j.id for j in query}  # the cache was dropped: read again
    sliced = Job.objects.filter(tags={"grp": "d"}).order_by("workdir")[:1]
    assert [j.workdir.name for j in sliced] == ["d1"]
    Job.objects.get(workdir__contains="d1").delete()
    assert sliced.update(data={"u": 2}) == 1
    assert Job.objects.get(workdir__contains="d2").data == {"u": 2}


# ----------------------------------------------------------------------------------- sync()
def test_sync_adopts_an_app_created_meanwhile(site, monkeypatch):
    from balsam._api.models import AppManager
    from balsam.api import App

    Echo = _app(site)
    created = App.objects.create(**Echo.to_dict())  # another process's first sync
    real_get = AppManager.get
    missed: list[int] = []

    def looked_up_before_it_was_created(self, *args, **kwargs):
        if not missed:
            missed.append(1)
            raise self._model.DoesNotExist("not there yet")
        return real_get(self, *args, **kwargs)

    monkeypatch.setattr(AppManager, "get", looked_up_before_it_was_created)
    Echo.sync()  # POST refused with 409: the existing record is taken
    assert missed and Echo.__app_id__ == created.id and App.objects.count() == 1


def test_concurrent_first_syncs_make_one_app(site):
    from balsam.api import App

    Racer = _app(site, "Racer")
    module = Racer.__module__
    errors: list[str] = []
    barrier = threading.Barrier(4)

    def sync() -> None:
        barrier.wait()
        try:
            Racer.sync()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=sync) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [app.id for app in App.objects.filter(site_id=site.id)] == [Racer.__app_id__]
    assert Racer.__module__ == module  # serializations one at a time: the module name restored


def test_sync_of_an_unchanged_app_sends_no_update(site):
    from balsam._api import codec
    from balsam.api import App, ApplicationDefinition

    Echo = _app(site)
    Echo.sync()
    client = App._get_client()
    first = App.objects.get(id=Echo.__app_id__).serialized_class
    puts = client.request_counts[f"PUT /apps/{Echo.__app_id__}"]
    assert puts == 0  # created as it is: no update after the create
    for _ in range(3):
        Echo.sync()
    assert client.request_counts[f"PUT /apps/{Echo.__app_id__}"] == puts
    assert App.objects.get(id=Echo.__app_id__).serialized_class == first
    # The payload holds the app, not this client's state (its id is set where it is loaded).
    raw = codec.deserialize_app_class(first)
    assert raw.__app_id__ is None and raw._site_id is None and raw._serialized_class is None
    ApplicationDefinition.clear_cache()
    loaded = ApplicationDefinition.load_by_id(Echo.__app_id__)
    assert loaded.__app_id__ == Echo.__app_id__ and loaded._site_id == site.id
    assert loaded.command_template == "echo {{ x }}"
    # A subclass of a synced app does not carry its parent's payload either.
    Louder = type("Louder", (Echo,), {"command_template": "echo {{ x }}!"})
    Louder.sync()
    sub = codec.deserialize_app_class(App.objects.get(id=Louder.__app_id__).serialized_class)
    parts = [k for k in sub.__mro__ if k.__name__ in ("Echo", "Louder")]
    assert len(parts) == 2 and all(vars(k).get("_serialized_class") is None and vars(k).get("__app_id__") is None
                                   for k in parts)
    # A real change is sent.
    Echo.__doc__ = "now documented"
    Echo.sync()
    assert client.request_counts[f"PUT /apps/{Echo.__app_id__}"] == puts + 1
    assert App.objects.get(id=Echo.__app_id__).description == "now documented"


def test_job_by_app_name_after_the_app_was_made_again(site):
    from balsam.api import App, Job

    Foo = _app(site, "Foo", "echo hi")
    Foo.sync()
    Job("a", "Foo").save()  # caches the id of "Foo"
    App.objects.get(id=Foo.__app_id__).delete()  # e.g. `balsam app rm`
    Foo.__app_id__ = None
    Foo.sync()  # a new id
    job = Job("b", "Foo")
    job.save()
    assert job.app_id == Foo.__app_id__
    # Re-made by another process: the cached id is stale; the refused create looks the name up again.
    App.objects.get(id=Foo.__app_id__).delete()
    remade = App.objects.create(**Foo.to_dict())
    job = Job("c", "Foo")
    job.save()
    assert job.app_id == remade.id
    App.objects.get(id=remade.id).delete()
    again = App.objects.create(**Foo.to_dict())
    created = Job.objects.bulk_create([Job("d", "Foo"), Job("e", "Foo")])
    assert [j.app_id for j in created] == [again.id, again.id]
    App.objects.get(id=again.id).delete()
    with pytest.raises(ValueError, match="no app named 'Foo'"):
        Job("f", "Foo").save()


# ----------------------------------------------------------------------------------- queries
def test_count_of_a_sliced_query_is_the_count_of_its_filters(site, monkeypatch):
    from balsam._api.query import Query
    from balsam.api import Job

    Echo = _app(site)
    jobs = [Echo.submit(f"c{i}", x=i) for i in range(5)]
    sliced = Job.objects.all()[:2]
    assert sliced.count() == 5  # as 0.7: limit/offset do not change count()
    assert len(sliced) == 2 and sliced.count() == 5
    assert Job.objects.all()[3:].count() == 5
    monkeypatch.setattr(Query, "filter_chunk_size", 2)
    chunked = Job.objects.filter(id=[j.id for j in jobs])[1:3]
    assert chunked.count() == 5
    assert [j.id for j in chunked] == [jobs[1].id, jobs[2].id] and chunked.count() == 5


def test_chunked_list_filter_keeps_the_default_order(site, monkeypatch):
    from balsam._api.query import Query
    from balsam.api import EventLog

    Echo = _app(site)
    jobs = [Echo.submit(f"e{i}", x=i) for i in range(3)]
    jobs[0].state = "RESTART_READY"
    jobs[0].save()
    ids = [j.id for j in jobs]
    whole = [(e.id, e.job_id) for e in EventLog.objects.filter(job_id=ids)]
    assert whole[0][1] == jobs[0].id  # newest first
    monkeypatch.setattr(Query, "filter_chunk_size", 2)  # stands for 500: two requests
    assert [(e.id, e.job_id) for e in EventLog.objects.filter(job_id=ids)] == whole
    assert EventLog.objects.filter(job_id=ids).first().job_id == jobs[0].id


def test_serializing_an_app_keeps_an_app_id_another_thread_set_meanwhile(monkeypatch) -> None:
    """Serializing takes the client's state off the class for the dump and puts it back: an id set
    meanwhile by another thread's sync() (the app was made again) was overwritten with the old one."""
    from balsam._api import codec
    from balsam._api.app import ApplicationDefinition, _serialize_class

    class Racy(ApplicationDefinition):
        site = 1
        command_template = "true"

    Racy.__app_id__ = 1
    real = codec._dill()

    class SyncDuringDump:
        @staticmethod
        def dumps(obj, **kw):
            assert "__app_id__" not in Racy.__dict__  # off the payload
            Racy.__app_id__ = 2  # another thread's sync() lands now
            return real.dumps(obj, **kw)

    monkeypatch.setattr(codec, "_dill", lambda: SyncDuringDump)
    _serialize_class(Racy)
    assert Racy.__app_id__ == 2 and codec.app_id_of(Racy) == 2

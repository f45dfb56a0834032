"""A misspelt field (``job.num_node = 3``) is a plain attribute that save() never sends, as in
Balsam 0.7, whose models took any attribute: setting it stays free (0.7 code sets ``job.idx``,
``job.started`` ...), and sending the object (save, bulk_update, bulk_create) warns once per name
that it is not saved, naming the field it is close to. A slice past the end of a query is empty,
as a list's (``Job.objects.all()[10**12:]`` was an APIError 422 on the offset)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def hello(balsam_env: Any, tmp_path: Path) -> Any:
    from balsam.api import ApplicationDefinition, Site

    path = tmp_path / "site-attr"
    (path / "data").mkdir(parents=True)
    Site.objects.create(name="site-attr", path=str(path))

    class Hello(ApplicationDefinition):
        site = "site-attr"
        command_template = "echo {{ name }}"

    Hello.sync()
    return Hello


@pytest.fixture
def five(hello: Any) -> list[Any]:
    from balsam.api import Job

    return Job.objects.bulk_create([Job(workdir=f"w/{i}", app_id=hello, parameters={"name": str(i)}) for i in range(5)])


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each (model, name) warns once per process: start from none warned."""
    from balsam._api import model

    monkeypatch.setattr(model, "_UNSAVED_CHECKED", {}, raising=False)


def _unsaved(record: list[Any]) -> list[str]:
    from balsam._api.model import UnsavedAttributeWarning

    return [str(w.message) for w in record if issubclass(w.category, UnsavedAttributeWarning)]


@pytest.mark.parametrize("typo, field", [("num_node", "num_nodes"), ("Num_Nodes", "num_nodes"), ("tag", "tags"),
                                         ("parameter", "parameters"), ("wall_time", "wall_time_min"),
                                         ("parent_id", "parent_ids"), ("ranks_per_nodes", "ranks_per_node")])
def test_a_misspelt_job_field_warns_at_save_and_is_not_saved(five: list[Any], fresh_warnings: None, typo: str,
                                                             field: str) -> None:
    from balsam._api.model import UnsavedAttributeWarning
    from balsam.api import Job

    job = Job.objects.get(id=five[0].id)
    setattr(job, typo, 3)  # no error: an attribute of the object's own, as in 0.7
    assert getattr(job, typo) == 3
    with pytest.warns(UnsavedAttributeWarning) as record:
        job.save()
    assert _unsaved(list(record)) == [f"Job has no field {typo!r} (did you mean {field!r}?): the attribute is not saved"]
    assert record[0].filename == __file__  # the warning names the save() line
    again = Job.objects.get(id=job.id)
    assert again.num_nodes == 1 and again.tags == {} and again.get_parameters() == {"name": "0"}
    unsaved = Job(workdir=f"w/new-{typo}", app_id=five[0].app_id)
    setattr(unsaved, typo, 3)
    with warnings.catch_warnings(record=True) as second:
        warnings.simplefilter("always")
        unsaved.save()  # once per (class, name) per process
    assert _unsaved(second) == [] and unsaved.id is not None


def test_every_path_that_sends_an_object_warns(five: list[Any], fresh_warnings: None) -> None:
    from balsam._api.model import UnsavedAttributeWarning
    from balsam.api import BatchJob, Job, Site

    jobs = list(Job.objects.filter(id=[j.id for j in five]))
    for j in jobs:
        j.num_node = 4
        j.state = "FAILED"
    with pytest.warns(UnsavedAttributeWarning, match="Job has no field 'num_node'") as record:
        assert Job.objects.bulk_update(jobs) == 5
    assert len(_unsaved(list(record))) == 1 and record[0].filename == __file__
    assert {j.num_nodes for j in Job.objects.filter(id=[j.id for j in five])} == {1}
    new = Job(workdir="w/bulk", app_id=five[0].app_id)
    new.wall_time = 5
    with pytest.warns(UnsavedAttributeWarning, match="'wall_time' \\(did you mean 'wall_time_min'\\?\\)"):
        Job.objects.bulk_create([new])
    site = Site.objects.get(name="site-attr")
    site.allowed_queue = {}
    with pytest.warns(UnsavedAttributeWarning, match="Site has no field 'allowed_queue' \\(did you mean 'allowed_queues'"):
        site.save()
    batch_job = BatchJob(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="mpi", queue="q", project="p")
    batch_job.wall_time_mins = 10
    with pytest.warns(UnsavedAttributeWarning, match="did you mean 'wall_time_min'"):
        batch_job.save()
    assert BatchJob.objects.get(id=batch_job.id).wall_time_min == 5


@pytest.mark.filterwarnings("ignore:.* has no field")  # started, stats, dat: close to state, data
def test_0_7_code_setting_its_own_attributes_runs_as_before(five: list[Any], fresh_warnings: None) -> None:
    from balsam.api import App, BatchJob, Job, Site

    class Tracked(Job):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.started = False  # a subclass's own bookkeeping (refused by an earlier check)

    tracked = Tracked(workdir="w/tracked", app_id=five[0].app_id)
    tracked.save()
    assert tracked.started is False and tracked.id is not None
    job = Job.objects.get(id=five[0].id)
    job.idx = 1
    job.save()  # no error (a warning at most)
    for name in ("uid", "pid", "started", "stats", "dat", "my_index", "status", "future"):
        setattr(job, name, name)
        assert getattr(job, name) == name
    job.parameters = {"name": "x"}  # a property with a setter
    job.state = "FAILED"  # fields
    job.save()
    again = Job.objects.get(id=job.id)
    assert again.get_parameters() == {"name": "x"} and again.state.value == "FAILED"
    site = Site.objects.get(name="site-attr")
    batch_job = BatchJob(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="mpi", queue="q", project="p")
    batch_job.queued, batch_job.projects = True, ["a"]
    app = App.objects.get(name="Hello")
    app.names = ["Hello"]
    site.idx = 3
    assert (batch_job.queued, app.names, site.idx) == (True, ["Hello"], 3)
    copy = pickle.loads(pickle.dumps(job))
    assert copy.id == job.id
    with pytest.raises(AttributeError):
        job.site_id = 3  # a read-only property stays read-only


def test_names_far_from_any_settable_field_never_warn(five: list[Any], fresh_warnings: None) -> None:
    from balsam.api import Job

    job = Job.objects.get(id=five[0].id)
    job.idx, job.my_index, job.status = 1, 7, "mine"  # "idx" is close only to "id", which nobody sets
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        job.save()
        list(Job.objects.all())
    assert _unsaved(record) == []


def test_application_definitions_set_their_own_attributes_freely(hello: Any) -> None:
    from balsam.api import ApplicationDefinition

    class Tuned(ApplicationDefinition):
        site = "site-attr"
        command_template = "echo {{ n }}"
        num_node = 4  # a class attribute of the app's own, even one close to a Job field

        def preprocess(self) -> None:
            self.tag = "seen"
            self.job.state = "PREPROCESSED"

    Tuned.sync()
    Tuned.num_node = 5
    job = Tuned.submit(workdir="w/tuned", n=1)
    app = Tuned(job)
    app.tagz = 1
    app.preprocess()
    assert app.tag == "seen" and Tuned.num_node == 5 and job.state.value == "PREPROCESSED"


def test_a_slice_past_the_end_is_empty(five: list[Any]) -> None:
    from balsam.api import Job

    assert list(Job.objects.all()[10**12:]) == []
    assert list(Job.objects.all()[2**31 - 1:]) == []
    assert list(Job.objects.all()[10**12:10**12 + 5]) == []
    assert list(Job.objects.filter(id=[j.id for j in five]).order_by("-id")[10**18:]) == []
    assert [p for p, more in Job.objects.all()[10**12:].pages(2)] == [[]]  # as an empty listing reads
    assert len(Job.objects.all()[3:10**12]) == 2
    assert Job.objects.all()[10**12:].count() == 5  # count() is of the filters, as in 0.7
    with pytest.raises(IndexError):
        Job.objects.all()[10**12]


@pytest.mark.parametrize("index", [-1, slice(-2, None), slice(0, -1)])
def test_negative_indexes_are_refused_as_0_7_refused_them(five: list[Any], index: Any) -> None:
    from balsam.api import Job

    with pytest.raises(ValueError, match="negative indexing is not supported"):
        Job.objects.all()[index]
    with pytest.raises(AssertionError):  # what Balsam 0.7's check raised
        Job.objects.all()[index]

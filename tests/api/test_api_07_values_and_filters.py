"""Values and filters that Balsam 0.7's client took and that 0.7 users' code passes: numpy numbers
for counts (libEnsemble takes them out of arrays), any iterable as a list filter
(``filter(id=tasks.keys())``), and bad workdirs/site paths refused with a ValueError when set, as
0.7's pydantic models did (not an APIError at save, in the middle of a bulk_create)."""

from __future__ import annotations

import numbers

import numpy as np
import pytest


def _app(site, name="Echo"):
    from balsam.api import ApplicationDefinition

    return type(name, (ApplicationDefinition,), {"site": site.name, "command_template": "echo {{ x }}"})


class _Count:
    """An integer type that is not int (numpy's int64 is one, any object with __index__ is)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


class _Ratio:
    """A real number type that is not float (numpy's float32 is one: registered as numbers.Real)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __float__(self) -> float:
        return self.value


numbers.Real.register(_Ratio)


# ------------------------------------------------------------------------------- numpy numbers
def test_numpy_numbers_are_taken_for_count_and_number_fields_and_stored_plain(site):
    from balsam.api import BatchJob, Job

    Echo = _app(site)
    Echo.sync()
    job = Job("np/1", Echo, parameters={"x": 1}, num_nodes=np.int64(2), ranks_per_node=np.int32(4),
              gpus_per_rank=np.float32(0.5), parent_ids=np.array([], dtype=np.int64))
    assert (job.num_nodes, job.ranks_per_node, job.gpus_per_rank) == (2, 4, 0.5)
    assert type(job.num_nodes) is int and type(job.gpus_per_rank) is float
    job.save()
    job.num_nodes = np.int64(3)
    assert type(job.num_nodes) is int
    job.save()
    assert Job.objects.get(id=job.id).num_nodes == 3
    assert Job.objects.filter(id=job.id).update(num_nodes=np.int64(1), gpus_per_rank=np.float64(1.5)) == 1
    stored = Job.objects.get(id=job.id)
    assert (stored.num_nodes, stored.gpus_per_rank) == (1, 1.5)
    child = Job("np/2", np.int64(Echo.__app_id__), parameters={"x": 2}, parent_ids=np.array([job.id]))
    assert child.app_id == Echo.__app_id__ and child.parent_ids == {job.id}

    batch = BatchJob(site_id=site.id, project="datascience", queue="debug", num_nodes=np.int64(1),
                     wall_time_min=np.int64(10), job_mode="mpi")
    assert type(batch.num_nodes) is int and type(batch.wall_time_min) is int


def test_any_integer_or_real_type_is_taken_and_bools_still_are_not():
    from balsam.api import Job

    job = Job("t/1", 1, num_nodes=_Count(2), gpus_per_rank=_Ratio(0.25))
    assert (job.num_nodes, job.gpus_per_rank) == (2, 0.25)
    assert type(job.num_nodes) is int and type(job.gpus_per_rank) is float
    for flag in (True, np.bool_(True)):
        with pytest.raises(ValueError, match="num_nodes: expected an integer"):
            Job("t/1", 1, num_nodes=flag)
        with pytest.raises(ValueError, match="gpus_per_rank: expected a number"):
            Job("t/1", 1, gpus_per_rank=flag)
    with pytest.raises(ValueError, match="num_nodes: expected an integer"):
        Job("t/1", 1, num_nodes=np.float32(1.5))


# ------------------------------------------------------------------------------- list filters
def test_any_iterable_is_a_list_filter(site):
    from balsam.api import Job

    Echo = _app(site)
    jobs = Job.objects.bulk_create([Job(f"it/{i}", Echo, parameters={"x": i}) for i in range(4)])
    ids = [j.id for j in jobs]
    tasks = {ids[0]: "a", ids[2]: "b"}  # libEnsemble keeps its tasks by job id
    assert sorted(j.id for j in Job.objects.filter(id=tasks.keys())) == [ids[0], ids[2]]
    assert sorted(j.id for j in Job.objects.filter(id=(i for i in ids[1:3]))) == ids[1:3]
    assert sorted(j.id for j in Job.objects.filter(id=map(int, [str(ids[3])]))) == [ids[3]]
    assert sorted(j.id for j in Job.objects.filter(id=range(ids[0], ids[1] + 1))) == ids[:2]
    assert sorted(j.id for j in Job.objects.filter(id=np.array(ids[:3]))) == ids[:3]
    assert Job.objects.filter(id=iter([])).count() == 0  # an empty iterable matches nothing
    assert Job.objects.filter(workdir__contains="it/3").count() == 1  # a string stays one value


# ------------------------------------------------------------------------- values checked when set
@pytest.mark.parametrize("workdir", ["/abs/x", "a/../../x", "."])
def test_a_workdir_outside_data_raises_value_error_when_set(workdir):
    from balsam.api import Job
    from balsam.models import workdir_problem

    with pytest.raises(ValueError) as raised:
        Job(workdir, 1, parameters={"x": 1})
    assert str(raised.value) == f"Job.workdir: {workdir_problem(workdir)}"  # the server's words
    job = Job("fine", 1)
    with pytest.raises(ValueError, match="Job.workdir: must"):
        job.workdir = workdir
    assert str(job.workdir) == "fine"


def test_a_workdir_update_outside_data_raises_value_error_before_any_request(site):
    from balsam.api import Job

    Echo = _app(site)
    job = Echo.submit("in/1", x=1)
    with pytest.raises(ValueError, match="Job.workdir: must be relative"):
        Job.objects.filter(id=job.id).update(workdir="/etc")
    assert str(Job.objects.get(id=job.id).workdir) == "in/1"


def test_a_relative_site_path_raises_value_error_when_set(tmp_path):
    from balsam.api import Site

    with pytest.raises(ValueError, match="Site.path: must be an absolute path, got 'rel/p'"):
        Site(name="rel", path="rel/p")
    site = Site(name="abs", path=str(tmp_path))
    with pytest.raises(ValueError, match="Site.path: must be an absolute path"):
        site.path = "rel/p"

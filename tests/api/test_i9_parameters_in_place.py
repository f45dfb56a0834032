"""``job.parameters`` changed in place. ``get_parameters`` keeps the dict it decoded (reading it
again is free), so ``job.parameters["n"] = 2`` changed the job's copy only: save(), bulk_update()
and bulk_create() sent the old payload (the change was lost with no error, while the same change
of ``job.data`` is sent), and refresh_from_db() kept showing the unsaved dict instead of the
stored parameters. Against the live server (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def app(bare_site: Any) -> Any:
    from balsam.api import ApplicationDefinition

    cls = type("InPlace", (ApplicationDefinition,), {"site": bare_site.name, "command_template": "echo {{ n }}"})
    cls.sync()
    return cls


def test_save_sends_parameters_changed_in_place(app: Any) -> None:
    from balsam.api import Job

    job = app.submit(workdir="w/0", n=1, extra={"k": [1]})
    job.parameters["n"] = 2
    job.parameters["extra"]["k"].append(3)
    assert "serialized_parameters" in job.dirty_fields
    job.save()
    assert Job.objects.get(id=job.id).parameters == {"n": 2, "extra": {"k": [1, 3]}}
    # Tracked after the save too, and an unchanged read sends nothing.
    job.parameters["n"] = 4
    job.save()
    assert Job.objects.get(id=job.id).parameters["n"] == 4
    again = Job.objects.get(id=job.id)
    assert again.parameters == {"n": 4, "extra": {"k": [1, 3]}}
    assert again.dirty_fields == set()


def test_bulk_update_and_bulk_create_send_parameters_changed_in_place(app: Any) -> None:
    from balsam.api import Job

    unsaved = [app.submit(workdir=f"b/{i}", n=i, save=False) for i in range(3)]
    for job in unsaved:
        job.parameters["n"] += 10
    created = Job.objects.bulk_create(unsaved)
    assert [j.parameters["n"] for j in Job.objects.filter(id=[j.id for j in created]).order_by("id")] == [10, 11, 12]

    jobs = list(Job.objects.filter(id=[j.id for j in created]).order_by("id"))
    for job in jobs:
        job.parameters["n"] *= 2
    assert Job.objects.bulk_update(jobs) == 3
    assert [j.parameters["n"] for j in Job.objects.filter(id=[j.id for j in created]).order_by("id")] == [20, 22, 24]


def test_pickled_jobs_carry_parameters_changed_in_place(app: Any) -> None:
    import pickle

    from balsam.api import Job

    unsaved = app.submit(workdir="k/0", n=1, save=False)
    unsaved.parameters["n"] = 5
    stored = app.submit(workdir="k/1", n=1)
    stored.parameters["n"] = 6
    copies = pickle.loads(pickle.dumps([unsaved, stored]))
    assert [c.parameters["n"] for c in copies] == [5, 6]
    created = Job.objects.bulk_create([copies[0]])
    copies[1].save()
    assert Job.objects.get(id=created[0].id).parameters["n"] == 5
    assert Job.objects.get(id=stored.id).parameters["n"] == 6


def test_refresh_from_db_drops_unsaved_parameter_changes(app: Any) -> None:
    from balsam.api import Job

    job = app.submit(workdir="r/0", n=1)
    job.parameters["n"] = 99
    job.refresh_from_db()
    assert job.parameters == {"n": 1}
    assert job.dirty_fields == set()

    job.parameters["n"] = 98
    Job.objects.bulk_refresh([job])
    assert job.parameters == {"n": 1}

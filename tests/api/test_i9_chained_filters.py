"""A filter given again in a chain: ``Job.objects.filter(tags=a).filter(tags=b)``. The second
replaced the first (Balsam 0.7's quirk), so a query narrowed in two steps matched records outside
the first step: ``mine.filter(tags={"step": "1"}).delete()`` deleted the step-1 jobs of every
experiment. Now tags apply together, id lists intersect, and another filter given twice with a
different value is a one-line ValueError naming it. Against the live server (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def jobs(bare_site: Any) -> list[Any]:
    """Six STAGED_IN jobs: experiments x1/x2 by step 0-2."""
    from balsam.api import ApplicationDefinition, Job

    app = type("Chained", (ApplicationDefinition,), {"site": bare_site.name, "command_template": "echo hi"})
    app.sync()
    return Job.objects.bulk_create([app.submit(workdir=f"{x}/{s}", tags={"experiment": x, "step": str(s)}, save=False)
                                    for x in ("x1", "x2") for s in range(3)])


def test_chained_tag_filters_apply_together(jobs: list[Any]) -> None:
    from balsam.api import Job

    mine = Job.objects.filter(tags={"experiment": "x1"})
    step1 = mine.filter(tags={"step": "1"})
    assert [str(j.workdir) for j in step1] == ["x1/1"]
    assert step1.count() == 1
    assert step1.delete() == 1
    assert sorted(str(j.workdir) for j in Job.objects.all()) == ["x1/0", "x1/2", "x2/0", "x2/1", "x2/2"]


def test_chained_id_filters_intersect(jobs: list[Any]) -> None:
    from balsam.api import Job

    ids = [j.id for j in jobs]
    q = Job.objects.filter(id=ids[:3]).filter(id=ids[2:5])
    assert [j.id for j in q] == [ids[2]]
    assert Job.objects.filter(id=ids[:2]).get(id=ids[1]).id == ids[1]
    with pytest.raises(Job.DoesNotExist):
        Job.objects.filter(id=ids[:2]).get(id=ids[4])
    assert list(Job.objects.filter(id=ids[:2]).filter(id=ids[4])) == []
    assert Job.objects.filter(id=ids[:2]).filter(id=ids[4]).count() == 0


def test_other_filter_given_twice_is_refused(jobs: list[Any]) -> None:
    from balsam.api import Job

    q = Job.objects.filter(state="STAGED_IN")
    assert len(q.filter(state="STAGED_IN")) == 6  # the same value again is no change
    with pytest.raises(ValueError, match="filter 'state' given again") as info:
        q.filter(state="RUNNING")
    assert "\n" not in str(info.value)

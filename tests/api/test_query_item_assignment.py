"""``q[i] = obj`` on a Query, as Balsam 0.7's Query.__setitem__: item i of the query's fetched
records becomes obj (fetched first if not yet), locally; a non-int index is a TypeError."""

from __future__ import annotations

import pytest


def test_item_assignment_replaces_a_fetched_record_locally(site):
    from balsam.api import ApplicationDefinition, Job

    app = type("Assigned", (ApplicationDefinition,), {"site": site.name, "command_template": "echo {{ n }}"})
    app.sync()
    Job.objects.bulk_create([app.submit(workdir=f"a/{i}", n=i, save=False) for i in range(3)])
    q = Job.objects.filter(site_id=site.id).order_by("id")
    first, third = Job.objects.filter(site_id=site.id).order_by("id")[0], list(q)[2]
    q[0] = third  # the query was read by list(q): its records change, nothing is sent
    assert [j.id for j in q] == [third.id, q[1].id, third.id] and len(q) == 3 and q[0] is third
    fresh = Job.objects.filter(site_id=site.id).order_by("id")
    fresh[2] = first  # not read yet: read first, then assigned
    assert [j.id for j in fresh][2] == first.id and len(fresh) == 3
    fresh[-1] = third  # a list's index, as 0.7's (the records are read by now)
    assert fresh[2] is third
    assert [j.id for j in Job.objects.filter(site_id=site.id).order_by("id")] == sorted(
        [first.id, q[1].id, third.id])  # the stored jobs are unchanged
    with pytest.raises(TypeError, match="int index"):
        fresh[0:1] = [first]
    with pytest.raises(IndexError):
        fresh[3] = first

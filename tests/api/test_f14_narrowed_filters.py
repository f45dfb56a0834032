"""A list filter narrowed in a chain: ``filter(state=[A, B, C]).filter(state=C)`` (or ``.get(state=C)``)
matches C, as id lists intersect; it raised "filter 'state' given again" (6851a6a). Two single
values that conflict still raise, naming the method called (``get()``, not ``filter()``). Against
the live server (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def jobs(bare_site: Any) -> list[Any]:
    """Three jobs: two STAGED_IN, one FAILED."""
    from balsam.api import ApplicationDefinition, Job

    app = type("Narrow", (ApplicationDefinition,), {"site": bare_site.name, "command_template": "echo hi"})
    app.sync()
    made = Job.objects.bulk_create([app.submit(workdir=f"w/{i}", save=False) for i in range(3)])
    Job.objects.filter(id=made[2].id).update(state="FAILED")
    return made


def test_a_state_list_narrowed_by_one_state(jobs: list[Any]) -> None:
    from balsam.api import Job

    not_done = Job.objects.filter(state=["STAGED_IN", "FAILED", "RUNNING"])
    assert not_done.count() == 3
    assert [j.id for j in not_done.filter(state="FAILED")] == [jobs[2].id]
    assert not_done.get(state="FAILED").id == jobs[2].id
    assert sorted(j.id for j in not_done.filter(state=["STAGED_IN", "JOB_FINISHED"])) == [jobs[0].id, jobs[1].id]
    assert Job.objects.filter(state="FAILED").filter(state=["FAILED", "RUNNING"]).count() == 1
    # Nothing in common: matches nothing (as id lists do).
    assert not_done.filter(state="JOB_FINISHED").count() == 0
    assert list(not_done.filter(state=["JOB_FINISHED"])) == []
    with pytest.raises(Job.DoesNotExist):
        not_done.get(state="JOB_FINISHED")


def test_two_single_values_that_conflict_name_the_method(jobs: list[Any]) -> None:
    from balsam.api import Job

    running = Job.objects.filter(state="RUNNING")
    with pytest.raises(ValueError, match=r"Job\.objects\.get\(\): filter 'state' given again") as info:
        running.get(state="FAILED")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"Job\.objects\.filter\(\): filter 'state' given again"):
        running.filter(state="FAILED")

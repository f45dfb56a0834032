"""A key/value filter (``tags=``, an event's ``data=``, a BatchJob's ``filter_tags=``) whose key holds
':' is a ValueError naming the key, before any request. The API's filter is ``KEY:VALUE`` split at
the first ':', so ``Job.objects.filter(tags={"a:b": "c"})`` was sent as tag ``a`` = ``"b:c"``: it
returned, and its ``delete()`` deleted, the jobs tagged ``{"a": "b:c"}``, never those tagged
``{"a:b": "c"}``. Saving such a tag stays allowed (as in Balsam 0.7); those jobs are selected by id.
Against the live server (SQLite)."""

from __future__ import annotations

from typing import Any, Callable

import pytest

REFUSED = ("holds ':', which a tags filter cannot hold (the API reads 'a:b:c' as tags 'a' = 'b:c'); "
           "select these records by id")


def test_a_colon_key_is_refused_and_the_job_tagged_with_the_colon_value_is_kept(site: Any, sent: list) -> None:
    from balsam.api import ApplicationDefinition, Job

    app = type("ColonKey", (ApplicationDefinition,), {"site": site.name, "command_template": "echo hi"})
    app.sync()
    victim = app.submit(workdir="victim", tags={"a": "b:c"})
    # Saving a key with ':' stays allowed; the job is read back by id.
    colon = app.submit(workdir="colon", tags={"a:b": "c"})
    assert Job.objects.get(id=colon.id).tags == {"a:b": "c"}
    sent.clear()
    calls: dict[str, Callable[[], Any]] = {
        "filter": lambda: Job.objects.filter(tags={"a:b": "c"}),
        "delete": lambda: Job.objects.filter(site_id=site.id, tags={"a:b": "c"}).delete(),
        "update": lambda: Job.objects.filter(tags={"x": "1", "a:b": "c"}).update(data={"hit": 1}),
        "chained": lambda: Job.objects.filter(site_id=site.id).filter(tags={"a:b": "c"}).count(),
        "get": lambda: Job.objects.get(tags={"a:b": "c"}),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        method = "get" if name == "get" else "filter"
        assert str(info.value) == f"Job.objects.{method}(): tags key 'a:b' {REFUSED}", name
    assert sent == []
    assert sorted(j.id for j in Job.objects.filter(site_id=site.id)) == sorted([victim.id, colon.id])
    assert Job.objects.get(id=victim.id).data == {}
    # A ':' in a value is sent as it is and selects its job.
    assert [j.id for j in Job.objects.filter(tags={"a": "b:c"})] == [victim.id]


def test_other_models_key_value_filters_refuse_a_colon_key(sent: list) -> None:
    from balsam.api import BatchJob, EventLog, TransferItem

    for model, key in ((EventLog, "tags"), (EventLog, "data"), (BatchJob, "filter_tags"), (TransferItem, "tags")):
        with pytest.raises(ValueError, match=rf"^{model.__name__}\.objects\.filter\(\): {key} key 'q:r' holds ':'"):
            model.objects.filter(**{key: {"q:r": "s"}}).count()
    assert sent == []

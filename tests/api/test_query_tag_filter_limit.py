"""Key/value filters (``tags=``, an event's ``data=``, a BatchJob's ``filter_tags=``) all apply
together, and the server refuses more than ``MAX_TAG_FILTERS`` distinct pairs per parameter (422).
The client sent them anyway (list(), count(), delete(), update() each got the server's 422 as an
APIError), and split a list of them longer than ``filter_chunk_size`` over several requests, whose
results it joined: the records holding any chunk's pairs instead of all of them. Now more than
``MAX_TAG_FILTERS`` distinct pairs are a one-line ValueError before any request, and a key/value
filter is never split. Against the live server (SQLite)."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from balsam._api.query import Query
from balsam.models import MAX_TAG_FILTERS

#: Every pair one job holds; another job holds all of them but the first.
TAGS = {f"k{i}": "v" for i in range(MAX_TAG_FILTERS)}
MANY = {f"k{i}": "v" for i in range(MAX_TAG_FILTERS + 1)}


def test_100_distinct_pairs_are_one_request_never_split(site: Any, sent: list, monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.api import ApplicationDefinition, Job

    app = type("TagCap", (ApplicationDefinition,), {"site": site.name, "command_template": "echo hi"})
    app.sync()
    Job.objects.bulk_create([app.submit(workdir="all", tags=TAGS, save=False),
                             app.submit(workdir="most", tags=dict(list(TAGS.items())[1:]), save=False)])
    monkeypatch.setattr(Query, "filter_chunk_size", 10)  # a split would join chunks: "most" too
    sent.clear()
    assert [str(j.workdir) for j in Job.objects.filter(tags=TAGS)] == ["all"]
    assert sent == [("GET", "/jobs/")]
    # A pair given again counts once, as the server counts it: 100 pairs, sent as given.
    pairs = [f"{k}:{v}" for k, v in TAGS.items()]
    assert Job.objects.filter(tags=pairs + pairs[:5]).count() == 1
    assert Job.objects.filter(tags=TAGS).filter(tags={"k0": "v"}).count() == 1
    assert Job.objects.filter(tags=TAGS).update(data={"seen": 1}) == 1
    assert len(sent) == 4


def test_101_distinct_pairs_are_refused_before_any_request(sent: list) -> None:
    from balsam.api import Job

    calls: dict[str, Callable[[], Any]] = {
        "filter": lambda: Job.objects.filter(tags=MANY),  # refused here: the query is never built
        "list": lambda: list(Job.objects.filter(tags=MANY)),
        "count": lambda: Job.objects.filter(tags=MANY).count(),
        "delete": lambda: Job.objects.filter(tags=MANY).delete(),
        "update": lambda: Job.objects.filter(tags=MANY).update(data={"x": 1}),
        "pages": lambda: list(Job.objects.filter(tags=MANY).pages()),
        # 60 pairs, then 41 more: both sets apply, 101 pairs
        "chained": lambda: Job.objects.filter(tags=dict(list(MANY.items())[:60])).filter(
            tags=dict(list(MANY.items())[60:])).count(),
        "get": lambda: Job.objects.get(tags=MANY),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        method = "get" if name == "get" else "filter"
        assert str(info.value) == (f"Job.objects.{method}(): at most {MAX_TAG_FILTERS} distinct tags filters "
                                   f"(key:value pairs, balsam.models.MAX_TAG_FILTERS), got {MAX_TAG_FILTERS + 1}"), name
    assert sent == []


def test_other_models_key_value_filters_are_capped_alike(sent: list) -> None:
    from balsam.api import BatchJob, EventLog, TransferItem

    for model, key in ((EventLog, "tags"), (EventLog, "data"), (BatchJob, "filter_tags"), (TransferItem, "tags")):
        with pytest.raises(ValueError, match=rf"^{model.__name__}\.objects\.filter\(\): at most {MAX_TAG_FILTERS} "
                                             rf"distinct {key} filters .* got {MAX_TAG_FILTERS + 1}$"):
            model.objects.filter(**{key: MANY}).count()
    assert sent == []
    assert EventLog.objects.filter(data=TAGS).count() == 0  # 100: sent, and taken by the server
    assert BatchJob.objects.filter(filter_tags=TAGS).count() == 0
    assert len(sent) == 2

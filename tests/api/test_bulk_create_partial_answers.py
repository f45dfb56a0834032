"""``bulk_create`` with chunks side by side (PostgreSQL) when one chunk's answer is lost: a chunk
answered beside it is stored, and the error counts it as created, not as not created. It used to
name every chunk from the failed one on as not created ("stored 0 of 6000 (none)" while the chunk
of 1,000 answered beside it was stored): a user who sent ``not_created`` again in a new
``bulk_create`` (new keys, not ``resume()``) stored those jobs twice."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from test_bulk_create_side_by_side import (
    _app,
    _jobs,
    fail_a_chunk_beside_another,
    pg_site,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.postgres


def test_a_chunk_answered_beside_a_lost_answer_is_created_and_not_sent_again(pg_site: Any, monkeypatch: Any) -> None:
    from balsam._api import models
    from balsam.api import BulkCreateError, Job
    from balsam.client import RESTClient
    from balsam.client.rest import ServerUnavailable

    app = _app(pg_site)
    monkeypatch.setattr(models.JobManager, "bulk_chunk_size", 10)
    real = RESTClient.request_with_headers

    def lose_the_answer(send: Callable[[], Any]) -> Any:
        send()  # stored by the server...
        raise ServerUnavailable("the answer was lost (for the test)")  # ...its answer lost

    # both chunks in flight; the second one answered first
    sent = fail_a_chunk_beside_another(monkeypatch, "L/0", "L/10", lose_the_answer)
    with pytest.raises(BulkCreateError) as caught:
        Job.objects.bulk_create(_jobs(app, "L", 25, "lost"))
    error = caught.value
    assert sorted(sent) == ["L/0", "L/10"]  # the third chunk was not sent
    created = [str(job.workdir) for job in error.created]
    not_created = [str(job.workdir) for job in error.not_created]
    assert created == [f"L/{i}" for i in range(10, 20)]
    assert not_created == [f"L/{i}" for i in (*range(10), *range(20, 25))]  # each list in the order given
    assert not set(created) & set(not_created) and len(created) + len(not_created) == 25
    assert all(job.id is not None for job in error.created)
    # What the server stored: every created job, with its id; the rest is the chunk whose answer
    # was lost (not_created, "may be stored"), never a job the error calls created that is not there.
    stored = {str(job.workdir): job.id for job in Job.objects.filter(tags={"t": "lost"})}
    assert {str(job.workdir): job.id for job in error.created}.items() <= stored.items()
    assert sorted(set(stored) - set(created)) == sorted(f"L/{i}" for i in range(10))
    assert "stored 10 of 25 jobs" in str(error) and "chunk of 10 from item 0 of the list got no answer" in str(error)

    monkeypatch.setattr(RESTClient, "request_with_headers", real)
    sent.clear()
    client = Job._get_client()
    posts_before = client.request_counts["POST /jobs/"]
    everything = error.resume()
    assert client.request_counts["POST /jobs/"] - posts_before == 2  # the lost chunk (its key) and the last one
    assert [str(job.workdir) for job in everything] == [f"L/{i}" for i in range(25)]
    ids = [job.id for job in everything]
    assert ids == sorted(ids) and len(set(ids)) == 25
    assert Job.objects.filter(tags={"t": "lost"}).count() == 25  # nothing stored twice

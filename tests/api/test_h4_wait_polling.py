"""DeepHyper's pattern: submit many run() jobs, poll for the finished ones, read their results.

A poll is one request per 500 pending jobs and none for the jobs already done; it reads only
what it needs of each record. ``wait()`` used to structure every pending job's whole record at
each poll (bulk_refresh's ``_adopt``): 60% of a poll's time, 4 s per poll of 10,000 jobs."""

from __future__ import annotations

from typing import Any

import pytest

from balsam._api import codec
from balsam._api.model import BalsamModel


def test_polling_reads_pending_jobs_in_bulk_and_leaves_their_records_unparsed(site: Any,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.api import ApplicationDefinition, Job

    site_name = site.name

    class Evaluate(ApplicationDefinition):
        site = site_name

        def run(self, x):
            return x * x

    jobs = Job.objects.bulk_create([Evaluate.submit(workdir=f"eval/{i}", x=i, save=False) for i in range(1200)])
    client = Job._get_client()
    structured = []
    real = BalsamModel._materialize

    def counting(self: Any) -> Any:
        structured.append(self)
        return real(self)

    monkeypatch.setattr(BalsamModel, "_materialize", counting)
    gets = client.request_counts["GET /jobs/"]
    waited = Job.objects.wait(jobs, timeout=0)
    assert (len(waited.done), len(waited.not_done)) == (0, 1200)
    assert client.request_counts["GET /jobs/"] - gets == 3  # 500 ids a request
    assert structured == []

    # Half of them end (as a launcher and the agent would leave them): the next poll reads them,
    # the one after reads only the 600 still pending.
    for job in jobs[:600]:
        job.serialized_return_value = codec.serialize(job.get_parameters()["x"] ** 2)
    Job.objects.bulk_update(jobs[:600])
    Job.objects.filter(id=[j.id for j in jobs[:600]]).update(state="FAILED")
    gets = client.request_counts["GET /jobs/"]
    structured.clear()
    waited = Job.objects.wait(jobs, timeout=0)
    assert structured == []
    assert (len(waited.done), len(waited.not_done)) == (600, 600)
    assert client.request_counts["GET /jobs/"] - gets == 3
    assert [job.result_nowait() for job in waited.done] == [i * i for i in range(600)]
    gets = client.request_counts["GET /jobs/"]
    structured.clear()
    Job.objects.wait(jobs, timeout=0)
    assert client.request_counts["GET /jobs/"] - gets == 2  # the 600 pending only
    assert structured == []

    # A refreshed job is an ordinary record: an in-place change of a field is saved.
    job = waited.not_done[0]
    job.data["attempt"] = 2
    job.save()
    assert Job.objects.get(id=job.id).data == {"attempt": 2}
    # and an unsaved change is replaced by the stored record, as in Balsam 0.7
    job.num_nodes = 7
    Job.objects.bulk_refresh([job])
    assert job.num_nodes == 1 and job.dirty_fields == set()


def test_a_job_deleted_while_waited_for_completes_with_no_result(site: Any) -> None:
    """A job deleted meanwhile (``balsam job rm``, a clean-up script) stayed pending: ``wait()``
    and ``result()`` without a timeout polled for ever (as in Balsam 0.7). It now completes, as
    a cancelled future does, and its result() says it was deleted."""
    from balsam.api import ApplicationDefinition, Job

    site_name = site.name

    class Evaluate(ApplicationDefinition):
        site = site_name

        def run(self, x):
            return x

    jobs = Job.objects.bulk_create([Evaluate.submit(workdir=f"gone/{i}", x=i, save=False) for i in range(3)])
    Job.objects.filter(id=[jobs[0].id]).delete()
    Job.objects.filter(id=[j.id for j in jobs[1:]]).update(state="FAILED")
    # (the timeouts only bound the test: the waits return at once)
    waited = Job.objects.wait(jobs, timeout=30)
    assert ([j.id for j in waited.done], waited.not_done) == ([j.id for j in jobs], [])
    with pytest.raises(Job.NoResult, match=rf"^Job\(id={jobs[0].id}, workdir='gone/0'\) was deleted in state "
                                           r"STAGED_IN: it has no result$"):
        jobs[0].result(timeout=30)
    other = Job.objects.bulk_create([Evaluate.submit(workdir="gone/3", x=3, save=False)])[0]
    Job.objects.filter(id=[other.id]).delete()
    fresh = [Job.objects.get(id=jobs[2].id), other]
    assert [j.id for j in Job.objects.as_completed(fresh, timeout=30)] == [jobs[2].id, other.id]
    with pytest.raises(Job.NoResult, match="was deleted"):
        other.result_nowait()
    with pytest.raises(Job.DoesNotExist):  # as in Balsam 0.7
        other.refresh_from_db()

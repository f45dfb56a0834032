"""The last try of a submission that times out after the scheduler accepted the job.

An audit of "nothing lost, nothing twice" on the allocation side: the scheduler module tries a
BatchJob's submission ``threshold`` times. Each try after a transient failure first asks the
scheduler (by job name and script) whether the previous one reached the queue. The last try did
not: when its submit command timed out after the scheduler had queued the job (``sbatch`` did not
answer within 60 s; slurmctld busy), the BatchJob was marked ``submit_failed`` while its job stayed
in the queue, unknown to balsam: it waited, started, and burned the allocation (its launcher's
credential was withdrawn with the BatchJob), and the elastic queue, seeing a failed submission,
requested another allocation for the same backlog.
"""

from __future__ import annotations

import pytest

from balsam.scheduler import SchedulerError
from balsam.site.modules.scheduler import SchedulerModule
from site_test_utils import batch_job, create_batch_job
from test_site_scheduler_module import ScriptedScheduler  # status_error_threshold 2: two tries


@pytest.fixture
def setup(make_site, client):
    site = make_site(overrides={"scheduler": {"allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 60,
                                                                           "max_queued_jobs": 5}}}})
    fake = ScriptedScheduler()
    fake.names = {}
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    return site, fake, module


def _pending(module, bj_id: int):
    script = module.script_path(bj_id)
    return script.with_name(script.name + ".submitting")


def test_a_last_try_that_timed_out_after_the_job_was_queued_tracks_that_job(setup, client) -> None:
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    fake.submit_errors.append(SchedulerError("`sbatch` did not answer within 60 s"))  # nothing queued
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "pending_submission" and not fake.submitted
    fake.errors_after_accept.append(SchedulerError("`sbatch` did not answer within 60 s"))  # queued, no answer
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert len(fake.submitted) == 1 and fake.next_id in fake.queue
    # The job the scheduler holds is this BatchJob's: tracked, not left running unknown to balsam.
    assert record["state"] == "queued" and record["scheduler_id"] == fake.next_id
    assert not _pending(module, bj["id"]).exists()
    module.run_cycle()
    assert len(fake.submitted) == 1 and batch_job(client, bj["id"])["state"] == "queued"


def test_a_last_try_that_failed_with_nothing_queued_is_still_submit_failed(setup, client) -> None:
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    for _ in range(2):
        fake.submit_errors.append(SchedulerError("sbatch: error: Socket timed out"))
    module.run_cycle()
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed" and "Socket timed out" in record["status_info"]["error"]
    assert not fake.submitted and not _pending(module, bj["id"]).exists()


def test_a_last_try_whose_lookup_fails_waits_rather_than_failing(setup, client) -> None:
    """The scheduler cannot say whether the last try reached it: the BatchJob is neither failed
    (its job may be queued) nor submitted again; the next cycle asks again."""
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    fake.submit_errors.append(SchedulerError("`sbatch` did not answer within 60 s"))
    module.run_cycle()
    fake.errors_after_accept.append(SchedulerError("`sbatch` did not answer within 60 s"))
    lookups = []
    real_find = fake.find_submitted

    def find_submitted(request):  # the lookup before the try answers, the one after it fails
        lookups.append(request.job_name)
        if len(lookups) == 2:
            raise SchedulerError("squeue: error: Socket timed out")
        return real_find(request)

    fake.find_submitted = find_submitted
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert len(lookups) == 2 and len(fake.submitted) == 1
    assert record["state"] == "pending_submission" and "cannot say now" in record["status_info"]["waiting"]
    assert _pending(module, bj["id"]).is_file()
    module.run_cycle()  # the lookup answers: the job is adopted
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and record["scheduler_id"] == fake.next_id and len(fake.submitted) == 1


def test_a_last_try_on_a_scheduler_that_cannot_look_up_keeps_the_old_outcome(setup, client) -> None:
    site, fake, module = setup
    fake.names = None  # no lookup by name (Cobalt)
    bj = create_batch_job(client, site.site_id)
    for _ in range(2):
        fake.submit_errors.append(SchedulerError("qsub: timed out"))
    module.run_cycle()
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "submit_failed" and not fake.submitted

"""A submit command that timed out after the scheduler queued its job, then a try the scheduler
refuses for good, with a scheduler that cannot look jobs up by name (Cobalt before its .cobaltlog
exists: find_submitted answers None).

Before: the refusal deleted the ``.submitting`` marker (written by the refused try, over the
first try's), so the BatchJob looked as if nothing of it could be queued: its launcher credential
was revoked and its file deleted, while the first try's job was still in the queue; its launcher
started with no credential (the allocation wasted), and the BatchJob's error said nothing of it.
"""

from __future__ import annotations

from balsam.scheduler import SchedulerError
from balsam.site.modules.scheduler import SchedulerModule
from site_test_utils import batch_job, create_batch_job
from test_h8_plugin_hook_and_credentials import _active_credentials, setup  # noqa: F401 (fixture)


def _first_try_queued_without_answer(fake, module) -> list[int]:
    fake.names = None  # the scheduler cannot tell which jobs are whose
    fake.errors_after_accept.append(SchedulerError("qsub: timed out"))  # queued, but no answer
    module.run_cycle()
    queued = list(fake.queue)
    assert queued, "the first try's job is in the scheduler's queue"
    return queued


def test_a_refusal_after_an_unanswered_try_keeps_the_credential_of_its_queued_job(setup, client) -> None:
    site, fake, module, clock = setup
    bj = create_batch_job(client, site.site_id)
    queued = _first_try_queued_without_answer(fake, module)
    [cred] = _active_credentials(client, bj["id"])
    fake.submit_errors.append(SchedulerError("qsub: project over allocation", permanent=True))
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed"
    assert set(fake.queue) >= set(queued)  # still queued: its launcher will start
    assert _active_credentials(client, bj["id"]) == [cred], "the queued job's launcher credential was revoked"
    assert module.credentials.stored(bj["id"]) is not None, "its credential file was deleted"
    # The user is told that a job may be queued, and what to do.
    error = record["status_info"]["error"]
    assert "project over allocation" in error and "may be in its queue" in error, error
    assert "qlaunch%05d" % bj["id"] in error and "delete the job by hand" in error, error
    # Later cycles (the BatchJob is no longer active) keep the file its launcher reads.
    module.run_cycle()
    module.run_cycle()
    assert module.credentials.stored(bj["id"]) is not None, "a later cycle deleted the credential file"
    assert _active_credentials(client, bj["id"]) == [cred]


def test_the_unknown_outcome_survives_an_agent_restart_between_the_tries(setup, client) -> None:
    site, fake, module, clock = setup
    bj = create_batch_job(client, site.site_id)
    _first_try_queued_without_answer(fake, module)
    # Try 2 also ends without an answer (nothing queued this time), then the agent restarts.
    fake.submit_errors.append(SchedulerError("qsub: timed out"))
    module.run_cycle()
    restarted = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    [cred] = _active_credentials(client, bj["id"])
    fake.submit_errors.append(SchedulerError("qsub: project over allocation", permanent=True))
    restarted.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "submit_failed"
    assert _active_credentials(client, bj["id"]) == [cred]
    assert restarted.credentials.stored(bj["id"]) is not None


def test_a_refusal_with_nothing_queued_for_sure_still_revokes(setup, client) -> None:
    site, fake, module, clock = setup
    bj = create_batch_job(client, site.site_id)
    fake.submit_errors.append(SchedulerError("qsub: timed out"))  # nothing queued
    module.run_cycle()
    assert not fake.queue and _active_credentials(client, bj["id"])
    # The scheduler can look jobs up by name (fake.names is {}): the next try's lookup answers "none".
    fake.submit_errors.append(SchedulerError("qsub: project over allocation", permanent=True))
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed"
    assert "may be in its queue" not in record["status_info"]["error"]
    assert _active_credentials(client, bj["id"]) == []
    assert module.credentials.stored(bj["id"]) is None


def test_a_queue_limit_refusal_between_the_tries_keeps_the_unknown_outcome(setup, client) -> None:
    site, fake, module, clock = setup
    bj = create_batch_job(client, site.site_id)
    _first_try_queued_without_answer(fake, module)
    [cred] = _active_credentials(client, bj["id"])
    fake.submit_errors.append(SchedulerError("qsub: max_queued reached", at_queue_limit=True))
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "pending_submission"  # held at the queue limit
    clock.now += 10 * 3600  # past queue_limit_retry_sec: tried again
    fake.submit_errors.append(SchedulerError("qsub: project over allocation", permanent=True))
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed" and "may be in its queue" in record["status_info"]["error"]
    assert _active_credentials(client, bj["id"]) == [cred]
    assert module.credentials.stored(bj["id"]) is not None

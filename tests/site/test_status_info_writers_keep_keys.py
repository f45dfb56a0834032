"""The scheduler module and a launcher's notes write the same BatchJob's ``status_info``, each its
own keys, against a real server: neither loses the other's (both send ``status_info_merge``,
applied by the server under the row's lock).

Before: the agent's cycle PATCHed the whole status_info from the copy it read at its start
(seconds of scheduler commands earlier), which removed a launcher's note written in between; a
launcher's note was a GET and a PUT of the whole status_info, which removed the agent's
``requeue_count`` PATCHed between the two; and the cycle read its BatchJobs again
(``_keep_withdrawals``) to keep the elastic queue's ``withdraw_if_queued`` written meanwhile.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs
import pytest

from balsam.launcher.batch_job_notes import BatchJobNotes
from balsam.scheduler import SchedulerError
from balsam.site.modules.scheduler import SCHEDULER_STATUS_ERROR, WITHDRAW_IF_QUEUED, SchedulerModule
from balsam.states import BatchJobState
from failure_proxy import wait_until  # tests/failure_proxy.py
from site_test_utils import batch_job, create_batch_job
from test_site_scheduler_module import CountingClient, ScriptedScheduler


@pytest.fixture
def setup(make_site, client):
    site = make_site(overrides={"scheduler": {"allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 60,
                                                                           "max_queued_jobs": 5}}}})
    fake = ScriptedScheduler()
    return site, fake, SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)


def _set(fake: ScriptedScheduler, scheduler_id: int, **changes: Any) -> None:
    fake.queue[scheduler_id] = attrs.evolve(fake.queue[scheduler_id], **changes)


def _running(module: SchedulerModule, fake: ScriptedScheduler, client: Any, site_id: int) -> tuple[int, int]:
    """A BatchJob submitted and running (two cycles): its id and scheduler id."""
    bj_id = create_batch_job(client, site_id)["id"]
    module.run_cycle()
    scheduler_id = batch_job(client, bj_id)["scheduler_id"]
    _set(fake, scheduler_id, state=BatchJobState.running)
    module.run_cycle()
    assert batch_job(client, bj_id)["state"] == "running"
    return bj_id, scheduler_id


def _during_the_poll(fake: ScriptedScheduler, action: Any) -> None:
    """``action`` runs inside the next status poll: after the cycle read its BatchJobs, before its PATCH."""
    poll = fake.get_statuses

    def polled(*args: Any, **kwargs: Any) -> Any:
        fake.get_statuses = poll  # type: ignore[method-assign]
        action()
        return poll(*args, **kwargs)

    fake.get_statuses = polled  # type: ignore[method-assign]


def _notes(client: Any, bj_id: int, wrap: Any = None) -> BatchJobNotes:
    return BatchJobNotes(bj_id, client=lambda: wrap(client) if wrap is not None else client)


def test_a_launcher_note_written_while_the_cycle_ran_survives_its_requeue_patch(setup, client) -> None:
    site, fake, module = setup
    bj_id, scheduler_id = _running(module, fake, client, site.site_id)
    notes = _notes(client, bj_id)
    _set(fake, scheduler_id, state=BatchJobState.queued, message="BeginTime")  # requeued

    def launcher_note() -> None:
        notes.note("disk_full", "paused at T0")
        assert notes.flush(30)

    _during_the_poll(fake, launcher_note)
    module.run_cycle()
    record = batch_job(client, bj_id)
    assert record["state"] == "queued" and record["status_info"]["requeue_count"] == "1", record
    assert record["status_info"]["disk_full"] == "paused at T0", record["status_info"]


class HeldPuts:
    """The launcher's client, its first PUT held (before it reaches the server) until ``release``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.arrived, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put(self, *args: Any, **kwargs: Any) -> Any:
        if not self.arrived.is_set():
            self.arrived.set()
            assert self.release.wait(60)
        return self.inner.put(*args, **kwargs)


def test_the_agents_requeue_count_survives_a_launcher_note_in_flight(setup, client) -> None:
    site, fake, module = setup
    bj_id, scheduler_id = _running(module, fake, client, site.site_id)
    held: list[HeldPuts] = []

    def holding(inner: Any) -> HeldPuts:  # the writer's client, made in its thread at its first write
        held.append(HeldPuts(inner))
        return held[0]

    notes = _notes(client, bj_id, holding)
    notes.note("launcher", "stopped acquiring")
    try:
        assert wait_until(lambda: held and held[0].arrived.is_set(), 30)  # the note's write is on its way
        _set(fake, scheduler_id, state=BatchJobState.queued)  # requeued: the cycle PATCHes requeue_count
        module.run_cycle()
        assert batch_job(client, bj_id)["status_info"]["requeue_count"] == "1"
    finally:
        if held:
            held[0].release.set()
    assert notes.flush(30)
    info = batch_job(client, bj_id)["status_info"]
    assert info.get("launcher") == "stopped acquiring" and info.get("requeue_count") == "1", info


def test_a_withdrawal_marked_while_the_cycle_ran_is_kept_without_reading_again(setup, client) -> None:
    """The elastic queue marks a queued request while the cycle runs a scheduler command; the
    cycle's PATCH (a new scheduler reason) keeps the marker, and the cycle read its BatchJobs once."""
    site, fake, module = setup
    bj_id = create_batch_job(client, site.site_id)["id"]
    module.run_cycle()
    scheduler_id = batch_job(client, bj_id)["scheduler_id"]
    _set(fake, scheduler_id, message="Priority")
    counting = CountingClient(client)
    module.client = counting

    def mark() -> None:  # a whole status_info, as an elastic queue of Balsam 0.7's API would write it
        info = batch_job(client, bj_id)["status_info"]
        client.put(f"/batch-jobs/{bj_id}", json={"status_info": {**info, WITHDRAW_IF_QUEUED: "now by elastic"}})

    _during_the_poll(fake, mark)
    module.run_cycle()
    info = batch_job(client, bj_id)["status_info"]
    assert info.get(WITHDRAW_IF_QUEUED) == "now by elastic" and info.get("scheduler_reason") == "Priority", info
    assert [call for call in counting.calls if call == ("get", "/batch-jobs/")] == [("get", "/batch-jobs/")]


# -- the agent's removals (null in its merge) reach the server -------------------------------------


@pytest.fixture
def one_queued(make_site, client):
    """A site whose queue takes one BatchJob at a time (a second waits, ``status_info.waiting``)."""
    site = make_site(overrides={"scheduler": {"allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 60,
                                                                           "max_queued_jobs": 1}}}})
    fake = ScriptedScheduler()
    return site, fake, SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)


def test_a_withdrawal_marker_is_removed_once_the_batch_job_runs(setup, client) -> None:
    site, fake, module = setup
    bj_id, _scheduler_id = _running(module, fake, client, site.site_id)
    client.put(f"/batch-jobs/{bj_id}", json={"status_info_merge": {WITHDRAW_IF_QUEUED: "now by elastic"}})
    module.run_cycle()
    record = batch_job(client, bj_id)
    assert record["state"] == "running" and WITHDRAW_IF_QUEUED not in record["status_info"], record


def test_waiting_and_a_failed_submits_error_are_removed_once_submitted(one_queued, client) -> None:
    site, fake, module = one_queued
    create_batch_job(client, site.site_id)
    module.run_cycle()  # the first is queued: the queue is full for the second
    second = create_batch_job(client, site.site_id)["id"]
    module.run_cycle()
    assert batch_job(client, second)["status_info"].get("waiting"), batch_job(client, second)
    fake.queue.clear()  # the first ended: room again, but the next submit fails once
    fake.history = {}
    fake.submit_errors.append(SchedulerError("sbatch: Socket timed out"))
    module.run_cycle()
    assert batch_job(client, second)["status_info"].get("error"), batch_job(client, second)
    module.run_cycle()
    record = batch_job(client, second)
    assert record["state"] == "queued", record
    assert "waiting" not in record["status_info"] and "error" not in record["status_info"], record["status_info"]
    assert record["status_info"].get("submit_token")


# -- the scheduler-status outage has a key of its own: the launcher's `error` is its own ----------


def _outage(fake: ScriptedScheduler, module: SchedulerModule) -> None:
    """Status polls fail until the outage is noted on the BatchJobs (the driver's threshold)."""
    fake.status_errors.extend([SchedulerError("squeue: Socket timed out")] * module.threshold)
    for _ in range(module.threshold):
        module.run_cycle()


def test_an_outage_keeps_the_launchers_error_and_its_end_does_not_remove_it(setup, client) -> None:
    site, fake, module = setup
    bj_id, _scheduler_id = _running(module, fake, client, site.site_id)
    client.put(f"/batch-jobs/{bj_id}", json={"status_info_merge": {"error": "serial mode did not start: mpiexec: x",
                                                                   "error_time": "T1"}})
    _outage(fake, module)
    info = batch_job(client, bj_id)["status_info"]
    assert info["error"] == "serial mode did not start: mpiexec: x" and info["error_time"] == "T1", info
    assert info[SCHEDULER_STATUS_ERROR].startswith("scheduler status unavailable since "), info
    module.run_cycle()  # the scheduler answers again
    info = batch_job(client, bj_id)["status_info"]
    assert info["error"] == "serial mode did not start: mpiexec: x" and SCHEDULER_STATUS_ERROR not in info, info


def test_a_launcher_error_written_during_the_recovery_cycle_is_kept(setup, client) -> None:
    site, fake, module = setup
    bj_id, _scheduler_id = _running(module, fake, client, site.site_id)
    _outage(fake, module)
    assert SCHEDULER_STATUS_ERROR in batch_job(client, bj_id)["status_info"]

    def launcher_error() -> None:  # report_batch_job_error lands during the recovery cycle's poll
        client.put(f"/batch-jobs/{bj_id}", json={"status_info_merge": {"error": "serial mode did not start",
                                                                       "error_time": "T1"}})

    _during_the_poll(fake, launcher_error)
    module.run_cycle()
    info = batch_job(client, bj_id)["status_info"]
    assert info.get("error") == "serial mode did not start" and SCHEDULER_STATUS_ERROR not in info, info


def test_an_older_agents_outage_error_is_removed_when_the_scheduler_answers(setup, client) -> None:
    """An agent upgraded mid-outage finds the outage written as `error` by the agent before it: not
    written again under the new key, and removed once the poll answers."""
    site, fake, module = setup
    bj_id, _scheduler_id = _running(module, fake, client, site.site_id)
    old = "scheduler status unavailable since 2026-12-06T16:00:00+00:00 (the status poll failed 3 times in a row): x"
    client.put(f"/batch-jobs/{bj_id}", json={"status_info_merge": {"error": old, "error_time": "T0"}})
    _outage(fake, module)
    info = batch_job(client, bj_id)["status_info"]
    assert info.get("error") == old and SCHEDULER_STATUS_ERROR not in info, info
    module.run_cycle()
    info = batch_job(client, bj_id)["status_info"]
    assert "error" not in info and "error_time" not in info and SCHEDULER_STATUS_ERROR not in info, info


def test_balsam_queue_ls_gives_the_outage_as_a_queued_batch_jobs_reason() -> None:
    from balsam.cli.queue import waiting_reason

    outage = {SCHEDULER_STATUS_ERROR: "scheduler status unavailable since T (the status poll failed 3 times): x"}
    assert waiting_reason("queued", outage).startswith("scheduler status unavailable since T")
    assert waiting_reason("queued", {**outage, "scheduler_reason": "Priority"}) == "Priority"

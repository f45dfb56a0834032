"""The scheduler module's submit markers, requeued jobs, and errors whose condition ended.

Found with a real Slurm (an audit): a ``qlaunch<id>.sh.scheduler_id`` marker left by an earlier
BatchJob of the same id (the server's database reset while the site directory was kept) made a new
BatchJob "already submitted"; a requeued job stayed ``running`` while Slurm had it pending and got
its last run's start_time; an outage's error stayed after the scheduler answered again, and every
poll of the outage rewrote every BatchJob's status_info and logged a line per BatchJob.
"""

from __future__ import annotations

import datetime as dt
import logging

import attrs
import pytest

from balsam.models import SchedulerJobStatus
from balsam.scheduler import JobHistory, SchedulerError
from balsam.site.modules.scheduler import SchedulerModule
from balsam.states import BATCH_JOB_TRANSITIONS, BatchJobState
from site_test_utils import SchedulerIdPatchFails, batch_job, create_batch_job
from test_site_scheduler_module import CountingClient, ScriptedScheduler


@pytest.fixture
def setup(make_site, client):
    site = make_site(overrides={"scheduler": {"allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 60,
                                                                           "max_queued_jobs": 5}}}})
    fake = ScriptedScheduler()
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    return site, fake, module


def _marker(module, bj_id: int):
    script = module.script_path(bj_id)
    return script.with_name(script.name + ".scheduler_id")


def _stale_files(module, bj_id: int) -> list[str]:
    script = module.script_path(bj_id)
    return sorted(p.name for p in script.parent.glob(script.name + ".*.stale-*"))


def _set(fake: ScriptedScheduler, scheduler_id: int, **changes) -> None:
    fake.queue[scheduler_id] = attrs.evolve(fake.queue[scheduler_id], **changes)


# -- 1. a submit marker must belong to the BatchJob ---------------------------------------------


@pytest.mark.parametrize("content", ["17 0123456789abcdef0123456789abcdef\n", "17\n"],
                         ids=["another-batch-jobs-token", "no-token-job-not-listed"])
def test_a_marker_of_an_earlier_batch_job_with_the_same_id_is_moved_aside(setup, client, content, caplog) -> None:
    """The server's database was reset (or an id reused): the new BatchJob of that id finds the old
    BatchJob's marker. It is not "already submitted as scheduler job 17": it is submitted."""
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    marker = _marker(module, bj["id"])
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(content)
    with caplog.at_level(logging.WARNING, logger="balsam.site.modules.scheduler"):
        module.run_cycle()
    record = batch_job(client, bj["id"])
    assert len(fake.submitted) == 1
    assert record["state"] == "queued" and record["scheduler_id"] == fake.next_id != 17
    assert _stale_files(module, bj["id"]) and marker.read_text().split()[0] == str(fake.next_id)
    assert sum("moved aside" in r.getMessage() for r in caplog.records) == 1


def test_a_marker_without_token_whose_job_is_still_listed_is_adopted(setup, client) -> None:
    """An agent older than submit tokens crashed between sbatch and recording the id; the new agent
    finds its token-less marker, and the job is in the queue: adopted, not submitted again."""
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    fake.queue[4242] = SchedulerJobStatus(scheduler_id=4242, state=BatchJobState.queued, queue="local", num_nodes=1,
                                          wall_time_min=10, project="local", time_remaining_min=10, queued_time_min=0)
    marker = _marker(module, bj["id"])
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("4242\n")
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and record["scheduler_id"] == 4242
    assert not fake.submitted and not _stale_files(module, bj["id"])


def test_a_stale_unfinished_submission_marker_is_not_looked_up(setup, client) -> None:
    """A ``.submitting`` marker of an earlier BatchJob of the same id: the scheduler is not asked
    for jobs of that name (an old job of the name would be adopted); the BatchJob is submitted."""
    site, fake, module = setup
    fake.names = {}
    bj = create_batch_job(client, site.site_id)
    script = module.script_path(bj["id"])
    script.parent.mkdir(parents=True, exist_ok=True)
    fake.names[555] = (script.stem, script)  # the old BatchJob's job, gone from the queue long ago
    script.with_name(script.name + ".submitting").write_text("2024-01-01T00:00:00+00:00 feedfacefeedface\n")
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and record["scheduler_id"] == fake.next_id != 555
    assert len(fake.submitted) == 1


# -- 2. requeued jobs ---------------------------------------------------------------------------


def test_running_to_queued_is_a_valid_batch_job_transition(setup, client) -> None:
    assert BatchJobState.queued in BATCH_JOB_TRANSITIONS[BatchJobState.running]
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    client.patch("/batch-jobs/", json=[{"id": bj["id"], "state": "queued", "scheduler_id": 9}])
    client.patch("/batch-jobs/", json=[{"id": bj["id"], "state": "running"}])
    client.patch("/batch-jobs/", json=[{"id": bj["id"], "state": "queued"}])  # the server accepts it
    assert batch_job(client, bj["id"])["state"] == "queued"


def test_a_requeued_job_goes_back_to_queued_and_keeps_its_first_start(setup, client) -> None:
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    module.run_cycle()
    sid = batch_job(client, bj["id"])["scheduler_id"]
    _set(fake, sid, state=BatchJobState.running)
    module.run_cycle()
    first = batch_job(client, bj["id"])
    assert first["state"] == "running" and first["start_time"]

    _set(fake, sid, state=BatchJobState.queued, message="BeginTime")  # scontrol requeue
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued"
    assert record["status_info"]["requeue_count"] == "1" and record["status_info"]["requeue_time"]
    assert record["status_info"]["scheduler_reason"] == "BeginTime"

    _set(fake, sid, state=BatchJobState.running, message="")
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "running" and "scheduler_reason" not in record["status_info"]
    assert record["start_time"] == first["start_time"]

    last_start = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=3)
    fake.queue.pop(sid)
    fake.history[sid] = JobHistory(scheduler_id=sid, state=BatchJobState.finished, start_time=last_start,
                                   end_time=last_start + dt.timedelta(minutes=1), native_state="COMPLETED",
                                   message="Slurm state COMPLETED")
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "finished"
    assert record["start_time"] == first["start_time"]  # the allocation's first start
    assert record["status_info"]["last_start_time"].startswith(last_start.strftime("%Y-%m-%dT%H:%M"))
    assert record["status_info"]["requeue_count"] == "1"


# -- 3. and 4. errors whose condition ended; an outage's noise ------------------------------------


def test_a_retried_submit_error_is_cleared_once_submitted(setup, client) -> None:
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    fake.submit_errors.append(SchedulerError("sbatch: error: Socket timed out"))
    module.run_cycle()
    assert "will retry" in batch_job(client, bj["id"])["status_info"]["error"]
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued"
    assert "error" not in record["status_info"] and "error_time" not in record["status_info"]


def test_an_outage_is_written_once_logged_rarely_and_cleared_when_it_ends(setup, client, caplog) -> None:
    site, fake, module = setup
    ids = [create_batch_job(client, site.site_id)["id"] for _ in range(3)]
    module.run_cycle()
    counting = CountingClient(client)
    module.client = counting
    fake.status_errors.extend([SchedulerError("squeue: error: Socket timed out")] * 9)
    with caplog.at_level(logging.INFO, logger="balsam.site.modules.scheduler"):
        for _ in range(9):
            module.run_cycle()
        errors = [batch_job(client, i)["status_info"].get("scheduler_status_error", "") for i in ids]
        assert all("scheduler status unavailable" in e and "Socket timed out" in e for e in errors)
        # Written when the outage reached the threshold (one bulk PATCH), not at every poll.
        assert [c for c in counting.calls if c[0] == "patch"] == [("patch", "/batch-jobs/")]
        module.run_cycle()  # the scheduler answers again
    outage_lines = [r.getMessage() for r in caplog.records if "poll" in r.getMessage() or "unavailable" in r.getMessage()]
    assert len(outage_lines) == 2, outage_lines  # it started; it ended
    assert "answers again" in outage_lines[-1]
    for i in ids:
        info = batch_job(client, i)["status_info"]
        assert "error" not in info and "error_time" not in info and "scheduler_status_error" not in info


# -- 5. a requeued BatchJob ran; markers keep their token; one PATCH for a burst's tokens ----------


def _run_then_requeue(module, fake, client, bj_id: int) -> tuple[int, dict]:
    """Submit, run, requeue (running -> queued): the scheduler id and the record after the run."""
    module.run_cycle()
    sid = batch_job(client, bj_id)["scheduler_id"]
    _set(fake, sid, state=BatchJobState.running)
    module.run_cycle()
    first = batch_job(client, bj_id)
    _set(fake, sid, state=BatchJobState.queued, message="BeginTime")
    module.run_cycle()
    record = batch_job(client, bj_id)
    assert record["state"] == "queued" and record["status_info"]["requeue_count"] == "1"
    return sid, first


@pytest.mark.parametrize("history", ["none", "record-without-start"])
def test_a_requeued_job_cancelled_while_it_waits_again_is_finished_not_submit_failed(setup, client, history) -> None:
    """It ran, was requeued (queued again in the API), then left the queue before it ran again:
    with no history record (Slurm without accounting) or a record without a start (sacct of a job
    cancelled while pending), it is finished; it is not "never ran" (submit_failed)."""
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    sid, first = _run_then_requeue(module, fake, client, bj["id"])
    fake.queue.pop(sid)
    if history == "record-without-start":
        fake.history[sid] = JobHistory(scheduler_id=sid, state=BatchJobState.submit_failed, native_state="CANCELLED",
                                       message="never started: Slurm state CANCELLED by 0, reason BeginTime")
    for _ in range(fake.status_error_threshold):
        module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "finished", record["status_info"]
    assert record["start_time"] == first["start_time"] and record["end_time"]
    if history == "record-without-start":
        assert "error" not in record["status_info"]
        assert record["status_info"]["scheduler_message"] == "Slurm state CANCELLED by 0, reason BeginTime"


def test_a_requeued_job_seen_running_again_in_its_history_keeps_its_first_start(setup, client) -> None:
    """The poll misses the requeued job, its history says it runs again: running, start_time the
    first start, the new run's start in status_info last_start_time."""
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    sid, first = _run_then_requeue(module, fake, client, bj["id"])
    fake.queue.pop(sid)
    again = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=2)
    fake.history[sid] = JobHistory(scheduler_id=sid, state=BatchJobState.running, start_time=again)
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "running"
    assert record["start_time"] == first["start_time"]
    assert record["status_info"]["last_start_time"].startswith(again.strftime("%Y-%m-%dT%H:%M"))


def test_a_cancelled_unrecorded_submission_keeps_its_marker_when_the_api_write_fails(setup, client) -> None:
    """The submit command's answer was lost, then the BatchJob was cancelled: its job is found by
    name and deleted, and the marker written. The API fails to record the scheduler id; next cycle
    the marker (with the BatchJob's token) is its own: kept, the id recorded."""
    site, fake, module = setup
    fake.names = {}
    bj = create_batch_job(client, site.site_id)
    fake.errors_after_accept.append(SchedulerError("sbatch: error: Socket timed out"))
    module.run_cycle()
    sid = fake.next_id
    assert batch_job(client, bj["id"])["state"] == "pending_submission"
    client.patch("/batch-jobs/", json=[{"id": bj["id"], "state": "pending_deletion"}])

    module.client = SchedulerIdPatchFails(client)
    with pytest.raises(ConnectionError):
        module.run_cycle()
    assert fake.deleted == [sid]
    token = batch_job(client, bj["id"])["status_info"]["submit_token"]
    assert _marker(module, bj["id"]).read_text().split() == [str(sid), token]

    module.client = client
    module.run_cycle()
    assert not _stale_files(module, bj["id"])
    assert batch_job(client, bj["id"])["scheduler_id"] == sid


def test_a_burst_of_submissions_stores_its_tokens_in_one_patch(setup, client) -> None:
    """N BatchJobs to submit: their tokens go to the server in one bulk PATCH (not one each), each
    before its submit command; the cycle's results in a second one."""
    site, fake, module = setup
    ids = [create_batch_job(client, site.site_id)["id"] for _ in range(4)]
    submit = fake.submit
    stored_before = []

    def checked_submit(request):
        bj_id = int(request.job_name.removeprefix("qlaunch"))
        stored_before.append(bool(batch_job(client, bj_id)["status_info"].get("submit_token")))
        return submit(request)

    fake.submit = checked_submit
    counting = CountingClient(client)
    module.client = counting
    module.run_cycle()
    assert [c for c in counting.calls if c[0] == "patch"] == [("patch", "/batch-jobs/")] * 2
    assert stored_before == [True] * 4
    records = [batch_job(client, i) for i in ids]
    assert all(r["state"] == "queued" for r in records)
    for r in records:
        script = module.script_path(r["id"])
        words = _marker(module, r["id"]).read_text().split()
        assert words == [str(r["scheduler_id"]), r["status_info"]["submit_token"]]
        assert script.is_file()


def test_a_failed_token_patch_leaves_the_burst_waiting(setup, client) -> None:
    site, fake, module = setup
    ids = [create_batch_job(client, site.site_id)["id"] for _ in range(3)]

    class FirstPatchFails:
        def __init__(self, inner):
            self.inner, self.failed = inner, False

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def patch(self, path, *args, **kwargs):
            if not self.failed:
                self.failed = True
                raise ConnectionError("API went away")
            return self.inner.patch(path, *args, **kwargs)

    module.client = FirstPatchFails(client)
    module.run_cycle()
    assert not fake.submitted
    for i in ids:
        record = batch_job(client, i)
        assert record["state"] == "pending_submission"
        assert "cannot store the submit token" in record["status_info"]["waiting"]
        assert "submit_token" not in record["status_info"]
    module.client = client
    module.run_cycle()
    assert len(fake.submitted) == 3
    assert all("waiting" not in batch_job(client, i)["status_info"] for i in ids)
